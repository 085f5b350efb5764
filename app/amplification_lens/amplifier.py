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
from collections import OrderedDict
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
    adapter_groups,
    adapter_reference,
    confined,
    field_path,
    module_kinds,
    num_layers,
    plan_deltas,
    resolve_config,
)
from amplification.merge import Plan
from amplification.registry import AdapterNameError
from amplification.registry import check_name as check_adapter_name
from lda import LDAModelPair
from lda.paths import Unreachable, reach

from app.settings import Settings

log = logging.getLogger(__name__)

BUNDLED_ORGANISMS = Path(__file__).parent / "organisms"
COMPILED_CONFIG = "amplification_config.yaml"
CONFIG_KEYS = ("name", "description", "adapters", "amplified_adapters")
REFERENCE_PREFIX = "ref_"
# The OpenAI lens's own model ids (app/openai_lens/models.py), besides the two models' ids and
# `lda@...` (which no adapter name can spell: `@` is outside its characters).
MODEL_ALIASES = ("after", "before", "lda")
HUB_OFF = "hub adapters are off on this server (the operator enables them with ALLOW_HUB_ADAPTERS=true)"
HUB_OFFLINE = "HF_HUB_OFFLINE is set on this server, so adapters load from its disk only"
REPLACE = "delete it or pass replace"


class AdapterLimitError(AdapterError):
    """The server holds as many registered adapters as MAX_ADAPTERS allows."""


def reference_name(reference: str) -> str:
    """The registry name of an adapter a config names by path or hub id (not by a registered name)."""
    return REFERENCE_PREFIX + hashlib.sha256(reference.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Compiled:
    """A config resolved against the loaded base: one (adapter, table) per distinct adapter.

    Entries of the config that resolve to the same adapter reference are one adapter with one merged
    table (the toolkit's rule); `entries[k]` lists the config indices merged into adapter k.
    """

    config: AmplificationConfig
    lora_name: str
    content_hash: str
    adapters: tuple[LoadedAdapter, ...]
    references: tuple[str, ...]
    tables: tuple[dict[int, dict[str, float]], ...]
    entries: tuple[tuple[int, ...], ...]

    def uses(self, adapter: LoadedAdapter) -> bool:
        return any(a is adapter for a in self.adapters)


class Amplifier:
    """Adapters, organisms and compiled configs for the pair's base model.

    What requests leave behind is bounded: compiled configs are an LRU of MAX_COMPILED_CONFIGS, and
    adapters a config names by path or hub id (registered as `ref_<hash>`) an LRU of
    MAX_REFERENCE_ADAPTERS. Unloading an adapter (evicted, deleted or replaced) drops the compiled
    configs that use it. A lora_name written by `write_compiled` stays usable after that while its
    folder exists: it is recompiled from the folder's `amplification_config.yaml`. Deleting an
    adapter also deletes the compiled folders that use it, so their names stop working.
    """

    def __init__(self, pair: LDAModelPair, settings: Settings) -> None:
        self.pair = pair
        self.model = pair.before.model
        self.layers = num_layers(self.model)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        self.registry = AdapterRegistry(
            settings.adapter_root_paths,
            hub_enabled=settings.allow_hub_adapters and not offline,
            max_adapter_bytes=settings.max_adapter_bytes,
            hub_off=HUB_OFFLINE if settings.allow_hub_adapters else HUB_OFF,
        )
        self.max_adapters = settings.max_adapters
        self.organisms = OrganismRegistry(settings.organisms_dir or BUNDLED_ORGANISMS)
        self.config_roots = [*settings.config_root_paths, PRESETS_DIR]
        self.compiled_dir = settings.data_dir / "compiled"
        self.imported_dir = settings.data_dir / "imported"  # DIT files registered as PEFT copies
        self.compiled: OrderedDict[str, Compiled] = OrderedDict()  # least recently used first
        self.max_compiled_configs = settings.max_compiled_configs
        self._references: OrderedDict[str, None] = OrderedDict()  # auto-registered ref_ names, LRU first
        self.max_reference_adapters = settings.max_reference_adapters
        self.max_config_bytes = settings.max_config_bytes

    @property
    def base_model_id(self) -> str:
        return self.pair.before.model_id

    # --- adapters -------------------------------------------------------------------------------

    @property
    def model_ids(self) -> set[str]:
        """The ids `model` selects a model or LDA by (GET /v1/models lists them)."""
        return {*MODEL_ALIASES, self.pair.after.model_id, self.pair.before.model_id}

    def check_name(self, name: str, replace: bool = False, how_to_replace: str = REPLACE) -> None:
        """The one rule for an adapter's name, whichever way it is registered (POST /adapters,
        /v1/load_lora_adapter, ADAPTERS at start, a weight-diff job's `register`).

        A name must reach its adapter as a `model` id and never shadow, or be shadowed by, another
        lens: not a model id, not a compiled config's lora_name (those win in look-ups), and not
        `ref_...`, which stands for the adapter a config names by path or hub id.

        Raises:
            AdapterNameError: naming the clash.
        """
        check_adapter_name(name)
        if name.startswith(REFERENCE_PREFIX):
            raise AdapterNameError(
                f"adapter name {name!r}: names starting with {REFERENCE_PREFIX!r} are reserved for the "
                "adapters configs name by path or hub id; choose another name"
            )
        if name in self.model_ids:
            raise AdapterNameError(f"adapter name {name!r} is a model id of this server; choose another name")
        if name in self.compiled or self.written_exists(name):
            raise AdapterNameError(
                f"adapter name {name!r} is a compiled amplification's lora_name; choose another name"
            )
        if name in self.registry and not replace:
            raise AdapterNameError(f"an adapter named {name!r} has already been loaded ({how_to_replace})")

    def named_adapters(self) -> int:
        """Adapters registered by name (those configs name by path or hub id have their own bound)."""
        return sum(1 for a in self.registry.list() if a.name not in self._references)

    def check_room(self, new: int) -> None:
        """Refuse `new` more named adapters beyond MAX_ADAPTERS (each holds its factors in memory)."""
        held = self.named_adapters()
        if held + new > self.max_adapters:
            raise AdapterLimitError(
                f"{held} adapters are registered and {new} more would pass the limit of {self.max_adapters} "
                "(MAX_ADAPTERS): delete some first (DELETE /adapters/NAME)"
            )

    def load_adapter(
        self, name: str, source: str, replace: bool = False, how_to_replace: str = REPLACE
    ) -> LoadedAdapter:
        """Register an adapter; replacing one drops the compiled configs built on the old one."""
        self.check_name(name, replace, how_to_replace)
        if name not in self.registry:
            self.check_room(1)
        old = self.registry.get(name) if replace and name in self.registry else None
        adapter = self.registry.load(name, source, self.model, replace=replace)
        self._references.pop(name, None)  # registered by name now, no longer evictable
        if old is not None:
            self._forget(old)
        return adapter

    def delete_adapter(self, name: str) -> LoadedAdapter:
        """Unregister an adapter, every compiled config that uses it, and their compiled folders."""
        adapter = self.registry.delete(name)
        self._references.pop(name, None)
        self._forget(adapter)
        self._remove_written(name)
        copy = self.imported_dir / name
        if adapter.directory is not None and adapter.directory == copy.resolve():
            shutil.rmtree(copy, ignore_errors=True)  # the PEFT copy an imported DIT file was made into
        return adapter

    def _adapter(self, reference: str) -> LoadedAdapter:
        """A registered name, else a path or hub id registered under `reference_name(reference)`."""
        name = reference if reference in self.registry else reference_name(reference)
        if name not in self.registry:
            self.registry.load(name, reference, self.model)
            self._references[name] = None
            while len(self._references) > self.max_reference_adapters:
                oldest, _ = self._references.popitem(last=False)
                self._forget(self.registry.delete(oldest))
        if name in self._references:
            self._references.move_to_end(name)
        return self.registry.get(name)

    def _forget(self, adapter: LoadedAdapter) -> None:
        """Drop the compiled configs holding `adapter`, so nothing keeps its tensors alive."""
        for lora_name in [n for n, c in self.compiled.items() if c.uses(adapter)]:
            del self.compiled[lora_name]

    # --- configs --------------------------------------------------------------------------------

    def _check_size(self, size: int, what: str) -> None:
        # A config resolves to a table over every layer and module: cap what a request can make us parse.
        if size > self.max_config_bytes:
            raise ConfigError(
                what, f"the config is {size} bytes, the limit is {self.max_config_bytes} (MAX_CONFIG_BYTES)"
            )

    def config_from_dict(self, data: dict[str, Any]) -> AmplificationConfig:
        self._check_size(len(json.dumps(data, separators=(",", ":"), default=str)), "config")
        return AmplificationConfig.from_dict(data)

    def read_config_file(self, path: str) -> AmplificationConfig:
        """A config file under the config roots; errors show `path` as given, missing and outside alike."""
        try:
            real = reach(path, self.config_roots, "config")
        except Unreachable as exc:
            raise ConfigError("config_path", str(exc)) from None
        if not real.is_file():
            raise ConfigError("config_path", f"{path!r} is not a file")
        self._check_size(real.stat().st_size, "config_path")
        try:
            text = real.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError("config_path", f"cannot read {path!r}: {reason}") from None
        return AmplificationConfig.from_yaml_text(text)

    def compile(self, config: AmplificationConfig) -> Compiled:
        """Resolve `config` against the base, load what it names, and cache it under its lora_name."""
        if not config.adapters:
            raise ConfigError("adapters", "a config needs at least one adapter")
        self._check_lora_name(config.lora_name)
        references = []
        for i, spec in enumerate(config.adapters):
            with field_path(f"adapters[{i}]"):
                references.append(adapter_reference(spec, self.organisms, self.base_model_id))
        # The same reference in several entries is one adapter with one merged table (the toolkit's rule).
        tables = resolve_config(config, self.layers, keys=references)
        groups = adapter_groups(config, references)
        distinct = [references[group[0]] for group in groups]
        by_path = [ref for ref in distinct if ref not in self.registry]
        if len(by_path) > self.max_reference_adapters:
            raise ConfigError(
                "adapters",
                f"the config names {len(by_path)} adapters by path or hub id, and at most "
                f"{self.max_reference_adapters} are kept loaded (MAX_REFERENCE_ADAPTERS): register some "
                "with POST /adapters and use their names",
            )
        adapters = []
        for ref, group in zip(distinct, groups):
            with field_path(f"adapters[{group[0]}]"):
                try:
                    adapters.append(self._adapter(ref))
                except AdapterError as exc:
                    raise ConfigError("variant", str(exc)) from None
        compiled = Compiled(
            config,
            config.lora_name,
            config.content_hash(),
            tuple(adapters),
            tuple(distinct),
            tuple(tables),
            tuple(tuple(group) for group in groups),
        )
        self.compiled[compiled.lora_name] = compiled
        self.compiled.move_to_end(compiled.lora_name)
        while len(self.compiled) > self.max_compiled_configs:
            self.compiled.popitem(last=False)
        return compiled

    def _check_lora_name(self, lora_name: str) -> None:
        """The other side of `check_name`: a compiled name never takes a registered or model name."""
        if lora_name in self.model_ids or lora_name in self.registry:
            raise ConfigError(
                "name",
                f"the config's lora_name {lora_name!r} is already the name of an adapter or model on this "
                "server; rename the config",
            )

    def lookup(self, reference: str | dict[str, Any]) -> Compiled:
        """A config body, a compiled `lora_name`, or a registered adapter name (weight 1 everywhere).

        Errors for a config body have paths inside it; for a name, the path is empty (the name itself).
        """
        if isinstance(reference, dict):
            return self.compile(self.config_from_dict(reference))
        if reference in self.compiled:
            self.compiled.move_to_end(reference)
            return self.compiled[reference]
        if reference in self.registry:
            return self.plain(self.registry.get(reference))
        written = self._recompile_written(reference)
        if written is not None:
            return written
        raise ConfigError(
            "",
            f"{reference!r} is neither a compiled lora_name nor a registered adapter (the server keeps the "
            f"{self.max_compiled_configs} most recently used compiled configs, MAX_COMPILED_CONFIGS; names "
            "written by /v1/compile_and_load_amplification last while their folder does: compile it again)",
        )

    def written_names(self) -> list[str]:
        """The lora_names with a compiled folder (written by /v1/compile_and_load_amplification)."""
        if not self.compiled_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.compiled_dir.glob(f"*/{COMPILED_CONFIG}"))

    def written_exists(self, lora_name: str) -> bool:
        try:
            confined(self.compiled_dir / lora_name / COMPILED_CONFIG, [self.compiled_dir])
        except (OSError, RuntimeError, ValueError):
            return False
        return True

    def _recompile_written(self, lora_name: str) -> Compiled | None:
        """The config of a compiled folder compiled again (and its folder rewritten); None without one."""
        try:
            path = confined(self.compiled_dir / lora_name / COMPILED_CONFIG, [self.compiled_dir])
        except (OSError, RuntimeError, ValueError):  # missing, unreadable, or outside compiled/
            return None
        try:
            body = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(body, dict):
                body = {k: v for k, v in body.items() if k in CONFIG_KEYS}
            config = AmplificationConfig.from_dict(body)
            if config.lora_name != lora_name:
                raise ConfigError("", f"it holds the config {config.lora_name!r}")
            compiled = self.compile(config)
        except (OSError, yaml.YAMLError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else exc
            message = f"compiled {lora_name!r} cannot be compiled again from its folder: {reason}"
            raise ConfigError("", message) from None
        self.write_compiled(compiled)  # its links and table show what is applied now
        return compiled

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
        return Compiled(
            config, adapter.name, config.content_hash(), (adapter,), (adapter.name,), (ones,), ((0,),)
        )

    def plan(self, compiled: Compiled) -> Plan:
        return plan_deltas(self.model, list(zip(compiled.adapters, compiled.tables)))

    def describe(self, compiled: Compiled) -> dict[str, Any]:
        """The resolved config: one entry per distinct adapter, with the table that is applied."""
        return {
            "name": compiled.config.name,
            "lora_name": compiled.lora_name,
            "hash": compiled.content_hash,
            "num_layers": self.layers,
            "adapters": [
                {
                    "adapter": a.name,
                    "reference": ref,
                    "entries": list(entries),
                    "scaling": a.scaling,
                    "layers": [table[i] for i in range(self.layers)],
                }
                for a, ref, entries, table in zip(
                    compiled.adapters, compiled.references, compiled.entries, compiled.tables
                )
            ],
        }

    # --- compiled folders -----------------------------------------------------------------------

    def write_compiled(self, compiled: Compiled) -> Path:
        """The toolkit's compiled layout: the first adapter's files linked at the top, others in
        sub-folders, and `amplification_config.yaml`: the config as given (its hash is the
        lora_name's) plus `resolved_config`, the table applied per distinct adapter reference."""
        out = self.compiled_dir / compiled.lora_name
        if out.parent != self.compiled_dir:
            raise ConfigError(
                "name", f"{compiled.config.name!r} cannot name a folder: use a name without path separators"
            )
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        resolved: dict[str, list[dict[str, float]]] = {}
        for i, (adapter, ref, table) in enumerate(
            zip(compiled.adapters, compiled.references, compiled.tables)
        ):
            source = self.registry.files_of(adapter)
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
        (tmp / COMPILED_CONFIG).write_text(yaml.safe_dump(body, sort_keys=False))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    def _remove_written(self, adapter_name: str) -> None:
        """Delete the compiled folders whose config names `adapter_name` (by name or by the path or
        hub id it was auto-registered from), so their lora_names cannot be compiled again."""
        for path in self.compiled_dir.glob(f"*/{COMPILED_CONFIG}"):
            try:
                body = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            refs = body.get("resolved_config") if isinstance(body, dict) else None
            if isinstance(refs, dict) and any(
                adapter_name in (ref, reference_name(str(ref))) for ref in refs
            ):
                shutil.rmtree(path.parent, ignore_errors=True)

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
