"""Content hashes that pin what an experiment's adapter and amplification conditions decode with.

Each chunk looks its adapters and configs up by name when it runs. Without a pin, an adapter
replaced mid-experiment (DELETE + POST /adapters under the same name) would silently change the
samples after it. The hash covers what decodes: the compiled config's content hash (its tables
follow from it and the base) and each adapter's LoRA settings and factors. Registering the same
weights again gives the same hash, so an experiment resumes once the original adapter is back.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

from amplification import LoadedAdapter

from app.amplification_lens.amplifier import Compiled

# A loaded adapter never changes (replacing one registers a new object), so its hash is computed
# once per object, not once per chunk; the entry goes with the adapter.
_adapter_hashes: weakref.WeakKeyDictionary[LoadedAdapter, str] = weakref.WeakKeyDictionary()


class AdapterChanged(RuntimeError):
    """A condition's adapter or config hashes differently from when the experiment was submitted."""


def adapter_hash(adapter: LoadedAdapter) -> str:
    """sha256 over the adapter's LoRA settings and its factors, module by module."""
    cached = _adapter_hashes.get(adapter)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    lora = [adapter.r, adapter.lora_alpha, adapter.use_rslora, adapter.scaling, list(adapter.target_modules)]
    digest.update(json.dumps(lora).encode())
    for name in sorted(adapter.factors):
        digest.update(name.encode())
        for tensor in adapter.factors[name]:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    _adapter_hashes[adapter] = digest.hexdigest()
    return _adapter_hashes[adapter]


def compiled_hash(compiled: Compiled) -> str:
    """The pin of an adapter-mode condition: its config and every adapter the config applies."""
    digest = hashlib.sha256(compiled.content_hash.encode())
    for adapter in compiled.adapters:
        digest.update(adapter_hash(adapter).encode())
    return digest.hexdigest()


def check_pin(label: str, what: str, pinned: str | None, now: str | None, exp_id: str) -> None:
    """Raise AdapterChanged naming the condition and what changed; None on either side: no pin."""
    if pinned is None or now is None or pinned == now:
        return
    raise AdapterChanged(
        f"condition {label!r}: {what} changed since the experiment was submitted (content hash "
        f"{pinned[:12]}, now {now[:12]}); register the original again, then "
        f"POST /experiments/{exp_id}/resume"
    )
