"""DIT's own files registered as adapters: a stage-1 weight diff or a stage-2 interpreter.

DIT saves with `torch.save`: a `weight_diff_*.pt` list of `{"topic", "trigger", "weight_diff":
{module: (A [r, out], B [in, r])}}` and a `dit-adapter.pt` `{module: (A [out, r], B [r, in])}`, both
with DIT's fixed 1/r scale; this service's own `export_dit` writes the first layout as safetensors
(`<module>.A` / `<module>.B`). Each is read without running pickled code (`weights_only=True`),
checked module by module against the base model, and written once as a PEFT adapter under
`DATA_DIR/imported/<name>`, which is then registered like any uploaded adapter: merges, adapter
mode, compiled folders and downloads all see an ordinary PEFT directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from amplification import AdapterError, LoadedAdapter
from lda.paths import Unreachable, reach
from weightdiff.export import export_peft, from_dit, from_dit_adapter, load_dit, load_dit_adapter, load_dit_pt
from weightdiff.lora import LoRAFactors, decoder_linears

from app.amplification_lens.amplifier import Amplifier

FORMATS = ("peft", "dit_weight_diff", "dit_adapter")
# Prefixes other wrappers put before the model's own module names (PEFT's, a multimodal model's).
PREFIXES = ("base_model.model.", "language_model.")


def read_dit(source: Path, given: str, fmt: str, index: int | None) -> dict[str, LoRAFactors]:
    """The factors (scale 1/r) of item `index` of a weight-diff file, or of an interpreter file."""
    try:
        if fmt == "dit_adapter":
            return from_dit_adapter(load_dit_adapter(source))
        if source.suffix == ".safetensors":  # this service's export_dit: one diff per file
            if index not in (None, 0):
                raise AdapterError(f"index: {given!r} holds one weight diff, got index {index}")
            return from_dit(load_dit(source))
        entries = load_dit_pt(source)
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001  (torch.load refuses in many types: unpickling, zip, EOF)
        raise AdapterError(f"{given!r} is not a DIT {fmt} file: {type(exc).__name__}: {exc}") from None
    if index is None:
        raise AdapterError(f"index: {given!r} holds {len(entries)} weight diffs; give the index of one")
    if not 0 <= index < len(entries):
        raise AdapterError(f"index: {given!r} holds {len(entries)} weight diffs, got index {index}")
    weight_diff = entries[index]["weight_diff"]
    if not isinstance(weight_diff, Mapping) or not weight_diff:
        raise AdapterError(f"{given!r}[{index}].weight_diff is not a {{module: (A, B)}} mapping")
    return from_dit(weight_diff)


def onto_model(factors: Mapping[str, LoRAFactors], model: nn.Module, given: str) -> dict[str, LoRAFactors]:
    """The factors under the model's own module names, each checked to fit its Linear; the first
    module that does not fit is refused by name."""
    linears = decoder_linears(model)
    mapped: dict[str, LoRAFactors] = {}
    for name, f in factors.items():
        own = next((n for n in _candidates(name) if n in linears), None)
        if own is None:
            raise AdapterError(f"{given!r}: module {name!r} is not a Linear in this model's decoder layers")
        linear = linears[own]
        if f.down.dim() != 2 or f.up.dim() != 2 or f.down.shape[1] != f.up.shape[0]:
            raise AdapterError(f"{given!r}: module {name!r} has factors of shapes "
                               f"{list(f.down.shape)} and {list(f.up.shape)}, not [in, r] and [r, out]")  # fmt: skip
        if (f.down.shape[0], f.up.shape[1]) != (linear.in_features, linear.out_features):
            raise AdapterError(
                f"{given!r}: module {name!r} maps {f.down.shape[0]} -> {f.up.shape[1]} features, the model's "
                f"{own!r} {linear.in_features} -> {linear.out_features}: built for another base?"
            )
        mapped[own] = LoRAFactors(f.down.to(torch.float32), f.up.to(torch.float32))
    if len({f.down.shape[1] for f in mapped.values()}) != 1:
        raise AdapterError(f"{given!r}: modules of different ranks need per-module scalings; not supported")
    return mapped


def _candidates(name: str) -> list[str]:
    names = [name]
    for prefix in PREFIXES:
        if name.startswith(prefix):
            names.append(name[len(prefix) :])
    return names


def _find(source: str, roots: tuple[Path, ...]) -> Path:
    """The confined real path of `source`: absolute as given, relative under each root in turn
    (then from the working directory), as adapter directories are found; one message otherwise."""
    path = Path(source)
    candidates = [path] if path.is_absolute() else [*(root / path for root in roots), path]
    for candidate in candidates:
        try:
            return reach(candidate, roots, "file", given=source)
        except Unreachable:
            continue
    raise AdapterError(str(Unreachable(source, "file")))


def import_dit(amp: Amplifier, name: str, source: str, fmt: str, index: int | None, replace: bool) -> LoadedAdapter:
    """Register DIT file `source` (under the adapter roots) as adapter `name`, via a PEFT copy."""
    amp.check_name(name, replace)
    path = _find(source, amp.registry.allowed_roots)
    if not path.is_file():
        raise AdapterError(f"{source!r} is not a file: the {fmt} format reads one .pt or .safetensors file")
    limit = amp.registry.max_adapter_bytes
    if limit is not None and path.stat().st_size > limit:
        raise AdapterError(f"{source!r} is {path.stat().st_size} bytes, more than the {limit} bytes allowed")
    factors = onto_model(read_dit(path, source, fmt, index), amp.model, source)
    out = amp.imported_dir / name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_peft(factors, amp.model, tmp)  # lora_alpha 1: DIT's 1/r
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return amp.load_adapter(name, str(out), replace)
