"""The `/info` body: what is loaded, where, and with which library versions."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lda import LDAModelPair
from lda.source import input_device

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


def info_body(pair: LDAModelPair, settings: Settings, demo: Any) -> dict[str, Any]:
    return {
        "model_after": _model(pair.after),
        "model_before": _model(pair.before),
        "compatible": pair.compatibility.compatible,
        "demo": None if demo is None else {"marker": demo.marker, "path": str(demo.root)},
        "limits": {
            "max_new_tokens": settings.max_new_tokens_limit,
            "max_rows_per_request": settings.max_rows_per_request,
            "max_stop_strings": settings.max_stop_strings,
            "queue_size": settings.queue_size,
            "max_body_bytes": settings.max_body_bytes,
            "max_concurrent_streams": settings.max_concurrent_streams,
            "max_config_bytes": settings.max_config_bytes,
            "max_weightdiff_tasks": settings.max_weightdiff_tasks,
            "max_weightdiff_samples": settings.max_weightdiff_samples,
            "max_weightdiff_steps": settings.max_weightdiff_steps,
        },
        "versions": {
            "service": _version("model-diff-service"),
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "peft", "accelerate", "fastapi")},
        },
    }
