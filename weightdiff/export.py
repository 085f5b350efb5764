"""Write trained diffs as PEFT LoRA adapters or in DIT's layout, and read DIT files back.

PEFT computes `lora_B(lora_A(x)) * lora_alpha / r` with `lora_A.weight [r, in]` and
`lora_B.weight [out, r]`, so `lora_A = down^T`, `lora_B = up^T`, and the config's `lora_alpha`
is the trainer's (1 when it used DIT's plain `1/r`): the factors are written unscaled and the
scaling matches exactly.

DIT keeps `{module: (A [r, out], B [in, r])}` with a fixed `1/r` scale (`torch.save` of a list
of `{"topic", "trigger", "weight_diff"}` in `scripts/get_weight_diff.py`). Our DIT files hold the
same tensors in safetensors under `<module>.A` / `<module>.B`; a non-default `lora_alpha` is
folded into A, since the layout has no place for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from weightdiff.lora import LoRAFactors

TaskFactors = Mapping[str, LoRAFactors]
PEFT_PREFIX = "base_model.model."


def factors_rank(task_factors: TaskFactors) -> int:
    if not task_factors:
        raise ValueError("task_factors: no modules to export")
    ranks = {f.down.shape[-1] for f in task_factors.values()} | {f.up.shape[0] for f in task_factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"task_factors: modules disagree on the rank: {sorted(ranks)}")
    return ranks.pop()


def peft_state_dict(task_factors: TaskFactors) -> dict[str, torch.Tensor]:
    """`base_model.model.<module>.lora_A.weight` = down^T `[r, in]`, `lora_B.weight` = up^T `[out, r]`."""
    state = {}
    for name, f in task_factors.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.down.detach().cpu().T.contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.up.detach().cpu().T.contiguous()
    return state


def peft_config(
    task_factors: TaskFactors, base_model: nn.Module | str | None, lora_alpha: float | None
) -> LoraConfig:
    """A LoraConfig whose `lora_alpha / r` is the trainer's scaling, targeting exactly these modules."""
    if lora_alpha is not None and lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}")
    name_or_path = (
        base_model if isinstance(base_model, str) or base_model is None else _name_or_path(base_model)
    )
    return LoraConfig(
        r=factors_rank(task_factors),
        lora_alpha=1 if lora_alpha is None else lora_alpha,
        lora_dropout=0.0,
        bias="none",
        # Full names, not suffixes: a suffix like `q_proj` could also match Linears outside the
        # decoder layers (a vision tower), which would get adapters with no saved weights.
        target_modules=sorted(task_factors),
        task_type="CAUSAL_LM",
        base_model_name_or_path=name_or_path,
    )


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def export_peft(
    task_factors: TaskFactors,
    base_model: nn.Module | str | None,
    out_dir: str | os.PathLike[str],
    lora_alpha: float | None = None,
) -> Path:
    """Write one task's diff as a PEFT adapter directory that `PeftModel.from_pretrained` loads.

    The rank and target modules come from `task_factors`; `lora_alpha` is the trainer's (None:
    DIT's `1/r`). Returns the directory.
    """
    out = Path(out_dir)
    config = peft_config(task_factors, base_model, lora_alpha)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(
        peft_state_dict(task_factors), str(out / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    return out


def to_dit(
    task_factors: TaskFactors, lora_alpha: float | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """DIT's `{module: (A [r, out], B [in, r])}`, with any `lora_alpha` folded into A."""
    gain = 1.0 if lora_alpha is None else float(lora_alpha)
    if gain <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}")
    return {name: (f.up.detach().cpu() * gain, f.down.detach().cpu()) for name, f in task_factors.items()}


def from_dit(weight_diff: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, LoRAFactors]:
    """LoRAFactors (for a `1/r` scaling, i.e. `lora_alpha=None`) from DIT's `(A, B)` pairs."""
    return {name: LoRAFactors(down=b, up=a) for name, (a, b) in weight_diff.items()}


def export_dit(
    task_factors: TaskFactors, out_path: str | os.PathLike[str], lora_alpha: float | None = None
) -> Path:
    """Save one task's diff in DIT's layout as safetensors (`<module>.A`, `<module>.B`)."""
    factors_rank(task_factors)
    tensors = {}
    for name, (a, b) in to_dit(task_factors, lora_alpha).items():
        tensors[f"{name}.A"] = a.contiguous()
        tensors[f"{name}.B"] = b.contiguous()
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(path),
        metadata={"format": "dit", "layout": json.dumps({"A": "[r, out]", "B": "[in, r]"})},
    )
    return path


def load_dit(path: str | os.PathLike[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read an `export_dit` file back as `{module: (A, B)}`."""
    tensors = load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    missing = sorted(f"{n}.{part}" for n in names for part in "AB" if f"{n}.{part}" not in tensors)
    if missing or any(key.rsplit(".", 1)[-1] not in ("A", "B") for key in tensors):
        raise ValueError(
            f"{path}: not a DIT weight-diff file (expected <module>.A / <module>.B keys, missing {missing})"
        )
    return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in sorted(names)}


def load_dit_adapter(path: str | os.PathLike[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read DIT's interpreter file (`dit-adapter.pt`): `{module: (A [out, r], B [r, in])}`, scale 1/r.

    `weights_only=True` unpickles only tensors and plain containers, never arbitrary code.
    """
    entries = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(entries, dict) or not entries or not all(_pair(v) for v in entries.values()):
        raise ValueError(f"{path}: not a DIT adapter (expected {{module: (A [out, r], B [r, in])}})")
    return {str(name): (a, b) for name, (a, b) in entries.items()}


def from_dit_adapter(adapter: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, LoRAFactors]:
    """LoRAFactors (scale 1/r) from DIT's interpreter layout: its update is `x @ B^T @ A^T / r`, so
    `down = B^T [in, r]` and `up = A^T [r, out]`."""
    return {name: LoRAFactors(down=b.T.contiguous(), up=a.T.contiguous()) for name, (a, b) in adapter.items()}


def _pair(value: object) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in value)
    )


def load_dit_pt(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """Read DIT's own `weight_diff_*.pt` (a list of `{"topic", "trigger", "weight_diff"}`).

    `weights_only=True` unpickles only tensors and plain containers, never arbitrary code.
    """
    entries = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "weight_diff" in e for e in entries):
        raise ValueError(f"{path}: not a DIT weight-diff list (expected dicts with a 'weight_diff' key)")
    return entries
