"""The amplification lens behind the routes: registry, compiled configs, plans. Engine thread only.

Amplification merges into the pair's base (`before`) model in place and restores it bit-exactly
after each column; adapter-mode LDA never touches weights (forward hooks on one forward).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from amplification import (
    PRESETS_DIR,
    AdapterError,
    AdapterRegistry,
    AmplificationConfig,
    ConfigError,
    LoadedAdapter,
    OrganismRegistry,
    adapter_reference,
    module_kinds,
    num_layers,
    plan_deltas,
    resolve_config,
)
from amplification.merge import Plan
from lda import LDAModelPair

from app.settings import Settings

log = logging.getLogger(__name__)

BUNDLED_ORGANISMS = Path(__file__).parent / "organisms"


@dataclass(frozen=True)
class Compiled:
    """A config resolved against the loaded base: one (adapter, table) per config adapter."""

    config: AmplificationConfig
    lora_name: str
    content_hash: str
    adapters: tuple[LoadedAdapter, ...]
    references: tuple[str, ...]
    tables: tuple[dict[int, dict[str, float]], ...]


def _confined(path: Path, roots: list[Path], what: str) -> Path:
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(what, f"{path} does not exist ({type(exc).__name__})") from None
    for root in roots:
        try:
            real.relative_to(root.resolve())
            return real
        except (ValueError, OSError):
            continue
    raise ConfigError(what, f"{path} is outside the allowed roots {[str(r) for r in roots]}")


class Amplifier:
    """Adapters, organisms and compiled configs for the pair's base model."""

    def __init__(self, pair: LDAModelPair, settings: Settings) -> None:
        self.pair = pair
        self.model = pair.before.model
        self.layers = num_layers(self.model)
        hub = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
        self.registry = AdapterRegistry(settings.adapter_root_paths, hub_enabled=hub)
        self.organisms = OrganismRegistry(settings.organisms_dir or BUNDLED_ORGANISMS)
        self.config_roots = [*settings.config_root_paths, PRESETS_DIR]
        self.compiled_dir = settings.data_dir / "compiled"
        self.compiled: dict[str, Compiled] = {}
        self.max_config_bytes = settings.max_config_bytes

    @property
    def base_model_id(self) -> str:
        return self.pair.before.model_id

    def load_adapter(self, name: str, source: str, replace: bool = False) -> LoadedAdapter:
        return self.registry.load(name, source, self.model, replace=replace)

    def _check_size(self, size: int, what: str) -> None:
        # A config resolves to a table over every layer and module: cap what a request can make us parse.
        if size > self.max_config_bytes:
            raise ConfigError(what, f"the config is {size} bytes, the limit is {self.max_config_bytes} (MAX_CONFIG_BYTES)")

    def config_from_dict(self, data: dict[str, Any]) -> AmplificationConfig:
        self._check_size(len(json.dumps(data, separators=(",", ":"), default=str)), "config")
        return AmplificationConfig.from_dict(data)

    def read_config_file(self, path: str) -> AmplificationConfig:
        real = _confined(Path(path), self.config_roots, "config_path")
        if real.is_file():
            self._check_size(real.stat().st_size, "config_path")
        return AmplificationConfig.from_yaml_file(real)

    def _adapter(self, reference: str) -> LoadedAdapter:
        """A registered name, else a path or hub id registered under a name derived from it."""
        if reference in self.registry:
            return self.registry.get(reference)
        name = "ref_" + hashlib.sha256(reference.encode()).hexdigest()[:12]
        if name in self.registry:
            return self.registry.get(name)
        return self.registry.load(name, reference, self.model)

    def compile(self, config: AmplificationConfig) -> Compiled:
        if not config.adapters:
            raise ConfigError("adapters", "a config needs at least one adapter")
        tables = resolve_config(config, self.layers)
        adapters, references = [], []
        for i, spec in enumerate(config.adapters):
            try:
                ref = adapter_reference(spec, self.organisms, self.base_model_id)
            except ConfigError as exc:
                raise ConfigError(f"adapters[{i}].{exc.path}", exc.reason) from None
            try:
                adapters.append(self._adapter(ref))
            except AdapterError as exc:
                raise ConfigError(f"adapters[{i}].variant", str(exc)) from None
            references.append(ref)
        compiled = Compiled(
            config, config.lora_name, config.content_hash(), tuple(adapters), tuple(references), tuple(tables)
        )
        self.compiled[compiled.lora_name] = compiled
        return compiled

    def lookup(self, reference: str | dict[str, Any]) -> Compiled:
        """A config body, a compiled `lora_name`, or a registered adapter name (weight 1 everywhere)."""
        if isinstance(reference, dict):
            return self.compile(self.config_from_dict(reference))
        if reference in self.compiled:
            return self.compiled[reference]
        if reference in self.registry:
            return self.plain(self.registry.get(reference))
        raise ConfigError("config", f"{reference!r} is neither a compiled lora_name nor a registered adapter")

    def plain(self, adapter: LoadedAdapter) -> Compiled:
        ones = {layer: {"attention": 1.0, "mlp": 1.0} for layer in range(self.layers)}
        config = AmplificationConfig.from_dict(
            {
                "name": adapter.name,
                "adapters": [
                    {
                        "organism_name": "custom",
                        "variant": adapter.name,
                        "layer_amplifications": [
                            {"layers": "all", "module_amplifications": [{"modules": "all", "weight": 1.0}]}
                        ],
                    }
                ],
            }
        )
        return Compiled(config, adapter.name, config.content_hash(), (adapter,), (adapter.name,), (ones,))

    def plan(self, compiled: Compiled) -> Plan:
        return plan_deltas(self.model, list(zip(compiled.adapters, compiled.tables)))

    def describe(self, compiled: Compiled) -> dict[str, Any]:
        return {
            "name": compiled.config.name,
            "lora_name": compiled.lora_name,
            "hash": compiled.content_hash,
            "num_layers": self.layers,
            "adapters": [
                {
                    "adapter": a.name,
                    "reference": ref,
                    "scaling": a.scaling,
                    "layers": [table[i] for i in range(self.layers)],
                }
                for a, ref, table in zip(compiled.adapters, compiled.references, compiled.tables)
            ],
        }

    def write_compiled(self, compiled: Compiled) -> Path:
        """The toolkit's compiled layout: the first adapter's files linked at the top, others in
        sub-folders, and `amplification_config.yaml` with the resolved table beside them."""
        out = self.compiled_dir / compiled.lora_name
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        resolved: dict[str, list[dict[str, float]]] = {}
        for i, (adapter, ref, table) in enumerate(
            zip(compiled.adapters, compiled.references, compiled.tables)
        ):
            source = self.registry.locate(adapter.source)
            target = tmp if i == 0 else tmp / ref.replace("/", "_")
            target.mkdir(exist_ok=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                (target / name).symlink_to(source / name)
            resolved[ref] = [table[layer] for layer in range(self.layers)]
        body = compiled.config.to_dict() | {
            "resolved_config": resolved,
            "module_paths": self._module_paths(),
            "hash": compiled.content_hash,
        }
        (tmp / "amplification_config.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    def _module_paths(self) -> dict[str, str]:
        """Regexes over PEFT weight keys for layer `[layer_idx]`'s attention and MLP blocks."""
        paths: dict[str, str] = {}
        for name, (layer, kind) in module_kinds(self.model).items():
            if layer == 0 and kind not in paths:
                head, _, rest = name.partition(".0.")
                block = f"base_model.model.{head}.0.{rest.split('.')[0]}"
                paths[kind] = (
                    block.replace(".", "\\.").replace("\\.0\\.", "\\.[layer_idx]\\.") + ".*\\.lora_B.weight"
                )
        return paths
