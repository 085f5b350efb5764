"""The `/info` body: what is loaded, where, and with which library versions."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from lda import LDAModelPair, static
from lda.source import input_device

from app import gpu_probe
from app.settings import Settings


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _model(side: Any) -> dict[str, Any]:
    model = side.model
    return {
        "model_id": side.model_id,
        "architecture": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(input_device(model)),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(side.tokenizer),
        "chat_template": bool(getattr(side.tokenizer, "chat_template", None)),
    }


def _cuda(pair: LDAModelPair) -> dict[str, Any]:
    """The CUDA runtime torch was built with, the host driver and the GPU names; null on the CPU."""
    if not any(input_device(side.model).type == "cuda" for side in (pair.after, pair.before)):
        return {"runtime": None, "driver": None, "gpus": None}
    return {
        "runtime": torch.version.cuda,
        "driver": gpu_probe.host_driver(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _compile(settings: Settings) -> dict[str, Any]:
    """COMPILE and what it did: the warm-up's seconds, each compiled shape's first step (compile
    included) and the model sets that decode eagerly, with why."""
    compiler = static.current()
    body: dict[str, Any] = {"setting": settings.compile, "enabled": compiler is not None}
    return body if compiler is None else {**body, **compiler.info()}


def model_summaries(pair: LDAModelPair) -> dict[str, dict[str, Any]]:
    """What `/info` says of each model, taken once on the engine thread right after loading.

    Counting parameters walks the module tree, which weight-diff training rewires (wrappers in,
    wrappers out) on the engine thread; `/info` runs on the event loop, so it must not walk it.
    """
    return {"model_after": _model(pair.after), "model_before": _model(pair.before)}


def info_body(
    pair: LDAModelPair, models: dict[str, dict[str, Any]], settings: Settings, demo: Any
) -> dict[str, Any]:
    return {
        **models,
        "compatible": pair.compatibility.compatible,
        "demo": None if demo is None else {"marker": demo.marker, "path": str(demo.root)},
        "limits": {
            "max_new_tokens": settings.max_new_tokens_limit,
            "max_rows_per_request": settings.max_rows_per_request,
            "max_batch_tokens": settings.max_batch_tokens,
            "max_batch_rows": settings.max_batch_rows,
            "max_prefill_tokens": settings.max_prefill_tokens,
            "max_stop_strings": settings.max_stop_strings,
            "queue_size": settings.queue_size,
            "max_body_bytes": settings.max_body_bytes,
            "max_concurrent_streams": settings.max_concurrent_streams,
            "max_config_bytes": settings.max_config_bytes,
            "max_compiled_configs": settings.max_compiled_configs,
            "max_reference_adapters": settings.max_reference_adapters,
            "max_weightdiff_tasks": settings.max_weightdiff_tasks,
            "max_weightdiff_samples": settings.max_weightdiff_samples,
            "max_weightdiff_steps": settings.max_weightdiff_steps,
            "max_weightdiff_jobs": settings.max_weightdiff_jobs,
            "max_dit_pairs": settings.max_dit_pairs,
            "max_describe_diffs": settings.max_describe_diffs,
            "max_diffing_rows": settings.max_diffing_rows,
            "max_adapters": settings.max_adapters,
            "max_adapter_bytes": settings.max_adapter_bytes,
            "allow_hub_adapters": settings.allow_hub_adapters,
            "max_experiment_samples": settings.max_experiment_samples,
            "experiment_chunk_size": settings.experiment_chunk_size,
            "experiment_isolation": settings.experiment_isolation,
            "allow_hub_datasets": settings.allow_hub_datasets,
        },
        "cuda": _cuda(pair),
        "compile": _compile(settings),
        "versions": {
            "service": _version("model-diff-service"),
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "peft", "accelerate", "fastapi")},
        },
    }
