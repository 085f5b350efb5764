"""Adapter registry and exact amplified merges, checked against PEFT's own unmerged LoRA."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import amplification.merge as merge_module
from amplification.merge import apply, is_merged, merged, plan_deltas, restore
from amplification.registry import AdapterError, AdapterNotFound, AdapterRegistry, LoadedAdapter, lora_scaling
from amplification.resolve import module_kinds
from tests.tiny import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_SEED = 11
Table = dict[int, dict[str, float]]


def table(att0: float, mlp0: float, att1: float, mlp1: float) -> Table:
    return {0: {"attention": att0, "mlp": mlp0}, 1: {"attention": att1, "mlp": mlp1}}


ONES = table(1.0, 1.0, 1.0, 1.0)
ZEROS = table(0.0, 0.0, 0.0, 0.0)


def make_adapter(
    tokenizer: Any, path: Path, seed: int, base_overrides: dict | None = None, **lora: Any
) -> Path:
    """Save a random non-zero LoRA (PEFT's own format) trained on a tiny base to `path`."""
    base = tiny_llama(tokenizer, seed=BASE_SEED, **(base_overrides or {}))
    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False} | lora
    get_peft_model(base, LoraConfig(**settings)).save_pretrained(str(path))
    return path


def fresh_base(tokenizer: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_llama(tokenizer, seed=BASE_SEED).to(dtype)


def peft_reference(tokenizer: Any, adapters: dict[str, tuple[Path, Table]]) -> PeftModel:
    """The unmerged PEFT model with every named adapter active and scaled per layer and module kind."""
    (first, (path, _)), *rest = adapters.items()
    model = PeftModel.from_pretrained(fresh_base(tokenizer), str(path), adapter_name=first)
    for name, (other, _) in rest:
        model.load_adapter(str(other), adapter_name=name)
    model.base_model.set_adapter(list(adapters))
    kinds = module_kinds(model.get_base_model())
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            layer, kind = kinds[name]
            for adapter, (_, weights) in adapters.items():
                module.set_scale(adapter, weights[layer][kind])
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def digests(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter's raw bytes (bf16 viewed as int16: numpy has no bf16)."""
    out = {}
    for name, p in model.named_parameters():
        raw = p.detach().cpu().contiguous()
        raw = raw.view(torch.int16) if raw.dtype == torch.bfloat16 else raw
        out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "adapters").mkdir()
    return tmp_path / "adapters"


@pytest.fixture
def registry(root: Path) -> AdapterRegistry:
    return AdapterRegistry([root], hub_enabled=False)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """Adapters shared (read-only) by the merge tests: two plain ones and an rsLoRA one."""
    base = tmp_path_factory.mktemp("shared-adapters")
    return {
        "one": make_adapter(tokenizer, base / "one", seed=1),
        "two": make_adapter(tokenizer, base / "two", seed=2, r=2, lora_alpha=3),
        "rs": make_adapter(tokenizer, base / "rs", seed=3, use_rslora=True),
    }


def load(tokenizer: Any, adapter_dirs: dict[str, Path], name: str, model: torch.nn.Module) -> LoadedAdapter:
    return AdapterRegistry([adapter_dirs[name].parent], hub_enabled=False).load(
        name, adapter_dirs[name], model
    )


# --- merge math against PEFT --------------------------------------------------------------------


def test_loaded_adapter_fields(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    assert (adapter.r, adapter.lora_alpha, adapter.use_rslora, adapter.scaling) == (4, 8, False, 2.0)
    assert adapter.layers == (0, 1)
    assert adapter.target_modules == tuple(sorted(module_kinds(model)))
    modules = dict(model.named_modules())
    for name, (a, b) in adapter.factors.items():
        assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
        assert a.shape == (4, modules[name].in_features) and b.shape == (modules[name].out_features, 4)
        assert b.abs().sum() > 0
    assert adapter.info()["scaling"] == 2.0 and "factors" not in adapter.info()


@pytest.mark.parametrize(
    "weights",
    [table(2.0, 0.5, -1.0, 3.0), table(-1.5, -1.5, -1.5, -1.5), table(0.0, 1.0, 4.0, 0.0)],
    ids=["mixed", "negative", "partly-zero"],
)
def test_merge_matches_peft_scaled_per_layer_and_kind(tokenizer, adapter_dirs, weights):
    model = fresh_base(tokenizer)
    base_logits = logits(model)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    expected = logits(peft_reference(tokenizer, {"one": (adapter_dirs["one"], weights)}))
    with merged(model, plan_deltas(model, [(adapter, weights)])):
        torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(model), base_logits)


def test_weight_one_equals_plain_peft_adapter(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    plain = PeftModel.from_pretrained(fresh_base(tokenizer), str(adapter_dirs["one"])).eval()
    with merged(model, plan_deltas(model, [(adapter, ONES)])) as state:
        torch.testing.assert_close(logits(model), logits(plain), rtol=1e-5, atol=1e-5)
        assert state.touched_bytes == sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" in n)


def test_weight_zero_leaves_model_untouched(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    before = logits(model)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    plan = plan_deltas(model, [(adapter, ZEROS)])
    assert plan == {}
    with merged(model, plan) as state:
        assert state.touched_bytes == 0
        assert torch.equal(logits(model), before)


def test_two_adapters_add_up(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    one, two = (load(tokenizer, adapter_dirs, name, model) for name in ("one", "two"))
    assert two.scaling == 1.5
    w_one, w_two = table(2.0, -1.0, 0.5, 1.0), table(-1.0, 1.0, 3.0, 0.0)
    reference = peft_reference(
        tokenizer, {"one": (adapter_dirs["one"], w_one), "two": (adapter_dirs["two"], w_two)}
    )
    plan = plan_deltas(model, [(one, w_one), (two, w_two)])
    assert len(plan["model.layers.0.self_attn.q_proj"]) == 2
    assert len(plan["model.layers.1.mlp.up_proj"]) == 1  # adapter two weighs 0 there
    with merged(model, plan):
        torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_opposite_weights_keep_the_module(tokenizer, adapter_dirs):
    """Weights summing to 0 over adapters still merge both deltas (only all-zero modules are skipped)."""
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    plan = plan_deltas(model, [(adapter, ONES), (adapter, table(-1.0, -1.0, -1.0, -1.0))])
    assert all(len(terms) == 2 for terms in plan.values())
    with merged(model, plan):
        torch.testing.assert_close(logits(model), logits(fresh_base(tokenizer)), rtol=1e-5, atol=1e-5)


def test_rslora_scaling_matches_peft(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "rs", model)
    assert adapter.use_rslora and adapter.scaling == 8 / 2 == lora_scaling(4, 8, use_rslora=True)
    weights = table(0.5, 2.0, 1.0, -1.0)
    expected = logits(peft_reference(tokenizer, {"rs": (adapter_dirs["rs"], weights)}))
    with merged(model, plan_deltas(model, [(adapter, weights)])):
        torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_plan_rejects_bad_tables(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    with pytest.raises(ValueError, match="no 'mlp' weight for layer 1"):
        plan_deltas(model, [(adapter, {0: ONES[0], 1: {"attention": 1.0}})])
    with pytest.raises(ValueError, match="nan"):
        plan_deltas(model, [(adapter, table(1.0, float("nan"), 1.0, 1.0))])


# --- exactness --------------------------------------------------------------------------------


def test_random_apply_restore_cycles_are_bit_exact(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapters = [load(tokenizer, adapter_dirs, name, model) for name in ("one", "two", "rs")]
    original = digests(model)
    rng = random.Random(0)
    choices = [0.0, 1.0, -1.0, 0.5, -3.7, 1e3, -1e4, 1e-3]
    for _ in range(200):
        picked = rng.sample(adapters, rng.randint(1, 3))
        tables = [
            table(*(rng.choice(choices) if rng.random() < 0.5 else rng.uniform(-50, 50) for _ in range(4)))
            for _ in picked
        ]
        state = apply(model, plan_deltas(model, list(zip(picked, tables))))
        restore(state)
    assert digests(model) == original
    assert not is_merged(model)


def test_exception_inside_block_restores(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    original = digests(model)
    plan = plan_deltas(model, [(adapter, table(3.0, -2.0, 1.0, 5.0))])
    with pytest.raises(KeyError, match="boom"), merged(model, plan) as state:
        assert digests(model) != original and is_merged(model)
        raise KeyError("boom")
    assert digests(model) == original and not is_merged(model)
    state.restore()  # a second restore is a no-op
    assert digests(model) == original


def test_failure_midway_through_apply_restores(tokenizer, adapter_dirs, monkeypatch):
    """An error while merging (e.g. out of memory on one module) leaves no module changed."""
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    original = digests(model)
    calls = []
    real_delta = merge_module._delta

    def failing_delta(terms, device):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("fake OOM")
        return real_delta(terms, device)

    monkeypatch.setattr(merge_module, "_delta", failing_delta)
    with pytest.raises(torch.OutOfMemoryError):
        apply(model, plan_deltas(model, [(adapter, ONES)]))
    assert digests(model) == original and not is_merged(model)


def test_merging_twice_is_refused(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    plan = plan_deltas(model, [(adapter, ONES)])
    with merged(model, plan), pytest.raises(RuntimeError, match="already holds merged weights"):
        apply(model, plan)
    restore(apply(model, plan))  # fine again once restored


def test_bf16_merge_computes_in_fp32_and_writes_once(tokenizer, adapter_dirs):
    model = fresh_base(tokenizer, torch.bfloat16)
    adapter = load(tokenizer, adapter_dirs, "one", model)
    weights = table(2.5, -0.75, 1.0, 7.0)
    plan = plan_deltas(model, [(adapter, weights)])
    modules = dict(model.named_modules())
    originals = {name: modules[name].weight.detach().clone() for name in plan}
    versions = {name: modules[name].weight._version for name in plan}
    original = digests(model)
    with merged(model, plan):
        for name, [(a, b, coefficient)] in plan.items():
            weight = modules[name].weight
            expected = (originals[name].float() + coefficient * (b @ a)).to(torch.bfloat16)
            assert torch.equal(weight, expected), name
            assert weight._version == versions[name] + 1, f"{name} written more than once"
    assert digests(model) == original


# --- registry -----------------------------------------------------------------------------------


def test_registry_load_get_list_delete(tokenizer, registry, root):
    model = fresh_base(tokenizer)
    make_adapter(tokenizer, root / "first", seed=1)
    make_adapter(tokenizer, root / "second", seed=2)
    loaded = registry.load("b-adapter", "first", model)  # relative sources are looked up under the roots
    registry.load("a_adapter", str(root / "second"), model)
    assert "b-adapter" in registry and registry.get("b-adapter") is loaded
    assert [a.name for a in registry.list()] == ["a_adapter", "b-adapter"]
    with pytest.raises(AdapterError, match="'b-adapter' is already loaded"):
        registry.load("b-adapter", "second", model)
    assert registry.load("b-adapter", "second", model, replace=True).source == "second"
    assert registry.delete("b-adapter").name == "b-adapter"
    assert "b-adapter" not in registry
    for call in (registry.get, registry.delete):
        with pytest.raises(AdapterNotFound, match="'b-adapter'") as info:
            call("b-adapter")
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65, "dot.ted"])
def test_registry_rejects_bad_names(tokenizer, registry, name):
    with pytest.raises(AdapterError, match="adapter name must match"):
        registry.load(name, "anything", fresh_base(tokenizer))


@pytest.mark.parametrize(
    "how", ["dotdot-relative", "dotdot-absolute", "absolute", "symlink-dir", "symlink-file"]
)
def test_registry_confines_paths_to_roots(tokenizer, registry, root, how):
    outside = make_adapter(tokenizer, root.parent / "outside", seed=1)
    source: str | Path = {
        "dotdot-relative": "../outside",
        "dotdot-absolute": f"{root}/../outside",
        "absolute": outside,
        "symlink-dir": "link",
        "symlink-file": "half",
    }[how]
    if how == "symlink-dir":
        (root / "link").symlink_to(outside, target_is_directory=True)
    if how == "symlink-file":
        (root / "half").mkdir()
        shutil.copy(outside / "adapter_config.json", root / "half")
        (root / "half" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    # The same answer as for a path where nothing exists: the path as given, no real path, no roots.
    with pytest.raises(AdapterError) as info:
        registry.load("escape", source, fresh_base(tokenizer))
    assert str(info.value) == f"no adapter at {str(source)!r} under the allowed folders"
    assert "escape" not in registry


def test_registry_follows_symlinks_inside_root(tokenizer, registry, root):
    make_adapter(tokenizer, root / "real", seed=1)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert registry.load("alias", "alias", fresh_base(tokenizer)).layers == (0, 1)


def test_registry_rejects_adapter_for_wider_base(tokenizer, registry, root):
    make_adapter(tokenizer, root / "wide", seed=1, base_overrides={"hidden_size": 48})
    with pytest.raises(AdapterError, match="adapter built for another base"):
        registry.load("wide", "wide", fresh_base(tokenizer))


def test_registry_rejects_missing_target_module(tokenizer, registry, root):
    make_adapter(tokenizer, root / "deep", seed=1, base_overrides={"num_hidden_layers": 3})
    with pytest.raises(AdapterError, match=r"'model\.layers\.2\..*', which the base model does not have"):
        registry.load("deep", "deep", fresh_base(tokenizer))


def test_registry_refuses_pickle_only_adapter(tokenizer, registry, root):
    make_adapter(tokenizer, root / "pickled", seed=1)
    (root / "pickled" / "adapter_model.safetensors").unlink()
    (root / "pickled" / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(AdapterError, match="adapter_model.bin.*pickle"):
        registry.load("pickled", "pickled", fresh_base(tokenizer))


def test_registry_refuses_dora_and_other_peft_types(tokenizer, registry, root):
    make_adapter(tokenizer, root / "dora", seed=1, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora=True.*DoRA"):
        registry.load("dora", "dora", fresh_base(tokenizer))
    make_adapter(tokenizer, root / "ia3", seed=1)
    config_file = root / "ia3" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3'"):
        registry.load("ia3", "ia3", fresh_base(tokenizer))


def test_registry_reads_adapter_named_keys(tokenizer, registry, root):
    """`lora_A.default.weight` (adapter name kept in the key) loads like PEFT's stripped keys."""
    from safetensors.torch import load_file, save_file

    make_adapter(tokenizer, root / "named", seed=1)
    weights = root / "named" / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, weights)
    adapter = registry.load("named", "named", fresh_base(tokenizer))
    assert len(adapter.factors) == 14


def test_registry_hub_ids(tokenizer, registry, root):
    """Hub loads themselves (checks before any download) are tested in test_review_hub.py."""
    with pytest.raises(AdapterError, match="'org/name'.*hub is disabled on this test server"):
        AdapterRegistry([root], hub_enabled=False, hub_off="the hub is disabled on this test server").load(
            "hub", "org/name", fresh_base(tokenizer)
        )
    with pytest.raises(AdapterError, match="^no adapter at 'missing' under the allowed folders$"):
        registry.load("local", "missing", fresh_base(tokenizer))
