"""Organism -> adapter id lookup over the diffing toolkit's own config files, read unchanged.

Layout (the toolkit's `configs/` folder):
    organism/<organism>.yaml  name, ..., finetuned_models: {<model>: {<variant>: {adapter_id: ...}
                                                                                 | {model_id: ...}}}
    model/<model>.yaml        name, model_id, ...

As in the toolkit, an organism is found by file stem and a model by file stem or `name`; the base
model is matched by its `model_id` (or its name). Hydra-only content (`defaults`, `${...}`
interpolations in fields this lookup does not use, `# @package` lines) is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from amplification.config import CUSTOM_ORGANISM, AmplifiedAdapter, ConfigError


def is_custom(organism_name: str) -> bool:
    """`custom` organisms name their adapter directly in `variant`."""
    return organism_name == CUSTOM_ORGANISM


def custom_reference(variant: str | None) -> str:
    """The adapter reference of a `custom` adapter: its variant, which must be filled in."""
    if not variant:
        raise ConfigError("variant", f"is empty ({variant!r}): a custom adapter names its adapter here")
    return variant


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_id: str | None


def _load_yaml(path: Path, field: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(field, f"cannot read {str(path)!r}: {e}") from None


class OrganismRegistry:
    """Resolves `(organism, variant, base model)` to an adapter id using `root/organism` and `root/model`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @cached_property
    def models(self) -> list[ModelEntry]:
        entries = []
        for path in sorted((self.root / "model").glob("*.yaml")):
            data = _load_yaml(path, "organism_name")
            if not isinstance(data, dict):
                continue
            model_id = data.get("model_id")
            entries.append(
                ModelEntry(
                    str(data.get("name") or path.stem), model_id if isinstance(model_id, str) else None
                )
            )
            if path.stem != entries[-1].name:
                entries.append(ModelEntry(path.stem, entries[-1].model_id))
        return entries

    def organism_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "organism").glob("*.yaml"))

    def model_names_for(self, base_model_id: str) -> list[str]:
        """Names of the model configs describing `base_model_id` (by model_id, else by name)."""
        by_id = [m.name for m in self.models if m.model_id == base_model_id]
        return by_id or [m.name for m in self.models if m.name == base_model_id]

    def organism(self, organism_name: str) -> dict[str, Any]:
        """The organism's YAML as a dict."""
        # The name becomes a file name: refuse anything that could leave the organism folder.
        if not organism_name:
            raise ConfigError(
                "organism_name", "is empty (a placeholder to fill): give an organism or 'custom'"
            )
        if "/" in organism_name or "\\" in organism_name or organism_name.startswith("."):
            raise ConfigError("organism_name", f"invalid organism name {organism_name!r}")
        path = self.root / "organism" / f"{organism_name}.yaml"
        if not path.is_file():
            known = ", ".join(self.organism_names()) or "none"
            raise ConfigError(
                "organism_name", f"unknown organism {organism_name!r} (no {path}; known organisms: {known})"
            )
        data = _load_yaml(path, "organism_name")
        if not isinstance(data, dict):
            raise ConfigError("organism_name", f"{str(path)!r} is not a mapping")
        return data

    def variants(self, organism_name: str, base_model_id: str) -> list[str]:
        """Variant names the organism has for this base model (adapters and full models)."""
        table = self._model_table(organism_name, base_model_id)
        return sorted(str(v) for v in table)

    def _model_table(self, organism_name: str, base_model_id: str) -> dict[str, Any]:
        finetuned = self.organism(organism_name).get("finetuned_models")
        if not isinstance(finetuned, dict):
            raise ConfigError("organism_name", f"organism {organism_name!r} has no finetuned_models mapping")
        names = self.model_names_for(base_model_id)
        if not names:
            known = sorted({m.model_id for m in self.models if m.model_id})
            raise ConfigError(
                "organism_name",
                f"base model {base_model_id!r} matches no model config in {str(self.root / 'model')!r} "
                f"(known model ids: {', '.join(known) or 'none'})",
            )
        tables = [finetuned[n] for n in names if isinstance(finetuned.get(n), dict)]
        if not tables:
            raise ConfigError(
                "organism_name",
                f"organism {organism_name!r} has no adapter for base model {base_model_id!r} "
                f"(model config {', '.join(names)}); it has models: {', '.join(map(str, finetuned)) or 'none'}",
            )
        merged: dict[str, Any] = {}
        for table in tables:
            merged.update({str(k): v for k, v in table.items() if str(k) not in merged})
        return merged

    def resolve(self, organism_name: str, variant: str | None, base_model_id: str) -> str:
        """The adapter id (hub id, optionally with a subfolder path) of this organism variant for this base.

        For `custom`, the variant itself is the adapter reference and is returned as is.
        """
        if is_custom(organism_name):
            return custom_reference(variant)
        if not variant:
            raise ConfigError(
                "variant", f"is empty ({variant!r}, a placeholder to fill): give a variant name"
            )
        table = self._model_table(organism_name, base_model_id)
        if variant not in table:
            raise ConfigError(
                "variant",
                f"organism {organism_name!r} has no variant {variant!r} for base model {base_model_id!r} "
                f"(variants: {', '.join(sorted(table)) or 'none'})",
            )
        entry = table[variant]
        adapter_id = entry.get("adapter_id") if isinstance(entry, dict) else None
        if adapter_id is None:
            full = entry.get("model_id") if isinstance(entry, dict) else None
            detail = (
                f"a full fine-tuned model ({full!r})" if full else f"neither adapter nor model ({entry!r})"
            )
            raise ConfigError(
                "variant",
                f"variant {variant!r} of organism {organism_name!r} is {detail}, not a LoRA adapter; "
                "amplification needs an adapter",
            )
        if not isinstance(adapter_id, str) or not adapter_id or "${" in adapter_id:
            raise ConfigError(
                "variant", f"adapter_id {adapter_id!r} of variant {variant!r} is not a plain adapter id"
            )
        return adapter_id


def adapter_reference(
    adapter: AmplifiedAdapter, registry: OrganismRegistry | None, base_model_id: str
) -> str:
    """What to load for one config adapter: the custom reference, or the organism's adapter id.

    Raises ConfigError (paths relative to the adapter) when it cannot be resolved.
    """
    if adapter.is_custom:
        return custom_reference(adapter.variant)
    if registry is None:
        raise ConfigError(
            "organism_name",
            f"organism {adapter.organism_name!r} needs the toolkit's organism configs, and none are configured "
            "(use organism_name 'custom' with the adapter in variant)",
        )
    return registry.resolve(adapter.organism_name, adapter.variant, base_model_id)
