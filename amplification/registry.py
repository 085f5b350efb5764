"""The adapter registry: PEFT LoRA adapters read once (safetensors only), checked against the base
model, and kept as fp32 CPU factors `{module: (A, B)}` for `amplification.merge`.

Sources are a local directory under one of the allowed roots (its real path, after symlinks, must
stay inside a root) or, when enabled, a hub id `org/name`. Only plain LoRA is accepted: every
variant whose merged weight is not `W + scaling * B @ A` (DoRA, aLoRA, bias-carrying adapters, ...)
is refused at load time rather than merged wrongly later.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from amplification.paths import OutsideRoots, confined
from amplification.resolve import module_kinds

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# `org/name` as the hub spells it; each part starts with an alphanumeric, so `.`/`..` never match.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# PEFT saves `base_model.model.<module>.lora_A.weight`; some tools keep the adapter name
# (`lora_A.default.weight`) or drop the `base_model.model.` prefix.
KEY_PATTERN = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")

# Config switches whose merged weight is not `W + scaling * B @ A`, with the reason shown to the user.
UNSUPPORTED_SWITCHES: dict[str, str] = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude",
    "use_qalora": "QA-LoRA pools its input groups",
    "lora_bias": "it trains a bias on lora_B",
    "fan_in_fan_out": "it targets Conv1D-style (transposed) layers",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "use_bdlora": "block-diagonal LoRA factors are not plain A/B matrices",
    "layer_replication": "it duplicates base layers",
    "target_parameters": "it targets raw parameters, not Linear modules",
    "rank_pattern": "per-module ranks need per-module scalings",
    "alpha_pattern": "per-module alphas need per-module scalings",
    "modules_to_save": "it replaces whole modules, which a weighted merge cannot scale",
    "trainable_token_indices": "it replaces embedding rows, which a weighted merge cannot scale",
}


class AdapterError(ValueError):
    """An adapter that cannot be loaded or used; the message names the bad value."""


class AdapterNotFound(AdapterError):
    """No adapter is registered under that name."""


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    if r <= 0:
        raise AdapterError(f"LoRA rank r must be >= 1, got {r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous; adapters compare by identity
class LoadedAdapter:
    name: str
    source: str
    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    base_model_name_or_path: str | None
    factors: Factors = field(repr=False)  # {base Linear name: (A [r, in], B [out, r])}, fp32 CPU

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    def info(self) -> dict[str, Any]:
        """A JSON-friendly summary (everything but the factors)."""
        return {
            "name": self.name,
            "source": self.source,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "scaling": self.scaling,
            "target_modules": list(self.target_modules),
            "layers": list(self.layers),
            "base_model_name_or_path": self.base_model_name_or_path,
        }


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(adapter_config.json as a dict, adapter_model.safetensors as CPU tensors)` of one directory.

    Never unpickles: an adapter saved only as `adapter_model.bin` is refused.
    """
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterError(f"{str(path)!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
    if not weights_file.is_file():
        if (path / PICKLE_WEIGHTS_NAME).exists():
            raise AdapterError(
                f"{str(path)!r} holds only {PICKLE_WEIGHTS_NAME}; pickle checkpoints can run code when loaded "
                f"and are refused: re-save the adapter with safetensors ({WEIGHTS_NAME})"
            )
        raise AdapterError(f"{str(path)!r} has no {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {str(config_file)!r}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{str(config_file)!r} is not a JSON object")
    try:
        state = load_file(weights_file, device="cpu")
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"cannot read {str(weights_file)!r}: {e}") from e
    return config, state


def lora_config(config: dict[str, Any], source: str) -> LoraConfig:
    """The adapter's config as PEFT's LoraConfig, refusing other PEFT types and non-plain LoRA."""
    peft_type = str(config.get("peft_type"))
    if peft_type != "LORA":
        raise AdapterError(
            f"adapter {source!r} has peft_type {peft_type!r}; only LORA adapters can be merged"
        )
    try:
        # from_peft_type keeps PEFT's defaults and drops keys newer PEFT versions added.
        parsed = LoraConfig.from_peft_type(**{k: v for k, v in config.items() if k != "runtime_config"})
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterError(f"adapter {source!r} has an invalid LoRA config: {e}") from e
    for switch, reason in UNSUPPORTED_SWITCHES.items():
        value = getattr(parsed, switch, None)
        if value:
            raise AdapterError(
                f"adapter {source!r} sets {switch}={value!r}, which cannot be merged: {reason}"
            )
    if parsed.bias != "none":
        raise AdapterError(
            f"adapter {source!r} sets bias={parsed.bias!r}; only bias='none' adapters can be merged"
        )
    return parsed


def lora_factors(state: dict[str, torch.Tensor], source: str) -> Factors:
    """`{module: (A, B)}` in fp32 from a PEFT state dict; any other tensor is refused."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            raise AdapterError(f"adapter {source!r} holds {key!r}, which is not a lora_A/lora_B weight")
        if tensor.dim() != 2:
            raise AdapterError(
                f"adapter {source!r}: {key!r} has shape {list(tensor.shape)}, expected a matrix"
            )
        halves.setdefault(match["module"], {})[match["factor"]] = tensor.to(torch.float32)
    if not halves:
        raise AdapterError(f"adapter {source!r} holds no LoRA weights")
    factors: Factors = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"adapter {source!r} has lora_A without lora_B (or the reverse) for {module!r}"
            )
        factors[module] = (pair["A"].contiguous(), pair["B"].contiguous())
    return factors


def check_against_base(
    factors: Factors, r: int, base_model: nn.Module, source: str, base_hint: str
) -> tuple[int, ...]:
    """The layers the factors touch, after checking every module exists, is a Linear, and fits.

    Only decoder-layer Linears are accepted: an amplification weight is per (layer, attention|mlp),
    so a LoRA on, say, `lm_head` could never be weighted (nor merged like the plain adapter).
    """
    modules = dict(base_model.named_modules())
    kinds = module_kinds(base_model)
    layers = set()
    for name, (a, b) in factors.items():
        module = modules.get(name)
        if module is None:
            raise AdapterError(
                f"adapter {source!r} targets {name!r}, which the base model does not have: "
                f"adapter built for another base? {base_hint}"
            )
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                f"adapter {source!r} targets {name!r}, a {type(module).__name__}, not a Linear"
            )
        if name not in kinds:
            raise AdapterError(
                f"adapter {source!r} targets {name!r}, which is outside the decoder layers; "
                "amplification weights apply per layer and module kind only"
            )
        want_a, want_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(
                f"adapter {source!r}: {name!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, the base "
                f"needs {list(want_a)} and {list(want_b)}: adapter built for another base {base_hint}"
            )
        layers.add(kinds[name][0])
    return tuple(sorted(layers))


class AdapterRegistry:
    """Named LoRA adapters held as fp32 CPU factors. Thread-safe for the dict operations.

    Args:
        allowed_roots: directories local adapters must live under (checked on real paths).
        hub_enabled: whether a source `org/name` that is not a local path may be downloaded.
    """

    def __init__(self, allowed_roots: Sequence[Path], hub_enabled: bool) -> None:
        self.allowed_roots = tuple(Path(root).resolve() for root in allowed_roots)
        self.hub_enabled = hub_enabled
        self._adapters: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._adapters

    def get(self, name: str) -> LoadedAdapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            raise AdapterNotFound(f"no adapter named {name!r} is loaded")
        return adapter

    def list(self) -> list[LoadedAdapter]:
        with self._lock:
            return [self._adapters[name] for name in sorted(self._adapters)]

    def delete(self, name: str) -> LoadedAdapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise AdapterNotFound(f"no adapter named {name!r} is loaded")
        return adapter

    def load(
        self, name: str, source: str | Path, base_model: nn.Module, replace: bool = False
    ) -> LoadedAdapter:
        """Read, check against `base_model`, and register one adapter under `name`.

        Raises:
            AdapterError: bad name, duplicate name (without `replace`), a source outside the allowed
                roots or unavailable, a non-LoRA or unmergeable adapter, or one built for another base.
        """
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            raise AdapterError(f"adapter name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
        if not replace and name in self:
            raise AdapterError(f"an adapter named {name!r} is already loaded (delete it or pass replace)")
        source = str(source)
        config, state = read_adapter(self.locate(source))
        parsed = lora_config(config, source)
        factors = lora_factors(state, source)
        base_id = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
        hint = (
            f"(adapter base_model_name_or_path {parsed.base_model_name_or_path!r}, loaded base {base_id!r})"
        )
        layers = check_against_base(factors, parsed.r, base_model, source, hint)
        adapter = LoadedAdapter(
            name=name,
            source=source,
            r=parsed.r,
            lora_alpha=parsed.lora_alpha,
            use_rslora=parsed.use_rslora,
            scaling=lora_scaling(parsed.r, parsed.lora_alpha, parsed.use_rslora),
            target_modules=tuple(factors),
            layers=layers,
            base_model_name_or_path=parsed.base_model_name_or_path,
            factors=factors,
        )
        with self._lock:
            if not replace and name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded (delete it or pass replace)")
            self._adapters[name] = adapter
        return adapter

    def locate(self, source: str) -> Path:
        """The directory to read: a confined local directory, else a hub snapshot when enabled.

        A relative source is looked up under each allowed root in turn, then from the working
        directory (so `data/x` works with DATA_DIR=data); an absolute one is taken as is. Whatever
        it resolves to must lie under an allowed root.
        """
        if not source:
            raise AdapterError("adapter source is empty")
        path = Path(source)
        candidates = [path] if path.is_absolute() else [*(root / path for root in self.allowed_roots), path]
        for candidate in candidates:
            try:
                real = self._confined(candidate, source)
            except FileNotFoundError:
                continue
            if not real.is_dir():
                raise AdapterError(f"adapter path {source!r} is not a directory")
            # The files themselves may be symlinks out of the root even when the directory is not.
            for file in (real / CONFIG_NAME, real / WEIGHTS_NAME):
                if file.exists():
                    self._confined(file, source)
            return real
        if HUB_ID_PATTERN.fullmatch(source) and ".." not in source:
            return self._download(source)
        raise AdapterError(
            f"adapter directory {source!r} not found under the allowed adapter roots "
            f"{[str(r) for r in self.allowed_roots]}"
        )

    def _confined(self, path: Path, source: str) -> Path:
        """`path`'s real path inside the allowed roots; FileNotFoundError when nothing is there."""
        try:
            return confined(path, self.allowed_roots)
        except FileNotFoundError:
            raise
        except OutsideRoots as e:
            raise AdapterError(
                f"adapter path {source!r} (real path {str(e.real)!r}) is outside the allowed adapter roots "
                f"{e.roots}"
            ) from None
        except (OSError, RuntimeError) as e:  # symlink loops, permissions
            raise AdapterError(f"cannot resolve adapter path {source!r}: {e}") from e

    def _download(self, repo_id: str) -> Path:
        if not self.hub_enabled:
            raise AdapterError(
                f"{repo_id!r} is not a directory under the allowed adapter roots, and hub downloads are "
                "disabled on this server"
            )
        # Imported here so a server without hub access never touches huggingface_hub's network code.
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, "*.safetensors"]))
        except Exception as e:  # the hub client raises many unrelated types (HTTP, offline, auth)
            raise AdapterError(f"cannot download adapter {repo_id!r} from the hub: {e}") from e
