"""Amplification configs in the diffing toolkit's YAML/JSON shape.

A config names adapters (by organism + variant, or `custom` + an adapter reference) and, per adapter,
which layers and which module kinds get which weight:

    name: default_2x
    description: ...
    adapters:
      - organism_name: custom
        variant: my-adapter
        layer_amplifications:
          - layers: {type: range, start: 0.0, end: 0.8}   # or an int, a list, or "all"
            is_relative: true
            module_amplifications: [{modules: all, weight: 2.0}]

Everything that can be checked without a model is checked when a config is built (directly or via
`from_dict`); layer indices against the model's depth are checked by `amplification.resolve`.
Every failure is a `ConfigError` whose message starts with the path of the bad field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

ModuleKind = Literal["all", "attention", "mlp"]
MODULE_KINDS: tuple[str, ...] = ("all", "attention", "mlp")
CUSTOM_ORGANISM = "custom"
PRESETS_DIR = Path(__file__).parent / "presets"
# `{name}_{hash[:8]}` names a compiled folder and a `model` id: a bounded, file-safe name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# |weight| bound, as |alpha| for LDA: far past any useful amplification, and with an adapter's
# scaling still far from float overflow (a weight of 1e308 once merged to inf and decoded garbage).
MAX_WEIGHT = 1000.0


class ConfigError(ValueError):
    """An invalid amplification config; `path` is the offending field, e.g. `adapters[0].variant`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or 'config'}: {reason}")
        self.path = path
        self.reason = reason

    def under(self, prefix: str) -> ConfigError:
        """The same error seen from an enclosing object whose field is `prefix`."""
        if not self.path:
            return ConfigError(prefix, self.reason)
        sep = "" if self.path.startswith("[") else "."
        return ConfigError(f"{prefix}{sep}{self.path}", self.reason)


@contextmanager
def field_path(prefix: str) -> Iterator[None]:
    """Prefix the path of any ConfigError raised inside with `prefix`."""
    try:
        yield
    except ConfigError as e:
        raise e.under(prefix) from None


def _is_number(x: Any) -> bool:
    # bool is an int subclass; `layers: true` is a typo, not layer 1.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _check_keys(data: Any, required: tuple[str, ...], optional: tuple[str, ...], what: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError("", f"expected a mapping for {what}, got {_type_name(data)} {data!r}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(missing[0], f"missing required key (a {what} needs {', '.join(required)})")
    extra = sorted(str(k) for k in data if k not in required + optional)
    if extra:
        allowed = ", ".join(required + optional)
        raise ConfigError(extra[0], f"unknown key {extra[0]!r} in {what} (allowed: {allowed})")


def _list(data: Any, what: str) -> list[Any]:
    if not isinstance(data, (list, tuple)):
        raise ConfigError("", f"expected a list of {what}, got {_type_name(data)} {data!r}")
    return list(data)


def _freeze_items(obj: Any, field: str, cls: type, what: str) -> None:
    """Check that `obj.field` is a list of `cls` and store it as a tuple (the dataclasses are frozen)."""
    with field_path(field):
        items = tuple(_list(getattr(obj, field), what))
    for i, item in enumerate(items):
        if not isinstance(item, cls):
            raise ConfigError(f"{field}[{i}]", f"expected {cls.__name__}, got {item!r}")
    object.__setattr__(obj, field, items)


@dataclass(frozen=True)
class ModuleAmplification:
    """Weight for one module kind of a layer: `attention`, `mlp`, or `all` (both)."""

    modules: ModuleKind
    weight: float

    def __post_init__(self) -> None:
        if self.modules not in MODULE_KINDS:
            raise ConfigError(
                "modules", f"unknown module kind {self.modules!r} (expected one of {MODULE_KINDS})"
            )
        if not _is_number(self.weight):
            raise ConfigError("weight", f"expected a number, got {_type_name(self.weight)} {self.weight!r}")
        try:
            weight = float(self.weight)
        except OverflowError:  # a huge JSON integer
            weight = math.inf
        if not math.isfinite(weight):
            raise ConfigError("weight", f"must be finite, got {self.weight!r}")
        if abs(weight) > MAX_WEIGHT:
            raise ConfigError("weight", f"must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {self.weight!r}")
        object.__setattr__(self, "weight", weight)

    def kinds(self) -> tuple[str, ...]:
        return ("attention", "mlp") if self.modules == "all" else (self.modules,)

    def to_dict(self) -> dict[str, Any]:
        return {"modules": self.modules, "weight": self.weight}

    @staticmethod
    def from_dict(data: Any) -> ModuleAmplification:
        _check_keys(data, ("modules", "weight"), (), "module amplification")
        return ModuleAmplification(modules=data["modules"], weight=data["weight"])


@dataclass(frozen=True)
class LayerRange:
    """Layers `start..end`, both ends included; relative positions when the entry `is_relative`."""

    start: int | float
    end: int | float

    def to_dict(self) -> dict[str, Any]:
        return {"type": "range", "start": self.start, "end": self.end}

    @staticmethod
    def from_dict(data: Any) -> LayerRange:
        _check_keys(data, ("type", "start", "end"), (), "layer range")
        if data["type"] != "range":
            raise ConfigError("type", f"expected 'range', got {data['type']!r}")
        return LayerRange(start=data["start"], end=data["end"])


LayerSpec = int | float | tuple[int | float, ...] | Literal["all"] | LayerRange


def check_layer_value(value: Any, is_relative: bool) -> int | float:
    """A single layer position checked for what is invalid whatever the model (path relative to it).

    Absolute positions come back as ints: the toolkit's dashboard saves whole numbers as floats
    (`end: 11.0`), which name the same layer. Fractional and negative ones are refused (the toolkit
    silently truncates or wraps them).
    """
    if not _is_number(value):
        raise ConfigError("", f"expected a layer number, got {_type_name(value)} {value!r}")
    if is_relative:
        if not 0 <= value <= 1:
            raise ConfigError("", f"relative layer position {value!r} is outside [0, 1]")
        return value
    if isinstance(value, float):
        if not value.is_integer():  # also nan and inf
            raise ConfigError(
                "", f"absolute layer must be an integer, got {value!r} (set is_relative for fractions)"
            )
        value = int(value)
    if value < 0:
        raise ConfigError("", f"absolute layer must be >= 0, got {value}")
    return value


def _check_layers(layers: Any, is_relative: bool) -> LayerSpec:
    if isinstance(layers, LayerRange):
        with field_path("start"):
            start = check_layer_value(layers.start, is_relative)
        with field_path("end"):
            end = check_layer_value(layers.end, is_relative)
        if end < start:
            raise ConfigError("end", f"end ({layers.end}) < start ({layers.start})")
        return LayerRange(start, end)
    if isinstance(layers, str):
        if layers != "all":
            raise ConfigError("", f"expected 'all', an int, a list or a range, got string {layers!r}")
        return layers
    if isinstance(layers, (list, tuple)):
        if not layers:
            raise ConfigError("", "empty list selects no layer")
        values = []
        for i, value in enumerate(layers):
            with field_path(f"[{i}]"):
                values.append(check_layer_value(value, is_relative))
        return tuple(values)
    return check_layer_value(layers, is_relative)


@dataclass(frozen=True)
class LayerAmplification:
    """Module weights for a set of layers; starts from 1.0 for both kinds, the last setting wins."""

    layers: LayerSpec
    is_relative: bool = False
    module_amplifications: tuple[ModuleAmplification, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.is_relative, bool):
            raise ConfigError("is_relative", f"expected true or false, got {self.is_relative!r}")
        with field_path("layers"):
            object.__setattr__(self, "layers", _check_layers(self.layers, self.is_relative))
        _freeze_items(self, "module_amplifications", ModuleAmplification, "module amplifications")

    def to_dict(self) -> dict[str, Any]:
        layers = self.layers
        if isinstance(layers, LayerRange):
            layers = layers.to_dict()
        elif isinstance(layers, tuple):
            layers = list(layers)
        return {
            "layers": layers,
            "is_relative": self.is_relative,
            "module_amplifications": [m.to_dict() for m in self.module_amplifications],
        }

    @staticmethod
    def from_dict(data: Any) -> LayerAmplification:
        _check_keys(data, ("layers", "module_amplifications"), ("is_relative",), "layer amplification")
        layers = data["layers"]
        if isinstance(layers, Mapping):
            with field_path("layers"):
                layers = LayerRange.from_dict(layers)
        with field_path("module_amplifications"):
            raw = _list(data["module_amplifications"], "module amplifications")
        mods = []
        for i, m in enumerate(raw):
            with field_path(f"module_amplifications[{i}]"):
                mods.append(ModuleAmplification.from_dict(m))
        return LayerAmplification(
            layers=layers, is_relative=data.get("is_relative", False), module_amplifications=tuple(mods)
        )


@dataclass(frozen=True)
class AmplifiedAdapter:
    """One adapter and its layer amplifications.

    `organism_name: custom` makes `variant` the adapter reference itself. `variant` may be None
    (YAML `null`): a placeholder the toolkit's presets leave to be filled at compile time
    (see `AmplificationConfig.substitute`).
    """

    organism_name: str
    variant: str | None = "default"
    layer_amplifications: tuple[LayerAmplification, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.organism_name, str):
            raise ConfigError(
                "organism_name",
                f"expected a string, got {_type_name(self.organism_name)} {self.organism_name!r}",
            )
        if self.variant is not None and not isinstance(self.variant, str):
            raise ConfigError(
                "variant", f"expected a string or null, got {_type_name(self.variant)} {self.variant!r}"
            )
        _freeze_items(self, "layer_amplifications", LayerAmplification, "layer amplifications")

    @property
    def is_custom(self) -> bool:
        return self.organism_name == CUSTOM_ORGANISM

    def to_dict(self) -> dict[str, Any]:
        return {
            "organism_name": self.organism_name,
            "variant": self.variant,
            "layer_amplifications": [e.to_dict() for e in self.layer_amplifications],
        }

    @staticmethod
    def from_dict(data: Any) -> AmplifiedAdapter:
        # Like the toolkit: a missing organism_name is an empty placeholder, a missing variant is "default".
        _check_keys(data, ("layer_amplifications",), ("organism_name", "variant"), "adapter")
        with field_path("layer_amplifications"):
            raw = _list(data["layer_amplifications"], "layer amplifications")
        entries = []
        for i, e in enumerate(raw):
            with field_path(f"layer_amplifications[{i}]"):
                entries.append(LayerAmplification.from_dict(e))
        return AmplifiedAdapter(
            organism_name=data.get("organism_name", ""),
            variant=data.get("variant", "default"),
            layer_amplifications=tuple(entries),
        )


def _canonical(x: Any) -> Any:
    """Integral numbers as ints (so 2 == 2.0 and -0.0 == 0), containers recursively, keys sorted later."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, Mapping):
        return {str(k): _canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    return x


@dataclass(frozen=True)
class AmplificationConfig:
    """A named amplification: one or more adapters, each with its layer/module weights."""

    name: str
    description: str = ""
    adapters: tuple[AmplifiedAdapter, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("name", f"expected a non-empty string, got {self.name!r}")
        if NAME_PATTERN.fullmatch(self.name) is None:
            raise ConfigError(
                "name",
                f"must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or digit (it names "
                f"the compiled folder and the model id), got {self.name!r:.80}",
            )
        if not isinstance(self.description, str):
            raise ConfigError(
                "description", f"expected a string, got {_type_name(self.description)} {self.description!r}"
            )
        _freeze_items(self, "adapters", AmplifiedAdapter, "adapters")

    @property
    def amplified_adapters(self) -> tuple[AmplifiedAdapter, ...]:
        """The toolkit's attribute name for `adapters`."""
        return self.adapters

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "adapters": [a.to_dict() for a in self.adapters],
        }

    @staticmethod
    def from_dict(data: Any) -> AmplificationConfig:
        # The toolkit's files say `adapters`; its dataclass field is `amplified_adapters`, so accept
        # that spelling too (one of them, not both). A missing list means no adapters, as in the toolkit.
        _check_keys(data, ("name",), ("description", "adapters", "amplified_adapters"), "config")
        if "adapters" in data and "amplified_adapters" in data:
            raise ConfigError(
                "amplified_adapters", "give either 'adapters' or 'amplified_adapters', not both"
            )
        key = "amplified_adapters" if "amplified_adapters" in data else "adapters"
        with field_path(key):
            raw = _list(data.get(key, []), "adapters")
        adapters = []
        for i, a in enumerate(raw):
            with field_path(f"adapters[{i}]"):
                adapters.append(AmplifiedAdapter.from_dict(a))
        description = data.get("description", "")
        return AmplificationConfig(
            name=data["name"],
            description="" if description is None else description,
            adapters=tuple(adapters),
        )

    @staticmethod
    def from_yaml_text(text: str) -> AmplificationConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("", f"invalid YAML: {e}") from None
        return AmplificationConfig.from_dict(data)

    @staticmethod
    def from_yaml_file(path: str | Path) -> AmplificationConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("", f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
        return AmplificationConfig.from_yaml_text(text)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def content_hash(self) -> str:
        """SHA-256 hex of the canonical content.

        Like the toolkit's compile hash, `name` and `description` are part of it (the toolkit hashes
        its whole `to_dict()`); unlike it, numbers are normalised (2 and 2.0 hash the same) and the
        hash does not depend on a model.
        """
        text = json.dumps(_canonical(self.to_dict()), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def lora_name(self) -> str:
        """`{name}_{hash[:8]}`, the toolkit's name for the compiled adapter."""
        return f"{self.name}_{self.content_hash()[:8]}"

    def substitute(self, organism_name: str | None = None, variant: str | None = None) -> AmplificationConfig:
        """Fill placeholders the way the toolkit's compile route does.

        `organism_name` replaces the organism of every non-`custom` adapter; `variant` replaces the
        variant of every adapter (for `custom` adapters that is the adapter reference). The toolkit
        only applies `variant` when `organism_name` is also given; here it applies on its own too, so a
        preset (`custom` with `variant: null`) can be filled with just an adapter reference.
        """
        adapters = tuple(
            AmplifiedAdapter(
                organism_name=a.organism_name if organism_name is None or a.is_custom else organism_name,
                variant=a.variant if variant is None else variant,
                layer_amplifications=a.layer_amplifications,
            )
            for a in self.adapters
        )
        return AmplificationConfig(self.name, self.description, adapters)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> AmplificationConfig:
    """One of the toolkit's preset configs shipped in `amplification/presets/` (e.g. `default_2x`)."""
    if name not in preset_names():
        raise ConfigError("", f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    return AmplificationConfig.from_yaml_file(PRESETS_DIR / f"{name}.yaml")
