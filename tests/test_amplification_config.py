"""Amplification configs: parsing, validation, hashing, resolution, module kinds, organism lookup."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from amplification import (
    AmplificationConfig,
    AmplifiedAdapter,
    ConfigError,
    LayerAmplification,
    LayerRange,
    ModuleAmplification,
    OrganismRegistry,
    adapter_reference,
    is_custom,
    load_preset,
    module_kinds,
    num_layers,
    preset_names,
    resolve_adapter,
    resolve_config,
    resolve_layers,
)


def entry(layers, *mods, is_relative=False):
    return {
        "layers": layers,
        "is_relative": is_relative,
        "module_amplifications": [{"modules": m, "weight": w} for m, w in mods],
    }


def config(*entries, name="cfg", adapters=None):
    adapters = adapters or [
        {"organism_name": "custom", "variant": "a", "layer_amplifications": list(entries)}
    ]
    return AmplificationConfig.from_dict({"name": name, "description": "", "adapters": adapters})


def table(cfg, n):
    return resolve_config(cfg, n)[0]


def weights(t, kind):
    return [t[i][kind] for i in sorted(t)]


# --- layer resolution -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, is_relative, n, expected",
    [
        (3, False, 8, [3]),
        ([5, 1, 1], False, 8, [1, 5]),
        ("all", False, 4, [0, 1, 2, 3]),
        ("all", True, 3, [0, 1, 2]),
        (LayerRange(2, 4), False, 8, [2, 3, 4]),
        (LayerRange(3, 3), False, 8, [3]),
        (LayerRange(0.0, 1.0), True, 5, [0, 1, 2, 3, 4]),
        (LayerRange(0.0, 0.8), True, 32, list(range(26))),  # round(24.8) = 25, end included
        (LayerRange(0.5, 1), True, 10, list(range(4, 10))),
        ([0, 1], True, 10, [0, 9]),
        (0.3, True, 1, [0]),
    ],
)
def test_resolve_layers(layers, is_relative, n, expected):
    assert resolve_layers(layers, is_relative, n) == expected


@pytest.mark.parametrize("n, expected", [(3, 1), (10, 4), (28, 14), (30, 14), (32, 16)])
def test_relative_half_rounds_to_even(n, expected):
    assert resolve_layers(0.5, True, n) == [expected]
    assert resolve_layers(LayerRange(0.5, 0.5), True, n) == [expected]


@pytest.mark.parametrize(
    "layers, path",
    [
        (8, "layers"),
        ([1, 9], "layers[1]"),
        (LayerRange(2, 8), "layers.end"),
        (LayerRange(8, 9), "layers.start"),
    ],
)
def test_absolute_layer_out_of_range(layers, path):
    with pytest.raises(ConfigError) as e:
        resolve_layers(layers, False, 8)
    assert e.value.path == path
    assert "out of range" in str(e.value) and "8 layers" in str(e.value)


def test_out_of_range_error_names_the_full_field():
    cfg = config(entry("all", ("all", 2)), entry([0, 40], ("mlp", 2)))
    with pytest.raises(
        ConfigError, match=r"^adapters\[0\]\.layer_amplifications\[1\]\.layers\[1\]: layer 40"
    ):
        resolve_config(cfg, 32)


# --- adapter resolution ---------------------------------------------------------------------------


def test_uncovered_layers_keep_one_and_every_layer_is_listed():
    t = table(config(entry(1, ("mlp", 3))), 4)
    assert sorted(t) == [0, 1, 2, 3]
    assert t[1] == {"attention": 1.0, "mlp": 3.0}
    assert t[0] == t[2] == t[3] == {"attention": 1.0, "mlp": 1.0}


def test_later_entry_overrides_earlier_on_shared_layers():
    # The second entry resets its layers to 1.0 before its own settings: attention goes back to 1.
    t = table(config(entry("all", ("all", 0)), entry(LayerRange(0.0, 0.2), ("mlp", 2), is_relative=True)), 11)
    assert weights(t, "mlp") == [2.0, 2.0, 2.0] + [0.0] * 8
    assert weights(t, "attention") == [1.0, 1.0, 1.0] + [0.0] * 8


def test_within_an_entry_the_last_module_setting_wins():
    t = table(config(entry(0, ("all", 2), ("attention", 5))), 2)
    assert t[0] == {"attention": 5.0, "mlp": 2.0}
    t = table(config(entry(0, ("attention", 5), ("all", 2))), 2)
    assert t[0] == {"attention": 2.0, "mlp": 2.0}
    t = table(config(entry(0)), 2)  # an entry with no module settings resets to 1.0
    assert t[0] == {"attention": 1.0, "mlp": 1.0}


def test_zero_and_negative_weights():
    t = table(config(entry([0], ("attention", 0)), entry([1], ("mlp", -1.5))), 3)
    assert t[0] == {"attention": 0.0, "mlp": 1.0}
    assert t[1] == {"attention": 1.0, "mlp": -1.5}


def test_two_adapters_resolve_separately():
    cfg = config(
        adapters=[
            {"organism_name": "custom", "variant": "a", "layer_amplifications": [entry("all", ("all", 2))]},
            {"organism_name": "persona", "layer_amplifications": [entry([2], ("mlp", -1))]},
        ]
    )
    a, b = resolve_config(cfg, 3)
    assert weights(a, "mlp") == [2.0, 2.0, 2.0]
    assert weights(b, "mlp") == [1.0, 1.0, -1.0] and weights(b, "attention") == [1.0, 1.0, 1.0]
    assert cfg.adapters[1].variant == "default"  # the toolkit's default


def test_same_adapter_in_several_entries_merges_into_one_table():
    """The toolkit merges entries of one adapter into one table (later entries win where they overlap),
    so the adapter is applied once: layer 0 at 2/2, layers 1-10 at 1/1, layer 11 attention 1 / mlp 3."""
    demo = "custom", "demo"
    cfg = config(
        adapters=[
            {"organism_name": demo[0], "variant": demo[1], "layer_amplifications": [entry(0, ("all", 2.0))]},
            {
                "organism_name": "custom",
                "variant": "other",
                "layer_amplifications": [entry("all", ("all", 5))],
            },
            {"organism_name": demo[0], "variant": demo[1], "layer_amplifications": [entry(11, ("mlp", 3.0))]},
        ]
    )
    merged, other = resolve_config(cfg, 12)
    assert merged[0] == {"attention": 2.0, "mlp": 2.0}
    assert all(merged[layer] == {"attention": 1.0, "mlp": 1.0} for layer in range(1, 11))
    assert merged[11] == {"attention": 1.0, "mlp": 3.0}
    assert weights(other, "mlp") == [5.0] * 12  # another adapter still adds its own table
    # Overlapping entries: the later one wins on the layers they share, as within one adapter.
    overlap = config(
        adapters=[
            {"organism_name": "custom", "variant": "a", "layer_amplifications": [entry("all", ("all", 2))]},
            {"organism_name": "custom", "variant": "a", "layer_amplifications": [entry([1], ("mlp", 0))]},
        ]
    )
    (t,) = resolve_config(overlap, 3)
    assert t == {
        0: {"attention": 2.0, "mlp": 2.0},
        1: {"attention": 1.0, "mlp": 0.0},
        2: {"attention": 2.0, "mlp": 2.0},
    }
    # Callers that know what each entry resolves to group by that (the server: the adapter reference).
    assert len(resolve_config(overlap, 3, keys=["x", "y"])) == 2
    (t,) = resolve_config(cfg, 12, keys=["r", "r", "r"])
    assert t[0] == {"attention": 5.0, "mlp": 5.0} and t[11] == {"attention": 1.0, "mlp": 3.0}
    # Errors still name the entry as written.
    bad = config(
        adapters=[
            {"organism_name": "custom", "variant": "a", "layer_amplifications": [entry(0, ("all", 2))]},
            {"organism_name": "custom", "variant": "a", "layer_amplifications": [entry(40, ("all", 2))]},
        ]
    )
    with pytest.raises(ConfigError, match=r"^adapters\[1\]\.layer_amplifications\[0\]\.layers: layer 40"):
        resolve_config(bad, 12)


def test_absolute_layers_accept_whole_number_floats():
    """The toolkit's dashboard saves absolute ranges as `{start: 0.0, end: 11.0}`."""
    rng = config(entry({"type": "range", "start": 0.0, "end": 11.0}, ("all", 2)))
    assert rng.adapters[0].layer_amplifications[0].layers == LayerRange(0, 11)
    assert isinstance(rng.adapters[0].layer_amplifications[0].layers.end, int)
    assert weights(table(rng, 12), "mlp") == [2.0] * 12
    assert resolve_layers(LayerRange(2.0, 4.0), False, 8) == [2, 3, 4]
    assert resolve_layers(3.0, False, 8) == [3] and resolve_layers([5.0, 1], False, 8) == [1, 5]
    assert config(entry([1.0, 2.0], ("all", 2))).adapters[0].layer_amplifications[0].layers == (1, 2)
    assert (
        rng.content_hash()
        == config(entry({"type": "range", "start": 0, "end": 11}, ("all", 2))).content_hash()
    )
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers(LayerRange(0.0, 12.0), False, 12)


def test_resolve_adapter_direct():
    adapter = AmplifiedAdapter(
        "custom", "x", (LayerAmplification(LayerRange(1, 2), False, (ModuleAmplification("all", 4),)),)
    )
    assert resolve_adapter(adapter, 4)[2] == {"attention": 4.0, "mlp": 4.0}


# --- presets --------------------------------------------------------------------------------------


def test_presets_load_and_resolve_like_the_toolkit():
    assert {"default_2x", "default_3x", "negative_1x"} <= set(preset_names())
    for name, w in [("default_2x", 2.0), ("default_2.5x", 2.5), ("default_3x", 3.0)]:
        cfg = load_preset(name)
        assert (
            cfg.name == name and cfg.adapters[0].organism_name == "custom" and cfg.adapters[0].variant is None
        )
        la = cfg.adapters[0].layer_amplifications[0]
        assert la.layers == LayerRange(0.0, 0.8) and la.is_relative
        for n, last in [(32, 25), (28, 22), (30, 23), (3, 2)]:
            t = table(cfg, n)
            assert weights(t, "attention") == weights(t, "mlp") == [w] * (last + 1) + [1.0] * (n - last - 1)
    t = table(load_preset("negative_1x"), 5)
    assert weights(t, "attention") == weights(t, "mlp") == [-1.0] * 5


def test_preset_placeholder_substitution():
    cfg = load_preset("default_2x")
    filled = cfg.substitute(variant="org/adapter")
    assert filled.adapters[0].variant == "org/adapter" and filled.adapters[0].organism_name == "custom"
    assert filled.lora_name != cfg.lora_name
    named = AmplificationConfig("c", adapters=(AmplifiedAdapter("placeholder", None),)).substitute(
        "persona", "v1"
    )
    assert (named.adapters[0].organism_name, named.adapters[0].variant) == ("persona", "v1")
    assert adapter_reference(filled.adapters[0], None, "base") == "org/adapter"
    with pytest.raises(ConfigError, match="^variant: is empty"):
        adapter_reference(cfg.adapters[0], None, "base")


# --- validation -----------------------------------------------------------------------------------

GOOD = {
    "name": "good",
    "description": "d",
    "adapters": [
        {
            "organism_name": "custom",
            "variant": "a",
            "layer_amplifications": [entry(LayerRange(1, 2).to_dict(), ("all", 2))],
        }
    ],
}
LA = "adapters[0].layer_amplifications[0]"


def with_(path, value):
    """GOOD with the value at a dotted path replaced (`...` as value deletes the key)."""
    d = copy.deepcopy(GOOD)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = d
    for k in keys[:-1]:
        target = target[k]
    if value is ...:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


L0 = "adapters.0.layer_amplifications.0"
BAD = [
    (with_("name", ""), "name"),
    (with_("name", 3), "name"),
    (with_("name", "x" * 300), "name"),  # it names a folder: a 500 (file name too long) once
    (with_("name", "a/b"), "name"),
    (with_("name", ...), "name"),
    (with_("description", 5), "description"),
    (with_("extra", 1), "extra"),
    (with_("adapters", {"a": 1}), "adapters"),
    (with_("adapters.0", "custom"), "adapters[0]"),
    (with_("adapters.0.organism_name", 7), "adapters[0].organism_name"),
    (with_("adapters.0.variant", 1), "adapters[0].variant"),
    (with_("adapters.0.layer_amplifications", ...), "adapters[0].layer_amplifications"),
    (with_("adapters.0.adapter_id", "x"), "adapters[0].adapter_id"),
    (with_(f"{L0}.layers", ...), f"{LA}.layers"),
    (with_(f"{L0}.layers", "first"), f"{LA}.layers"),
    (with_(f"{L0}.layers", True), f"{LA}.layers"),
    (with_(f"{L0}.layers", -1), f"{LA}.layers"),
    (with_(f"{L0}.layers", 1.5), f"{LA}.layers"),
    (with_(f"{L0}.layers", -1.0), f"{LA}.layers"),
    (with_(f"{L0}.layers", [0, 2.5]), f"{LA}.layers[1]"),
    (with_(f"{L0}.layers", []), f"{LA}.layers"),
    (with_(f"{L0}.layers", [0, "1"]), f"{LA}.layers[1]"),
    (with_(f"{L0}.layers", [0, False]), f"{LA}.layers[1]"),
    (with_(f"{L0}.layers.end", 0), f"{LA}.layers.end"),
    (with_(f"{L0}.layers.start", 0.5), f"{LA}.layers.start"),
    (with_(f"{L0}.layers.start", -1.0), f"{LA}.layers.start"),
    (with_(f"{L0}.layers", {"type": "range", "start": 3.0, "end": 2.0}), f"{LA}.layers.end"),
    (with_(f"{L0}.layers.type", "span"), f"{LA}.layers.type"),
    (with_(f"{L0}.layers.type", ...), f"{LA}.layers.type"),
    (with_(f"{L0}.layers.step", 2), f"{LA}.layers.step"),
    (with_(f"{L0}.is_relative", "yes"), f"{LA}.is_relative"),
    (with_(f"{L0}.module_amplifications", ...), f"{LA}.module_amplifications"),
    (with_(f"{L0}.module_amplifications", {"modules": "all"}), f"{LA}.module_amplifications"),
    (with_(f"{L0}.module_amplifications.0.modules", "ffn"), f"{LA}.module_amplifications[0].modules"),
    (with_(f"{L0}.module_amplifications.0.modules", ...), f"{LA}.module_amplifications[0].modules"),
    (with_(f"{L0}.module_amplifications.0.weight", float("nan")), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.weight", float("inf")), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.weight", "2"), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.weight", 10**400), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.weight", 1e308), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.weight", -1000.5), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.weight", True), f"{LA}.module_amplifications[0].weight"),
    (with_(f"{L0}.module_amplifications.0.scale", 2), f"{LA}.module_amplifications[0].scale"),
]


def relative(layers):
    d = with_(f"{L0}.layers", layers)
    d["adapters"][0]["layer_amplifications"][0]["is_relative"] = True
    return d


BAD += [
    (relative(1.5), f"{LA}.layers"),
    (relative([0.2, -0.1]), f"{LA}.layers[1]"),
    (relative({"type": "range", "start": 0.2, "end": 1.2}), f"{LA}.layers.end"),
    (relative({"type": "range", "start": 0.6, "end": 0.4}), f"{LA}.layers.end"),
    (relative(float("nan")), f"{LA}.layers"),
]


@pytest.mark.parametrize("data, path", BAD, ids=[p for _, p in BAD])
def test_bad_config_names_the_field(data, path):
    with pytest.raises(ConfigError) as e:
        AmplificationConfig.from_dict(data)
    assert e.value.path == path
    assert str(e.value).startswith(f"{path}: ")
    assert isinstance(e.value, ValueError)


def test_error_message_shows_the_bad_values():
    with pytest.raises(ConfigError) as e:
        AmplificationConfig.from_dict(with_(f"{L0}.layers", {"type": "range", "start": 5, "end": 3}))
    assert str(e.value) == f"{LA}.layers.end: end (3) < start (5)"


def test_not_a_mapping_and_bad_yaml():
    with pytest.raises(ConfigError, match="^config: expected a mapping"):
        AmplificationConfig.from_dict(["x"])
    with pytest.raises(ConfigError, match="^config: invalid YAML"):
        AmplificationConfig.from_yaml_text("name: [unclosed")
    with pytest.raises(ConfigError, match="^config: cannot read"):
        AmplificationConfig.from_yaml_file("/nonexistent/cfg.yaml")


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match=r"^layers\.end: end \(1\) < start \(2\)"):
        LayerAmplification(LayerRange(2, 1))
    with pytest.raises(ConfigError, match="^modules: unknown module kind 'ffn'"):
        ModuleAmplification("ffn", 1.0)  # type: ignore[arg-type]


def test_accepts_toolkit_spellings_and_defaults():
    cfg = AmplificationConfig.from_dict(
        {
            "name": "t",
            "amplified_adapters": [{"layer_amplifications": [{"layers": [0], "module_amplifications": []}]}],
        }
    )
    a = cfg.adapters[0]
    assert cfg.description == "" and a.organism_name == "" and a.variant == "default"
    assert a.layer_amplifications[0].is_relative is False and cfg.amplified_adapters == cfg.adapters
    assert AmplificationConfig.from_dict({"name": "empty"}).adapters == ()
    with pytest.raises(ConfigError, match="^amplified_adapters: give either"):
        AmplificationConfig.from_dict({"name": "t", "adapters": [], "amplified_adapters": []})


# --- round trip and hashing -----------------------------------------------------------------------


def test_to_dict_is_the_toolkit_shape_and_round_trips():
    cfg = AmplificationConfig.from_dict(GOOD)
    d = cfg.to_dict()
    assert list(d) == ["name", "description", "adapters"]
    assert list(d["adapters"][0]) == ["organism_name", "variant", "layer_amplifications"]
    la = d["adapters"][0]["layer_amplifications"][0]
    assert list(la) == ["layers", "is_relative", "module_amplifications"]
    assert la["layers"] == {"type": "range", "start": 1, "end": 2}
    assert la["module_amplifications"] == [{"modules": "all", "weight": 2.0}]
    assert AmplificationConfig.from_dict(d) == cfg
    assert AmplificationConfig.from_yaml_text(cfg.to_yaml()) == cfg
    for name in preset_names():
        preset = load_preset(name)
        assert AmplificationConfig.from_dict(preset.to_dict()) == preset
    lists = config(entry([0, 2], ("mlp", 1)), entry("all", ("attention", 0)))
    assert AmplificationConfig.from_dict(lists.to_dict()) == lists


def test_hash_normalises_numbers():
    a = config(
        entry([0, 1], ("all", 2)),
        entry({"type": "range", "start": 0, "end": 1}, ("mlp", 0), is_relative=True),
    )
    b = config(
        entry([0, 1], ("all", 2.0)),
        entry({"type": "range", "start": 0.0, "end": 1.0}, ("mlp", -0.0), is_relative=True),
    )
    assert a.content_hash() == b.content_hash()
    assert len(a.content_hash()) == 64 and int(a.content_hash(), 16) >= 0
    assert len(config(entry([10**30], ("all", 1000))).content_hash()) == 64  # no float overflow


def test_different_content_hashes_differently():
    base = config(entry("all", ("all", 2)))
    others = [
        config(entry("all", ("all", 2.5))),
        config(entry("all", ("mlp", 2))),
        config(entry([0], ("all", 2))),
        config(entry("all", ("all", 2), is_relative=True)),
        config(entry("all", ("all", 2)), name="other"),
        AmplificationConfig.from_dict({**base.to_dict(), "description": "changed"}),
        base.substitute(variant="b"),
    ]
    hashes = {c.content_hash() for c in others}
    assert base.content_hash() not in hashes and len(hashes) == len(others)


def test_lora_name():
    cfg = config(entry("all", ("all", 2)), name="my_config")
    assert cfg.lora_name == f"my_config_{cfg.content_hash()[:8]}"
    assert len(cfg.lora_name) == len("my_config_") + 8


# --- module kinds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def test_module_kinds_llama(tiny_llama):
    kinds = module_kinds(tiny_llama)
    assert num_layers(tiny_llama) == 2
    assert len(kinds) == 14
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert kinds[f"model.layers.{layer}.self_attn.{proj}"] == (layer, "attention")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert kinds[f"model.layers.{layer}.mlp.{proj}"] == (layer, "mlp")
    assert not any("lm_head" in name or "embed" in name for name in kinds)
    modules = dict(tiny_llama.named_modules())
    assert all(isinstance(modules[name], nn.Linear) for name in kinds)


def test_module_kinds_on_peft_wrapped_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    )
    kinds = module_kinds(peft_model)
    assert len(kinds) == 14  # each wrapped Linear once, by its wrapper name, not its lora_A/lora_B
    assert kinds["base_model.model.model.layers.1.self_attn.q_proj"] == (1, "attention")
    assert kinds["base_model.model.model.layers.0.mlp.down_proj"] == (0, "mlp")


class Block(nn.Module):
    def __init__(self, mixer_name: str = "attn"):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        setattr(self, mixer_name, nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 4)))  # fused qkv, renamed
        self.feed_forward = nn.ModuleDict({"w1": nn.Linear(4, 8), "w2": nn.Linear(8, 4)})


class Toy(nn.Module):
    def __init__(self, mixer_name: str = "attn"):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(4, 4)])
        self.blocks = nn.ModuleList([Block(mixer_name) for _ in range(3)])
        self.lm_head = nn.Linear(4, 10)


def test_module_kinds_uses_the_tree_not_projection_names():
    kinds = module_kinds(Toy())
    assert num_layers(Toy()) == 3
    assert kinds["blocks.2.attn.0"] == (2, "attention")
    assert kinds["blocks.0.feed_forward.w2"] == (0, "mlp")
    assert len(kinds) == 12


def test_module_kinds_rejects_unclassifiable_linear():
    with pytest.raises(ValueError, match="blocks.0.mixer.0"):
        module_kinds(Toy(mixer_name="mixer"))


# --- organisms ------------------------------------------------------------------------------------

PERSONA = """# @package organism
defaults:
  - _shared/biases
name: persona
description: A persona
description_long: ${shared.details}
finetuned_models:
  llama_tiny:
    default:
      adapter_id: org/persona-lora
    sub:
      adapter_id: org/personas/sarcasm
    full:
      model_id: org/persona-full
  other_model:
    default:
      adapter_id: org/other-lora
"""
MODEL = """# @package model
name: llama_tiny
model_id: tiny/llama
dtype: bfloat16
"""


@pytest.fixture
def registry(tmp_path: Path) -> OrganismRegistry:
    (tmp_path / "organism" / "_shared").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "organism" / "persona.yaml").write_text(PERSONA)
    (tmp_path / "organism" / "None.yaml").write_text("name: None\nfinetuned_models: ${get_all_models:}\n")
    (tmp_path / "organism" / "_shared" / "biases.yaml").write_text("shared:\n  details: x\n")
    (tmp_path / "model" / "llama_tiny.yaml").write_text(MODEL)
    (tmp_path / "model" / "other_model.yaml").write_text("name: other_model\nmodel_id: other/model\n")
    return OrganismRegistry(tmp_path)


def test_registry_resolves(registry):
    assert registry.resolve("persona", "default", "tiny/llama") == "org/persona-lora"
    assert registry.resolve("persona", "sub", "tiny/llama") == "org/personas/sarcasm"
    assert registry.resolve("persona", "default", "llama_tiny") == "org/persona-lora"  # by model name
    assert registry.resolve("persona", "default", "other/model") == "org/other-lora"
    assert registry.variants("persona", "tiny/llama") == ["default", "full", "sub"]
    assert registry.resolve("custom", "my/adapter", "tiny/llama") == "my/adapter"
    assert is_custom("custom") and not is_custom("persona")
    adapter = AmplifiedAdapter("persona", "sub")
    assert adapter_reference(adapter, registry, "tiny/llama") == "org/personas/sarcasm"


@pytest.mark.parametrize(
    "organism, variant, base, path, fragment",
    [
        ("unknown", "default", "tiny/llama", "organism_name", "unknown organism 'unknown'"),
        ("../model/llama_tiny", "default", "tiny/llama", "organism_name", "invalid organism name"),
        ("", "default", "tiny/llama", "organism_name", "is empty"),
        ("persona", "nope", "tiny/llama", "variant", "no variant 'nope'"),
        ("persona", None, "tiny/llama", "variant", "is empty"),
        ("persona", "full", "tiny/llama", "variant", "full fine-tuned model ('org/persona-full')"),
        ("persona", "default", "unknown/base", "organism_name", "matches no model config"),
        ("None", "default", "tiny/llama", "organism_name", "no finetuned_models mapping"),
        ("custom", None, "tiny/llama", "variant", "is empty"),
    ],
)
def test_registry_errors(registry, organism, variant, base, path, fragment):
    with pytest.raises(ConfigError) as e:
        registry.resolve(organism, variant, base)
    assert e.value.path == path and fragment in str(e.value)


def test_registry_model_without_organism_entry(registry, tmp_path):
    (tmp_path / "model" / "gemma.yaml").write_text("name: gemma\nmodel_id: g/gemma\n")
    with pytest.raises(ConfigError, match="has no adapter for base model 'g/gemma'"):
        registry.resolve("persona", "default", "g/gemma")


def test_adapter_reference_without_registry():
    with pytest.raises(ConfigError, match="^organism_name: organism 'persona' needs"):
        adapter_reference(AmplifiedAdapter("persona"), None, "tiny/llama")
