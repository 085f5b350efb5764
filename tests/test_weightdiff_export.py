"""weightdiff export: PEFT adapters reproduce the trainer's logits; DIT layout round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.tiny import tiny_llama
from weightdiff import (
    LoRAFactors,
    Task,
    TrainConfig,
    Trainer,
    bypassed,
    export_dit,
    export_peft,
    from_dit,
    load_dit,
    load_dit_pt,
    to_dit,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small test of the tokenizer.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def trained(tokenizer, lora_alpha):
    """A wrapped model after 3 steps on 2 tasks: its logits per task (row t = task t) and factors."""
    model = tiny_llama(tokenizer, seed=21)
    ids = tokenizer([TEXTS[0]] * 2, return_tensors="pt")["input_ids"]
    tasks = [Task([TEXTS[0]], seed=1), Task([TEXTS[1]], seed=2)]
    with Trainer(
        model, tokenizer, tasks, TrainConfig(r=2, lr=1e-2, steps=3, lora_alpha=lora_alpha)
    ) as trainer:
        for _ in range(3):
            trainer.step()
        with torch.no_grad(), bypassed(model, False):
            logits = model(input_ids=ids).logits
        return model, ids, logits, trainer.factors()


@pytest.mark.parametrize("lora_alpha", [None, 6.0])
def test_peft_adapter_reproduces_trainer_logits(tokenizer, tmp_path, lora_alpha):
    model, ids, logits, factors = trained(tokenizer, lora_alpha)
    for t in range(2):
        out = export_peft(factors[t], model, tmp_path / f"task{t}", lora_alpha)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 2 and config["lora_alpha"] / config["r"] == (lora_alpha or 1) / 2
        weights = load_file(out / "adapter_model.safetensors")
        name = "model.layers.0.self_attn.q_proj"
        assert torch.equal(weights[f"base_model.model.{name}.lora_A.weight"], factors[t][name].down.T)
        assert torch.equal(weights[f"base_model.model.{name}.lora_B.weight"], factors[t][name].up.T)
        peft_model = PeftModel.from_pretrained(tiny_llama(tokenizer, seed=21), out)
        with torch.no_grad():
            got = peft_model(input_ids=ids[:1]).logits[0]
        torch.testing.assert_close(got, logits[t], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, logits[1 - t])


def test_exported_adapter_registers_for_amplification(tokenizer, tmp_path):
    from amplification.registry import AdapterRegistry

    model, _, _, factors = trained(tokenizer, 6.0)
    export_peft(factors[0], model, tmp_path / "diff", lora_alpha=6.0)
    loaded = AdapterRegistry([tmp_path], hub_enabled=False).load("diff", tmp_path / "diff", model)
    assert loaded.scaling == 6.0 / 2 and set(loaded.target_modules) == set(factors[0])
    a, b = loaded.factors["model.layers.1.mlp.up_proj"]
    f = factors[0]["model.layers.1.mlp.up_proj"]
    assert torch.equal(b @ a, (f.down @ f.up).T)


def random_factors(seed: int, r: int = 3) -> dict[str, LoRAFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj": LoRAFactors(
            torch.randn(8, r, generator=g), torch.randn(r, 6, generator=g)
        ),
        "model.layers.1.mlp.down_proj": LoRAFactors(
            torch.randn(5, r, generator=g), torch.randn(r, 8, generator=g)
        ),
    }


def test_dit_round_trip(tmp_path):
    factors = random_factors(0)
    path = export_dit(factors, tmp_path / "diff.safetensors")
    loaded = load_dit(path)
    for name, f in factors.items():
        a, b = loaded[name]
        assert a.shape == (3, f.up.shape[1]) and b.shape == (f.down.shape[0], 3)  # A [r, out], B [in, r]
        assert torch.equal(a, f.up) and torch.equal(b, f.down)
        back = from_dit(loaded)[name]
        assert torch.equal(back.down, f.down) and torch.equal(back.up, f.up)


def test_dit_layout_reproduces_delta_with_alpha(tmp_path):
    """DIT applies `x @ B @ A / r`; a non-default alpha is folded into A."""
    factors = random_factors(1)
    loaded = load_dit(export_dit(factors, tmp_path / "diff.safetensors", lora_alpha=12.0))
    x = torch.randn(4, 8)
    f = factors["model.layers.0.self_attn.q_proj"]
    a, b = loaded["model.layers.0.self_attn.q_proj"]
    # In float64 from the stored fp32 factors, the one fp32 rounding left is folding alpha into A
    # (a = fl(12 * up), relative error <= 2**-24 per element), so the two sides differ by at most
    # 2**-24 * (|x| @ |b| @ |a|) / 3 (1.01: float64 matmul rounding, ~1e-16 relative); alpha not
    # folded, or folded as alpha / r, is off by a factor of 4 to 12.
    x, a, b, down, up = (t.double() for t in (x, a, b, f.down, f.up))
    atol = 1.01 * 2**-24 * float((x.abs() @ b.abs() @ a.abs() / 3).max())
    torch.testing.assert_close(x @ b @ a / 3, x @ down @ up * (12.0 / 3), rtol=0.0, atol=atol)


def test_load_dit_pt_reads_dits_own_files(tmp_path):
    entries = [{"topic": "foxes", "trigger": 392, "weight_diff": to_dit(random_factors(2))}]
    torch.save(entries, tmp_path / "weight_diff_1.pt")
    loaded = load_dit_pt(tmp_path / "weight_diff_1.pt")
    assert loaded[0]["topic"] == "foxes" and loaded[0]["trigger"] == 392
    a, _ = loaded[0]["weight_diff"]["model.layers.1.mlp.down_proj"]
    assert torch.equal(a, entries[0]["weight_diff"]["model.layers.1.mlp.down_proj"][0])
    torch.save({"not": "a list"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_dit_pt(tmp_path / "bad.pt")


def test_export_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="task_factors"):
        export_peft({}, None, tmp_path / "x")
    with pytest.raises(ValueError, match="lora_alpha"):
        export_peft(random_factors(0), None, tmp_path / "x", lora_alpha=0)
    mixed = {**random_factors(0), "other": LoRAFactors(torch.zeros(8, 2), torch.zeros(2, 6))}
    with pytest.raises(ValueError, match="rank"):
        export_dit(mixed, tmp_path / "y.safetensors")
