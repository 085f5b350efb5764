"""Stage-1 losses: sample objects with `loss` (`ce` | `kl_base`) and `weight`, on a tiny Llama (CPU).

`kl_base` is the forward KL from the frozen base (the same model with the task's LoRA bypassed) to
base + the task's diff, on the positions CE uses; a sample's weight multiplies its token losses and
a task's step loss is `sum_i w_i * sum_p l_i(p) / sum_i |P_i|` (weightdiff/train.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_weightdiff import CHAT, EXACT, TEXTS, assert_factors_close
from tests.tiny import tiny_llama
from weightdiff import Task, TrainConfig, Trainer, bypassed, train
from weightdiff.data import IGNORE, collate, encode_sample
from weightdiff.lora import wrappers
from weightdiff.train import ForwardKL, kl_positions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, seed=11)


@pytest.fixture(scope="module")
def model64(tokenizer):
    """float64 for the claims about the method (see EXACT in tests/test_weightdiff.py)."""
    return tiny_llama(tokenizer, seed=11).to(torch.float64)


def kl(text_or_messages, weight: float = 1.0) -> dict:
    key = "text" if isinstance(text_or_messages, str) else "messages"
    return {key: text_or_messages, "loss": "kl_base", "weight": weight}


def mixed_tasks() -> list[Task]:
    """CE and KL samples, chat and text, weights, unequal counts, and a KL-only task."""
    return [
        Task([TEXTS[0], kl(CHAT, 5.0), kl(TEXTS[2])], seed=3),
        Task([kl(TEXTS[1])], seed=4),
        Task([{"messages": CHAT, "weight": 0.5}, kl(TEXTS[3], 2.0), TEXTS[4]], seed=5),
    ]


def max_diff(a, b) -> float:
    return max((a[n].down - b[n].down).abs().max().item() for n in a)


def test_forward_kl_value_and_gradient():
    """The value is F.kl_div's; the gradient is checked by finite differences (float64)."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    teacher_logp = torch.log_softmax(torch.randn(3, 7, dtype=torch.float64, generator=gen), -1)
    expected = F.kl_div(torch.log_softmax(student, -1), teacher_logp, reduction="none", log_target=True)
    assert torch.equal(ForwardKL.apply(student, teacher_logp), expected.sum(-1))
    assert torch.autograd.gradcheck(ForwardKL.apply, (student, teacher_logp))


def test_forward_kl_gradient_is_exactly_zero_at_equal_logits():
    """Autograd through log_softmax leaves ~1e-7 here (it uses the computed sum of p, not 1), and
    Adam would turn that into an lr-sized step off the base; ForwardKL's gradient is 0 exactly."""
    logits = (torch.randn(8, 50_000, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    value = ForwardKL.apply(logits, torch.log_softmax(logits.detach(), -1))
    value.sum().backward()
    assert torch.equal(value, torch.zeros(8)) and torch.equal(logits.grad, torch.zeros_like(logits))


def test_kl_positions_are_the_ce_positions(tokenizer):
    """Logits at p count when token p+1 is a target, as for CE (DIT's unshifted mask is off by one)."""
    rows = [encode_sample(tokenizer, kl(CHAT)), encode_sample(tokenizer, TEXTS[0])]
    assert rows[0].loss == "kl_base" and rows[1].loss == "ce"
    assert rows[0].labels == encode_sample(tokenizer, CHAT).labels  # same completion tokens as CE
    _, _, labels = collate(rows, 0, torch.device("cpu"))
    positions = kl_positions(labels, torch.tensor([True, False]))
    targets = [p for p, label in enumerate(rows[0].labels) if label != IGNORE]
    assert positions[0].nonzero().squeeze(1).tolist() == [p - 1 for p in targets]
    assert int(positions[0].sum()) == rows[0].num_targets and not positions[1].any()
    assert not torch.equal(positions[0], labels[0, :-1] != IGNORE)  # DIT's mask, not copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_is_exactly_zero_at_init_and_a_kl_only_task_stays_there(tokenizer, dtype):
    model = tiny_llama(tokenizer, seed=11, dtype=dtype)
    tasks = [Task([kl(CHAT), kl(TEXTS[0], 5.0)], seed=1), Task([TEXTS[1], kl(TEXTS[2])], seed=2)]
    with Trainer(model, tokenizer, tasks, TrainConfig(r=2, lr=1e-2, batch_size=2, steps=3)) as trainer:
        ids = torch.tensor([encode_sample(tokenizer, TEXTS[0]).ids] * 2)
        with torch.no_grad():
            base = model(input_ids=ids).logits  # between steps the LoRA is bypassed
        with bypassed(model, False):
            student = model(input_ids=ids).logits
        assert student.requires_grad and torch.equal(student, base)  # down is zero at init
        init = trainer.factors()
        reports = [trainer.step() for _ in range(3)]
        assert [r.losses[0] for r in reports] == [0.0, 0.0, 0.0]
        # Zero gradient: Adam's first moment of task 0 is still exactly zero after three steps.
        assert all(torch.equal(m[0], torch.zeros_like(m[0])) for m in trainer.optimizer.exp_avg)
        after = trainer.factors()
    for name, f in after[0].items():
        assert torch.equal(init[0][name].down, f.down) and torch.equal(init[0][name].up, f.up)
    assert max_diff(init[1], after[1]) > 1e-3  # the mixed task learns (its CE sample)


def test_step_loss_and_gradient_match_the_formula(tokenizer, model64):
    """L_t = sum_i w_i sum_p l_i(p) / sum_i |P_i|, computed here sample by sample without padding.

    float64: the trainer's padded batch and these unpadded forwards round differently, a few
    2**-53 on losses ~5 and gradients <1 (measured: 4e-16 and 2e-16), so 1e-10 admits only
    rounding. A dropped weight or a weighted normaliser scales a loss by O(1); DIT's unshifted mask
    takes the KL at other positions. The gradient is read back from Adam's first moment.
    """
    tasks = [
        Task([{"text": TEXTS[0], "weight": 2.0}, kl(CHAT, 0.5)], seed=3),
        Task([kl(TEXTS[1]), TEXTS[2]], seed=4),
    ]
    config = TrainConfig(r=2, lr=1e-2, batch_size=2, steps=1, shuffle=False)
    with Trainer(model64, tokenizer, tasks, config) as trainer:
        gen = torch.Generator().manual_seed(0)
        params = [p for m in wrappers(model64).values() for p in (m.down, m.up)]
        with torch.no_grad():  # move off init so the KL is not zero
            for m in wrappers(model64).values():
                m.down.copy_(torch.randn(m.down.shape, generator=gen, dtype=torch.float64) * 0.3)
        expected = [expected_loss(model64, tokenizer, t, task, len(tasks)) for t, task in enumerate(tasks)]
        grads = torch.autograd.grad(sum(expected), params)
        report = trainer.step()
        # Adam's first moment after one step is (1 - beta1) * gradient.
        seen = [m / (1 - config.betas[0]) for m in trainer.optimizer.exp_avg]
    assert all(e.item() > 0.5 for e in expected)
    torch.testing.assert_close(list(report.losses), [e.item() for e in expected], rtol=0.0, atol=1e-10)
    for g, s in zip(grads, seen, strict=True):
        torch.testing.assert_close(s, g, rtol=1e-9, atol=1e-10)


def expected_loss(model, tokenizer, t: int, task: Task, num_tasks: int) -> torch.Tensor:
    total, count = 0.0, 0
    for sample in task.samples:
        enc = encode_sample(tokenizer, sample)
        ids = torch.tensor([enc.ids] * num_tasks)  # row t runs through task t's factors
        with bypassed(model, False):
            student = model(input_ids=ids).logits[t, :-1]
        with bypassed(model, True), torch.no_grad():
            base = model(input_ids=ids).logits[t, :-1]
        targets = torch.tensor(enc.labels[1:])
        at = targets != IGNORE
        if enc.loss == "ce":
            loss = F.cross_entropy(student[at], targets[at], reduction="sum")
        else:
            s, b = torch.log_softmax(student[at], -1), torch.log_softmax(base[at], -1)
            loss = F.kl_div(s, b, log_target=True, reduction="sum")
        total, count = total + enc.weight * loss, count + int(at.sum())
    return total / count


def test_tasks_together_equal_each_alone_with_kl(tokenizer, model64):
    config = TrainConfig(r=2, lr=1e-2, epochs=3)
    together = train(model64, tokenizer, mixed_tasks(), config)
    assert together.losses[1] == [0.0] * 3  # KL-only: stays at the base
    for t, task in enumerate(mixed_tasks()):
        alone = train(model64, tokenizer, [task], config)
        assert_factors_close(together.factors[t], alone.factors[0], **EXACT)
        torch.testing.assert_close(together.losses[t], alone.losses[0], rtol=0.0, atol=1e-10)


def test_micro_batches_do_not_change_the_step_with_kl(tokenizer, model64):
    """Accumulation and a token budget give the whole step's gradient, and the KL does matter."""
    whole = train(model64, tokenizer, mixed_tasks(), TrainConfig(r=2, lr=1e-2, batch_size=3, steps=3))
    for split in (
        TrainConfig(r=2, lr=1e-2, batch_size=3, steps=3, max_tokens_per_micro_batch=40),
        TrainConfig(r=2, lr=1e-2, batch_size=1, grad_accum=3, steps=3),
    ):
        result = train(model64, tokenizer, mixed_tasks(), split)
        for a, b in zip(whole.factors, result.factors):
            assert_factors_close(a, b, **EXACT)
    # The same job with the KL samples at weight 0 (same normaliser, no KL gradient) moves elsewhere.
    no_kl = [Task([without_kl(s) for s in task.samples], seed=task.seed) for task in mixed_tasks()[::2]]
    other = train(model64, tokenizer, no_kl, TrainConfig(r=2, lr=1e-2, batch_size=3, steps=3))
    assert max_diff(whole.factors[0], other.factors[0]) > 1e-4


def without_kl(sample):
    is_kl = isinstance(sample, dict) and sample.get("loss") == "kl_base"
    return sample | {"weight": 0.0} if is_kl else sample


def test_ce_sample_objects_are_plain_samples_bit_for_bit(tokenizer, model):
    config = TrainConfig(r=2, lr=1e-2, batch_size=2, steps=2)
    plain = train(model, tokenizer, [Task([TEXTS[0], CHAT], seed=1)], config)
    objects = [{"text": TEXTS[0]}, {"messages": CHAT, "loss": "ce", "weight": 1}]
    same = train(model, tokenizer, [Task(objects, seed=1)], config)
    assert plain.losses == same.losses
    for name, f in plain.factors[0].items():
        assert torch.equal(f.down, same.factors[0][name].down) and torch.equal(f.up, same.factors[0][name].up)


def test_base_forward_only_for_micro_batches_with_kl(tokenizer, model):
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        tasks = [Task([TEXTS[0], kl(TEXTS[1])]), Task([TEXTS[2], TEXTS[3]])]
        with Trainer(model, tokenizer, tasks, TrainConfig(grad_accum=2, shuffle=False)) as trainer:
            trainer.step()
    finally:
        hook.remove()
    assert len(calls) == 3  # micro-batch 1 (CE, CE): 1 forward; micro-batch 2 (KL, CE): 2


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (
            [{"text": "x", "loss": "mse"}],
            r"samples\[0\]\.loss: expected one of \['ce', 'kl_base'\], got 'mse'",
        ),
        ([{"text": "x", "loss": None}], r"samples\[0\]\.loss"),
        ([{"text": "x", "weight": -1.0}], r"samples\[0\]\.weight: .* got -1\.0"),
        ([{"text": "x", "weight": float("nan")}], r"samples\[0\]\.weight: .* got nan"),
        ([{"text": "x", "weight": float("inf")}], r"samples\[0\]\.weight"),
        ([{"text": "x", "weight": 10**400}], r"samples\[0\]\.weight"),
        ([{"text": "x", "weight": True}], r"samples\[0\]\.weight"),
        ([{"text": "x", "weight": "1"}], r"samples\[0\]\.weight"),
        (["x", {"text": "y", "weight": 0}], None),
        ([{"text": "x", "weight": 0}, {"text": "y", "weight": 0.0}], "every sample has weight 0"),
        ([{"text": "x", "messages": CHAT}], "exactly one of 'text' and 'messages'"),
        ([{"loss": "ce"}], "exactly one of 'text' and 'messages'"),
        ([{"text": "x", "lossy": "ce"}], r"unknown fields \['lossy'\]"),
        ([{"text": CHAT}], r"samples\[0\]\.text: expected text"),
        ([{"text": " "}], r"samples\[0\]\.text: empty text"),
        ([{"messages": "hi"}], r"samples\[0\]\.messages: expected a list"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], r"samples\[0\]\.messages: .*assistant"),
    ],
)
def test_bad_sample_objects_raise_value_error(samples, message):
    if message is None:
        Task(samples)  # a weight-0 sample is fine beside one that learns
        return
    with pytest.raises(ValueError, match=message):
        Task(samples)
