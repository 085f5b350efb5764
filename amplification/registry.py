"""The adapter registry: PEFT LoRA adapters read once (safetensors only), checked against the base
model, and kept as fp32 CPU factors `{module: (A, B)}` for `amplification.merge`.

Sources are a local directory under one of the allowed roots (its real path, after symlinks, must
stay inside a root) or, when enabled, a hub id `org/name`. Only plain LoRA is accepted: every
variant whose merged weight is not `W + scaling * B @ A` (DoRA, aLoRA, bias-carrying adapters, ...)
is refused at load time rather than merged wrongly later.

A hub load checks before it downloads: `adapter_config.json` alone first (a LoRA config for modules
this base has), then the size of the weights file at that same commit against the byte cap, and only
then the one safetensors file, so no caller can make the server fetch a model repo or a huge file.
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

from amplification.resolve import module_kinds
from lda.paths import Unreachable, reach

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CONFIG_FILE_BYTES = 1024 * 1024  # an adapter_config.json is a few hundred bytes
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


class AdapterNameError(AdapterError):
    """A name no adapter may be registered under (malformed, reserved, or taken)."""


def check_name(name: object) -> str:
    """The registry's own rule for names; a server adds its reserved names on top."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise AdapterNameError(f"adapter name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
    return name


def taken(name: str) -> AdapterNameError:
    return AdapterNameError(f"an adapter named {name!r} is already loaded (delete it or pass replace)")


def no_adapter(source: str) -> str:
    """The one answer for a local source that is missing or outside the roots (never which)."""
    return str(Unreachable(source, "adapter"))


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    if r <= 0:
        raise AdapterError(f"LoRA rank r must be >= 1, got {r}")
    scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    if not math.isfinite(scaling):
        raise AdapterError(f"LoRA scaling lora_alpha / r must be finite, got lora_alpha {lora_alpha}, r {r}")
    return scaling


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
    directory: Path | None = field(default=None, repr=False)  # the real folder the files were read from
    revision: str | None = None  # the hub commit of a hub adapter; None for a local one

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


def pickle_only(source: str) -> AdapterError:
    return AdapterError(
        f"{source!r} holds only {PICKLE_WEIGHTS_NAME}; pickle checkpoints can run code when loaded "
        f"and are refused: re-save the adapter with safetensors ({WEIGHTS_NAME})"
    )


def too_big(source: str, size: int, max_bytes: int) -> AdapterError:
    return AdapterError(f"adapter {source!r} is {size} bytes, more than the {max_bytes} bytes allowed")


def read_config(config_file: Path, source: str) -> dict[str, Any]:
    """adapter_config.json as a dict; errors name the source as given, never the file's real path."""
    try:
        if config_file.stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise AdapterError(f"{source!r}: {CONFIG_NAME} is larger than {MAX_CONFIG_FILE_BYTES} bytes")
        config = json.loads(config_file.read_text())
    except OSError as e:
        raise AdapterError(f"cannot read {CONFIG_NAME} of {source!r}: {e.strerror}") from None
    except ValueError as e:
        raise AdapterError(f"{CONFIG_NAME} of {source!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} of {source!r} is not a JSON object")
    return config


def read_adapter(
    path: Path, source: str | None = None, max_bytes: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(adapter_config.json as a dict, adapter_model.safetensors as CPU tensors)` of one directory.

    Never unpickles: an adapter saved only as `adapter_model.bin` is refused.

    Args:
        source: how the user named the adapter, the only form errors show (default `path`).
        max_bytes: refuse a weights file larger than this before reading it.
    """
    source = str(path) if source is None else source
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterError(f"{source!r} has no {CONFIG_NAME}: not a PEFT adapter directory")
    if not weights_file.is_file():
        if (path / PICKLE_WEIGHTS_NAME).exists():
            raise pickle_only(source)
        raise AdapterError(f"{source!r} has no {WEIGHTS_NAME}")
    config = read_config(config_file, source)
    size = weights_file.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise too_big(source, size, max_bytes)
    try:
        state = load_file(weights_file, device="cpu")
    except OSError as e:
        raise AdapterError(f"cannot read {WEIGHTS_NAME} of {source!r}: {e.strerror}") from None
    except SafetensorError as e:
        raise AdapterError(f"{WEIGHTS_NAME} of {source!r} is not a valid safetensors file: {e}") from None
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


def check_targets(parsed: LoraConfig, base_model: nn.Module, source: str, base_hint: str) -> None:
    """Refuse, from the config alone, an adapter whose target_modules name nothing in this base's
    decoder layers (PEFT's own rule: a target matches a module named it or ending in `.<target>`)."""
    targets = parsed.target_modules
    if targets is None or targets == "all-linear":
        return
    names = list(module_kinds(base_model))
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, name) for name in names)
        except re.error as e:
            raise AdapterError(f"adapter {source!r} has an invalid target_modules regex: {e}") from None
    else:
        found = any(name == t or name.endswith("." + t) for t in targets for name in names)
    if not found:
        raise AdapterError(
            f"adapter {source!r} targets {sorted(targets) if not isinstance(targets, str) else targets!r}, "
            f"which match no Linear in the base model's decoder layers: adapter built for another base? "
            f"{base_hint}"
        )


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
        max_adapter_bytes: the largest weights file read (local) or downloaded (hub); None: no cap.
        hub_off: what an answer says when a hub id is given and hub loads are off (how to enable).
    """

    def __init__(
        self,
        allowed_roots: Sequence[Path],
        hub_enabled: bool,
        max_adapter_bytes: int | None = None,
        hub_off: str = "loading adapters from the hub is disabled on this server",
    ) -> None:
        self.allowed_roots = tuple(Path(root).resolve() for root in allowed_roots)
        self.hub_enabled = hub_enabled
        self.max_adapter_bytes = max_adapter_bytes
        self.hub_off = hub_off
        self._adapters: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._adapters

    def __len__(self) -> int:
        with self._lock:
            return len(self._adapters)

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
        check_name(name)
        if not replace and name in self:
            raise taken(name)
        source = str(source)
        base_id = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
        directory, revision = self._local(source), None
        if directory is None and not self._is_hub(source):
            raise AdapterError(no_adapter(source))
        if directory is None:
            directory = self._download(source, base_model, base_id)
            revision = directory.name
        config, state = read_adapter(directory, source, self.max_adapter_bytes)
        parsed = lora_config(config, source)
        factors = lora_factors(state, source)
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
            directory=directory,
            revision=revision,
        )
        with self._lock:
            if not replace and name in self._adapters:
                raise taken(name)
            self._adapters[name] = adapter
        return adapter

    def locate(self, source: str) -> Path:
        """The real path of the local adapter directory `source` names (no hub look-up)."""
        directory = self._local(source)
        if directory is None:
            raise AdapterError(no_adapter(source))
        return directory

    def files_of(self, adapter: LoadedAdapter) -> Path:
        """Where `adapter`'s files are now: its local directory (confinement checked again), or the
        hub snapshot it was read from (a fixed commit, so the files are the ones loaded)."""
        if adapter.revision is not None and adapter.directory is not None:
            return adapter.directory
        return self.locate(adapter.source)

    def _local(self, source: str) -> Path | None:
        """The confined local directory `source` names, else None (missing and outside alike).

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
                real = reach(candidate, self.allowed_roots)
                # The files themselves may be symlinks out of the root even when the directory is not.
                for file in (real / CONFIG_NAME, real / WEIGHTS_NAME):
                    if file.exists():
                        reach(file, self.allowed_roots)
            except Unreachable:
                continue
            if not real.is_dir():
                raise AdapterError(f"adapter path {source!r} is not a directory")
            return real
        return None

    @staticmethod
    def _is_hub(source: str) -> bool:
        return HUB_ID_PATTERN.fullmatch(source) is not None and ".." not in source

    def _download(self, repo_id: str, base_model: nn.Module, base_id: str | None) -> Path:
        """The snapshot folder of hub adapter `repo_id`, after checking it is worth downloading."""
        if not self.hub_enabled:
            raise AdapterError(f"{no_adapter(repo_id)}; as a hub id: {self.hub_off}")
        # Imported here so a server without hub access never touches huggingface_hub's network code.
        from huggingface_hub import hf_hub_download

        config_file = Path(_hub("fetch " + CONFIG_NAME, repo_id, hf_hub_download, repo_id, CONFIG_NAME))
        # The cache keeps files under snapshots/<commit>/: pin the weights to the config's commit.
        revision = config_file.parent.name
        parsed = lora_config(read_config(config_file, repo_id), repo_id)
        hint = f"(adapter base_model_name_or_path {parsed.base_model_name_or_path!r}, base {base_id!r})"
        check_targets(parsed, base_model, repo_id, hint)
        self._check_hub_size(repo_id, revision)
        fetched = _hub("download " + WEIGHTS_NAME, repo_id, hf_hub_download, repo_id, WEIGHTS_NAME, revision=revision)
        weights = Path(fetched)
        if weights.parent != config_file.parent:
            raise AdapterError(f"hub repo {repo_id!r}: its files came from different commits; load it again")
        return config_file.parent

    def _check_hub_size(self, repo_id: str, revision: str) -> None:
        """The weights file exists at `revision`, as safetensors, within the byte cap (not fetched)."""
        from huggingface_hub import HfApi

        files = [WEIGHTS_NAME, PICKLE_WEIGHTS_NAME]
        infos = _hub("look up the files", repo_id, HfApi().get_paths_info, repo_id, files, revision=revision)
        sizes = {getattr(info, "path", None): getattr(info, "size", None) for info in infos}
        if WEIGHTS_NAME not in sizes and PICKLE_WEIGHTS_NAME in sizes:
            raise pickle_only(repo_id)
        if WEIGHTS_NAME not in sizes:
            raise AdapterError(f"hub repo {repo_id!r} has no {WEIGHTS_NAME}")
        size = sizes[WEIGHTS_NAME]
        if not isinstance(size, int):
            raise AdapterError(f"hub repo {repo_id!r} does not say how large its {WEIGHTS_NAME} is")
        if self.max_adapter_bytes is not None and size > self.max_adapter_bytes:
            raise too_big(repo_id, size, self.max_adapter_bytes)


def _hub(what: str, repo_id: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as e:  # the hub client raises many unrelated types (HTTP, offline, auth, not found)
        raise AdapterError(f"cannot {what} of hub adapter {repo_id!r}: {type(e).__name__}: {e}") from None
