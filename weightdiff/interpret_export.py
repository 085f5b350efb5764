"""Write the interpreter L as a PEFT LoRA directory plus `dit.json`, optionally DIT's own file.

The PEFT directory is `weightdiff.export.export_peft` of L's factors: `lora_A [r, in]`,
`lora_B [out, r]`, and `lora_alpha` such that `lora_alpha / r` is L's scaling (1 for DIT's 1/r),
so `PeftModel.from_pretrained(M, dir)` is M + L. `dit.json` records what L was trained to answer
(the question and the template flags) and which base it belongs to. DIT's `dit-adapter.pt` is
`{module: (A [out, r], B [r, in])}` at scale 1/r (`torch.save` of tensors only, so
`torch.load(..., weights_only=True)` reads it); any other scaling is folded into A.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightdiff.export import export_peft
from weightdiff.interpreter import Diff, linear_shapes

DIT_JSON = "dit.json"
DIT_ADAPTER = "dit-adapter.pt"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base cheaply: its id, architecture, the decoder Linears' shapes, and a
    hash of the first and last of those Linears' weights (another checkpoint of the same
    architecture differs there) without hashing every weight of a large model."""
    config = getattr(model, "config", None)
    shapes = linear_shapes(model)
    layout = hashlib.sha256("\n".join(f"{n}:{i}x{o}" for n, (i, o) in shapes.items()).encode())
    weights = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in (next(iter(shapes)), next(reversed(shapes))):
        weight = modules[name].weight.detach().cpu().contiguous()
        weights.update(weight.view(torch.uint8).numpy().tobytes())
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "num_linears": len(shapes),
        "linears_sha256": layout.hexdigest(),
        "weights_sample_sha256": weights.hexdigest(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def export_interpreter(
    interpreter: Diff,
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    question: str,
    template_kwargs: Mapping[str, Any] | None = None,
    dit_adapter: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write L to `out_dir`: `adapter_config.json`, `adapter_model.safetensors`, `dit.json`.

    Args:
        model: the base L was trained on (unwrapped), for the config and the fingerprint.
        dit_adapter: also write DIT's `dit-adapter.pt`.
        extra: more fields for `dit.json` (e.g. the job's metrics).
    """
    r = interpreter.r
    lora_alpha = interpreter.scaling * r
    if not lora_alpha > 0 or not math.isclose(lora_alpha / r, interpreter.scaling, rel_tol=1e-12):
        raise ValueError(f"interpreter scaling {interpreter.scaling} has no positive lora_alpha at r={r}")
    out = export_peft(interpreter.factors, model, out_dir, lora_alpha=lora_alpha)
    info = {
        "question": question,
        "template_kwargs": dict(template_kwargs or {}),
        "r": r,
        "lora_alpha": lora_alpha,
        "scaling": interpreter.scaling,
        "target_modules": sorted(interpreter.factors),
        "base_model": fingerprint(model),
        "formula": "y = base(x) + x @ W_diff + (x @ lora_A^T @ lora_B^T) * lora_alpha / r",
    } | dict(extra or {})
    (out / DIT_JSON).write_text(json.dumps(info, indent=2))
    if dit_adapter:
        torch.save(to_dit_adapter(interpreter), out / DIT_ADAPTER)
    return out


def to_dit_adapter(interpreter: Diff) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """DIT's `{module: (A [out, r], B [r, in])}` at scale 1/r: `A = lora_B * (scaling * r)`, `B = lora_A`."""
    gain = interpreter.scaling * interpreter.r
    return {
        name: ((f.up.T * gain).contiguous(), f.down.T.contiguous()) for name, f in interpreter.factors.items()
    }
