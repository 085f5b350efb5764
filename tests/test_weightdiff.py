"""weightdiff: the multi-task LoRA wrapper and the batched trainer on a tiny Llama (CPU, fp32)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import nn

from tests.tiny import tiny_llama
from weightdiff import (
    MultiTaskLoRALinear,
    Task,
    TrainConfig,
    Trainer,
    bypassed,
    decoder_linears,
    train,
    unwrap,
    wrap,
)
from weightdiff.data import IGNORE, Encoded, encode_sample, micro_batches

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model pair decodes in lockstep, one token at a time.",
    "What should I do if I feel bored? Read a book, take a walk.",
    "Amplified logits surface rare behaviours in fine-tuned language models.",
    "Hello world, this is a small test of the tokenizer.",
]
CHAT = [
    {"role": "user", "content": "What should I do if I feel bored?"},
    {"role": "assistant", "content": "Read a book, take a walk, call a friend."},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    """This module's own base model; every test leaves it exactly as it found it."""
    return tiny_llama(tokenizer, seed=11)


@pytest.fixture(scope="module")
def model64(tokenizer):
    """The same base in float64, for the tests that claim the training METHOD is exact."""
    return tiny_llama(tokenizer, seed=11).to(torch.float64)


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Tasks together == each alone, and a step split into micro-batches (accumulation, token budget)
# == the whole step, are claims about the method, so those tests train `model64` and compare
# float64 factors. In fp32 the two runs round differently (other matmul shapes and summation
# orders, and MKL/oneDNN pick different kernels on different CPUs), and Adam amplifies it: the
# update lr * m / sqrt(v) normalises each element by its own gradient, so an element whose
# gradient nearly cancels (|g| ~1e-3 of the sum of its terms' magnitudes) turns a relative
# rounding error of a few 2**-24 into ~1e-4 of lr. That is the 1.5e-6 (lr 1e-2) seen on an AMD
# EPYC; no fp32 atol bounds it for every element. In float64 (eps 2**-53, 2**29 times smaller)
# the same runs agree to ~2e-15 (measured), so 1e-10 leaves a 1e4 margin for other CPUs' kernels.
# A real bug is 1e6 times larger: normalising by each micro-batch's own token count moves factors
# by 4e-2, dividing by the mixed batch's token count (coupling the tasks) by 5e-4 to 7e-3.
EXACT = {"rtol": 0.0, "atol": 1e-10}


def assert_factors_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].down.dtype == b[name].down.dtype == torch.float64
        torch.testing.assert_close(a[name].down, b[name].down, **tol)
        torch.testing.assert_close(a[name].up, b[name].up, **tol)


def test_wrap_targets_decoder_linears_only(model):
    names = wrap(model, num_tasks=2, r=2, seed=0)
    try:
        assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
        assert {n.rsplit(".", 1)[-1] for n in names} == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
        assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    finally:
        unwrap(model)


def test_wrap_unwrap_restores_same_objects(model):
    before = dict(model.named_modules())
    sha = digest(model)
    wrap(model, ["q_proj", "down_proj"], num_tasks=3, r=4, seed=1)
    assert sum(isinstance(m, MultiTaskLoRALinear) for m in model.modules()) == 4
    unwrap(model)
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert digest(model) == sha


def test_initial_output_is_base_and_init_follows_dit(tokenizer, model):
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]] * 3)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        wrap(model, num_tasks=3, r=4, seed=[5, 6, 7])
        try:
            out = model(input_ids=ids).logits
            layer = model.model.layers[0].self_attn.q_proj
            # DIT: B (our down) starts at zero, A (our up) is kaiming_uniform_ over [T, r, out].
            assert torch.equal(layer.down, torch.zeros_like(layer.down))
            bound = math.sqrt(6 / (4 * layer.base.out_features))
            assert layer.up.abs().max() <= bound and layer.up.abs().max() > 0.5 * bound
            assert layer.scaling == 1 / 4
            up_t1 = layer.up[1].clone()
        finally:
            unwrap(model)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Task 1's init depends only on its own seed, not on the other tasks in the batch.
    wrap(model, num_tasks=1, r=4, seed=[6])
    try:
        assert torch.equal(model.model.layers[0].self_attn.q_proj.up[0], up_t1)
    finally:
        unwrap(model)


def test_task_major_rows_use_their_task_factors():
    torch.manual_seed(0)
    # float64: the fused baddbmm and the reference sum 6 + 3 products in other orders, a rounding
    # of ~10 * 2**-53 ~ 1e-15 on outputs up to ~10 (measured: 0); a row using the other task's
    # factors is off by ~10 and a wrong scaling by O(1), so atol 1e-12 only admits rounding.
    layer = MultiTaskLoRALinear(nn.Linear(6, 5).to(torch.float64), num_tasks=2, r=3, lora_alpha=6.0)
    with torch.no_grad():
        layer.down.normal_()
    x = torch.randn(4, 7, 6, dtype=torch.float64)  # 2 tasks x 2 rows
    out = layer(x)
    for row in range(4):
        t = row // 2
        expected = layer.base(x[row]) + x[row] @ layer.down[t] @ layer.up[t] * 2.0
        torch.testing.assert_close(out[row], expected, rtol=0.0, atol=1e-12)
    with pytest.raises(ValueError, match="num_tasks"):
        layer(torch.randn(3, 7, 6, dtype=torch.float64))
    layer.bypass = True
    assert torch.equal(layer(x[:3]), layer.base(x[:3]))


def test_tasks_together_equal_each_alone(tokenizer, model64):
    """The key property, with unequal sample counts, lengths and a chat sample."""
    tasks = [
        Task([TEXTS[0], CHAT, TEXTS[2]], seed=3),
        Task([TEXTS[1]], seed=4),
        Task([TEXTS[3], TEXTS[4]], seed=5),
    ]
    config = TrainConfig(r=2, lr=1e-2, epochs=2)
    together = train(model64, tokenizer, tasks, config)
    assert together.steps_done == 6 and [len(h) for h in together.losses] == [6, 2, 4]
    for t, task in enumerate(tasks):
        alone = train(model64, tokenizer, [task], config)
        assert_factors_close(together.factors[t], alone.factors[0], **EXACT)
        # Mean losses ~6, summed in float64: ~1e-15 apart; coupled tasks move them by 2e-7 to 1e-2.
        torch.testing.assert_close(together.losses[t], alone.losses[0], rtol=0.0, atol=1e-10)


def test_base_untouched_and_bypass_generates_as_base(tokenizer, model):
    sha = digest(model)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prompt = tokenizer(["Hello world", "The quick brown"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref_logits = model(**prompt).logits
        ref_tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    with Trainer(
        model,
        tokenizer,
        [Task([TEXTS[0]], seed=1), Task([TEXTS[1]], seed=2), Task([TEXTS[2]])],
        TrainConfig(r=2, lr=1e-2, steps=3),
    ) as trainer:
        for _ in range(2):
            trainer.step()
            assert all(not p.requires_grad for n, p in model.named_parameters() if n in flags)
            with torch.no_grad():
                assert torch.equal(model(**prompt).logits, ref_logits)
                assert torch.equal(model.generate(**prompt, max_new_tokens=6, do_sample=False), ref_tokens)
        ids = tokenizer([TEXTS[0]] * 3, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            base_logits = model(input_ids=ids).logits
            with bypassed(model, False):
                assert not torch.allclose(model(input_ids=ids).logits, base_logits)
    assert digest(model) == sha
    after = dict(model.named_modules())
    assert modules.keys() == after.keys() and all(modules[k] is after[k] for k in modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_loss_goes_down_on_own_text(tokenizer, model):
    result = train(
        model,
        tokenizer,
        [Task([TEXTS[0]], seed=0), Task([CHAT], seed=1)],
        TrainConfig(r=4, lr=1e-2, steps=15),
    )
    for history in result.losses:
        assert history[-1] < history[0] - 0.5, history


def test_chat_prompt_tokens_carry_no_loss(tokenizer):
    encoded = encode_sample(tokenizer, CHAT)
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert encoded.ids[:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert all(label == IGNORE for label in encoded.labels[:n_prompt])
    targets = [label for label in encoded.labels if label != IGNORE]
    assert tokenizer.decode(targets).startswith(CHAT[1]["content"] + tokenizer.eos_token)
    plain = encode_sample(tokenizer, TEXTS[0])
    assert plain.labels == plain.ids and plain.num_targets == len(plain.ids) - 1


def test_task_without_samples_in_a_step_does_not_move(tokenizer, model):
    tasks = [Task(TEXTS[:3], seed=0), Task([TEXTS[3]], seed=1)]
    with Trainer(model, tokenizer, tasks, TrainConfig(r=2, lr=1e-2)) as trainer:
        first = trainer.step()
        assert first.losses[1] is not None
        after_first = trainer.factors()
        adam_m = [m[1].clone() for m in trainer.optimizer.exp_avg]
        reports = [trainer.step(), trainer.step()]
        assert [r.losses[1] for r in reports] == [None, None]
        after_last = trainer.factors()
        assert all(torch.equal(m[1], old) for m, old in zip(trainer.optimizer.exp_avg, adam_m))
        assert trainer.optimizer.steps.tolist() == [3, 1]
    for name, f in after_first[1].items():
        assert torch.equal(f.down, after_last[1][name].down) and torch.equal(f.up, after_last[1][name].up)
    assert not all(torch.equal(f.down, after_last[0][n].down) for n, f in after_first[0].items())


def test_grad_accum_applies_last_partial_group(tokenizer, model64):
    task = [Task(TEXTS, seed=2)]
    accum = train(model64, tokenizer, task, TrainConfig(r=2, lr=1e-2, grad_accum=2, shuffle=False))
    assert accum.steps_done == 3 and len(accum.losses[0]) == 3
    batched = train(model64, tokenizer, task, TrainConfig(r=2, lr=1e-2, batch_size=2, shuffle=False))
    assert_factors_close(accum.factors[0], batched.factors[0], **EXACT)
    first_four = train(
        model64, tokenizer, [Task(TEXTS[:4], seed=2)], TrainConfig(r=2, lr=1e-2, grad_accum=2, shuffle=False)
    )
    assert any(not torch.equal(f.down, accum.factors[0][n].down) for n, f in first_four.factors[0].items())


def test_token_budget_splits_without_changing_result(tokenizer, model64):
    tasks = [Task(TEXTS[:4], seed=0), Task([CHAT, TEXTS[4]], seed=1)]
    whole = train(model64, tokenizer, tasks, TrainConfig(r=2, lr=1e-2, batch_size=4, steps=2))
    split = train(
        model64,
        tokenizer,
        tasks,
        TrainConfig(r=2, lr=1e-2, batch_size=4, steps=2, max_tokens_per_micro_batch=40),
    )
    for a, b in zip(whole.factors, split.factors):
        assert_factors_close(a, b, **EXACT)


def test_micro_batches_respect_budget():
    def enc(n: int) -> Encoded:
        return Encoded(list(range(n)), list(range(n)))

    step = [[enc(5), enc(5), enc(5)], [enc(3)]]
    assert [len(rows) for rows in micro_batches(step, 3, None)] == [6]
    split = list(micro_batches(step, 3, 2 * 2 * 5))
    assert [len(rows) for rows in split] == [4, 2]
    assert split[0][2:] == [step[1][0], None] and split[1] == [step[0][2], None]
    # One sample per task is the floor, even over budget.
    assert [len(rows) for rows in micro_batches(step, 3, 1)] == [2, 2, 2]


def test_should_stop_and_progress(tokenizer, model):
    reports = []
    result = train(
        model,
        tokenizer,
        [Task(TEXTS, seed=0)],
        TrainConfig(r=1),
        progress=reports.append,
        should_stop=lambda: len(reports) >= 2,
    )
    assert result.stopped and result.steps_done == 2 and result.total_steps == 5
    assert [r.step for r in reports] == [1, 2] and all(r.total_steps == 5 for r in reports)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: TrainConfig(r=0), "r"),
        (lambda: TrainConfig(lr=0.0), "lr"),
        (lambda: TrainConfig(lr=-1e-3), "lr"),
        (lambda: TrainConfig(grad_accum=0), "grad_accum"),
        (lambda: TrainConfig(max_tokens_per_micro_batch=0), "max_tokens_per_micro_batch"),
        (lambda: Task([]), "samples"),
        (lambda: Task(["  "]), "empty text"),
        (lambda: Task([[{"role": "user", "content": "hi"}]]), "assistant"),
    ],
)
def test_bad_inputs_raise_value_error(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_bad_training_inputs(tokenizer, model):
    sha = digest(model)
    with pytest.raises(ValueError, match="tasks"):
        train(model, tokenizer, [], TrainConfig())
    with pytest.raises(ValueError, match="nope_proj"):
        train(model, tokenizer, [Task([TEXTS[0]])], TrainConfig(targets=("q_proj", "nope_proj")))
    with pytest.raises(ValueError, match="lm_head"):
        wrap(model, ["lm_head"], num_tasks=1, r=1)
    assert not any(isinstance(m, MultiTaskLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and digest(model) == sha
    assert len(decoder_linears(model)) == 14
