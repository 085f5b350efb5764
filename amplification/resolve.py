"""Resolve amplification configs to per-layer, per-module weights, and classify a model's Linears.

The rules are the diffing toolkit's:
- layer ranges include both ends; relative positions map to `round(v * (N - 1))` with Python's
  `round` (halves to even: 0.5 of 30 layers is 14, of 32 layers 16);
- every entry starts each of its layers from `{attention: 1.0, mlp: 1.0}` and applies its module
  settings in order (the last wins, `all` sets both); a later entry replaces an earlier one on the
  layers they share; layers no entry covers keep 1.0;
- entries of the config's `adapters` list that name the same adapter are one adapter: their layer
  amplifications are merged into one table (in config order), so it is applied once.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from torch import nn

from amplification.config import (
    AmplificationConfig,
    AmplifiedAdapter,
    ConfigError,
    LayerAmplification,
    LayerRange,
    LayerSpec,
    check_layer_value,
    field_path,
)

LayerWeights = dict[int, dict[str, float]]
MODULE_GROUPS: tuple[str, ...] = ("attention", "mlp")


def _index(value: float, is_relative: bool, num_layers: int) -> int:
    """One layer position as an absolute index; the path of any error is relative to the value."""
    value = check_layer_value(value, is_relative)
    if is_relative:
        return round(value * (num_layers - 1))
    if value >= num_layers:
        raise ConfigError(
            "", f"layer {value} out of range for a model with {num_layers} layers (0..{num_layers - 1})"
        )
    return int(value)


def resolve_layers(
    layers: LayerSpec | Sequence[int | float], is_relative: bool, num_layers: int
) -> list[int]:
    """The sorted, distinct absolute layer indices a `layers` spec selects in an N-layer model.

    Raises ConfigError with a path relative to the `layers` field (`layers`, `layers[2]`,
    `layers.end`) for a value invalid in itself or out of range for this model.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    with field_path("layers"):
        if isinstance(layers, LayerRange):
            with field_path("start"):
                start = _index(layers.start, is_relative, num_layers)
            with field_path("end"):
                end = _index(layers.end, is_relative, num_layers)
            if end < start:
                raise ConfigError("end", f"end ({layers.end}) < start ({layers.start})")
            return list(range(start, end + 1))
        if isinstance(layers, str):
            if layers != "all":
                raise ConfigError("", f"expected 'all', an int, a list or a range, got string {layers!r}")
            return list(range(num_layers))
        if isinstance(layers, (list, tuple)):
            indices = set()
            for i, value in enumerate(layers):
                with field_path(f"[{i}]"):
                    indices.add(_index(value, is_relative, num_layers))
            return sorted(indices)
        return [_index(layers, is_relative, num_layers)]


def entry_weights(entry: LayerAmplification) -> dict[str, float]:
    """The module weights one entry sets on each of its layers."""
    weights = {kind: 1.0 for kind in MODULE_GROUPS}
    for mod in entry.module_amplifications:
        for kind in mod.kinds():
            weights[kind] = mod.weight
    return weights


def _ones(num_layers: int) -> LayerWeights:
    return {layer: {kind: 1.0 for kind in MODULE_GROUPS} for layer in range(num_layers)}


def resolve_adapter(
    adapter: AmplifiedAdapter, num_layers: int, start: LayerWeights | None = None
) -> LayerWeights:
    """`{layer: {"attention": w, "mlp": w}}` for every layer 0..N-1 of one adapter.

    `start` is the table earlier entries of the same adapter left (not modified); by default every
    layer is at 1.0.
    """
    table = {layer: dict(weights) for layer, weights in (start or _ones(num_layers)).items()}
    for i, entry in enumerate(adapter.layer_amplifications):
        with field_path(f"layer_amplifications[{i}]"):
            layers = resolve_layers(entry.layers, entry.is_relative, num_layers)
        weights = entry_weights(entry)
        for layer in layers:
            table[layer] = dict(weights)
    return table


def adapter_groups(config: AmplificationConfig, keys: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Indices of the config's adapter entries, grouped by adapter, in first-seen order.

    `keys[i]` says which adapter entry i resolves to (the server passes the adapter reference: the
    `custom` variant or the organism's adapter id); by default it is `(organism_name, variant)`.
    """
    if keys is None:
        keys = [(a.organism_name, a.variant) for a in config.adapters]
    if len(keys) != len(config.adapters):
        raise ValueError(f"{len(keys)} keys for {len(config.adapters)} adapters")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def resolve_config(
    config: AmplificationConfig, num_layers: int, keys: Sequence[Hashable] | None = None
) -> list[LayerWeights]:
    """One table per distinct adapter (see `adapter_groups`), in first-seen order.

    Like the toolkit, the entries of one adapter are merged into one table: their layer
    amplifications apply in config order, a later entry overriding an earlier one on the layers they
    share, so the adapter is applied once. Tables of different adapters are separate (their scaled
    deltas add up when applied). Error paths name the entry as written (`adapters[2]...`).
    """
    tables = []
    for group in adapter_groups(config, keys):
        table = _ones(num_layers)
        for i in group:
            with field_path(f"adapters[{i}]"):
                table = resolve_adapter(config.adapters[i], num_layers, table)
        tables.append(table)
    return tables


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layer list: the longest ModuleList whose every item holds a Linear.

    Ties go to the shallowest (shortest) qualified name, so a nested per-layer list never wins.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(isinstance(m, nn.Linear) for m in item.modules()) for item in module):
            continue
        if best is None or (len(module), -len(name)) > (len(best[1]), -len(best[0])):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"no decoder layer list (an nn.ModuleList of blocks with Linears) in {type(model).__name__}"
        )
    return best


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers, counted in the module tree."""
    return len(decoder_layers(model)[1])


def _group_of(child_name: str, child: nn.Module) -> str | None:
    """`attention` / `mlp` for a decoder layer's direct child, by its attribute name, then its class."""
    for label in (child_name.lower(), type(child).__name__.lower()):
        if "attn" in label or "attention" in label:
            return "attention"
        if "mlp" in label or "feed_forward" in label or "feedforward" in label or "ffn" in label:
            return "mlp"
    return None


def _linears(module: nn.Module, prefix: str) -> list[str]:
    """Qualified names of the Linears under `module`; a PEFT-wrapped Linear counts once, by its wrapper."""
    if isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear):
        return [prefix]
    found = []
    for name, child in module.named_children():
        found += _linears(child, f"{prefix}.{name}")
    return found


def module_kinds(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Map every Linear inside the decoder layers to `(layer_index, "attention" | "mlp")`.

    The kind comes from the block the Linear sits in (the layer's attention or MLP child), never
    from projection names, so it works for fused or renamed projections. `lm_head` and embeddings
    are outside the decoder layers and never appear.

    Raises:
        ValueError: a Linear inside a layer is under neither an attention nor an MLP block.
    """
    list_name, layers = decoder_layers(model)
    kinds: dict[str, tuple[int, str]] = {}
    for index, layer in enumerate(layers):
        layer_prefix = f"{list_name}.{index}" if list_name else str(index)
        for child_name, child in layer.named_children():
            names = _linears(child, f"{layer_prefix}.{child_name}")
            if not names:
                continue
            group = _group_of(child_name, child)
            if group is None:
                raise ValueError(
                    f"cannot tell whether {names[0]!r} ({type(child).__name__}) is attention or MLP: "
                    f"layer child {child_name!r} names neither"
                )
            kinds.update({name: (index, group) for name in names})
    return kinds
