"""Amplified LoRA merges: diffing-toolkit amplification configs, their resolution to per-layer,
per-module weights, and the toolkit's organism -> adapter lookup. No FastAPI import."""

from amplification.config import (
    CUSTOM_ORGANISM,
    MODULE_KINDS,
    PRESETS_DIR,
    AmplificationConfig,
    AmplifiedAdapter,
    ConfigError,
    LayerAmplification,
    LayerRange,
    ModuleAmplification,
    field_path,
    load_preset,
    preset_names,
)
from amplification.organisms import OrganismRegistry, adapter_reference, custom_reference, is_custom
from amplification.resolve import (
    adapter_groups,
    decoder_layers,
    entry_weights,
    module_kinds,
    num_layers,
    resolve_adapter,
    resolve_config,
    resolve_layers,
)
from lda.paths import OutsideRoots, confined

__all__ = [
    "CUSTOM_ORGANISM",
    "MODULE_KINDS",
    "PRESETS_DIR",
    "AmplificationConfig",
    "AmplifiedAdapter",
    "ConfigError",
    "LayerAmplification",
    "LayerRange",
    "ModuleAmplification",
    "OrganismRegistry",
    "OutsideRoots",
    "adapter_groups",
    "adapter_reference",
    "confined",
    "custom_reference",
    "decoder_layers",
    "entry_weights",
    "field_path",
    "is_custom",
    "load_preset",
    "module_kinds",
    "num_layers",
    "preset_names",
    "resolve_adapter",
    "resolve_config",
    "resolve_layers",
]

from amplification.merge import (
    DeltaTerm,
    MergedWeights,
    Plan,
    apply,
    is_merged,
    merged,
    plan_deltas,
    restore,
)
from amplification.registry import (
    AdapterError,
    AdapterNotFound,
    AdapterRegistry,
    LoadedAdapter,
    lora_scaling,
    read_adapter,
)

__all__ += [
    "AdapterError",
    "AdapterNotFound",
    "AdapterRegistry",
    "DeltaTerm",
    "LoadedAdapter",
    "MergedWeights",
    "Plan",
    "apply",
    "is_merged",
    "lora_scaling",
    "merged",
    "plan_deltas",
    "read_adapter",
    "restore",
]
