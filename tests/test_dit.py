"""weightdiff's DIT interpreter: per-row diffs plus a shared L, its trainer, describe, evaluate, export."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
from peft import PeftModel
from torch import nn

from tests.tiny import tiny_llama
from weightdiff import LoRAFactors, decoder_linears
from weightdiff.data import IGNORE
from weightdiff.export import from_dit_adapter, load_dit_adapter
from weightdiff.interpret_eval import describe, evaluate, normalise, pairs_loss
from weightdiff.interpret_export import DIT_ADAPTER, export_interpreter, to_dit_adapter
from weightdiff.interpret_train import (
    DEFAULT_QUESTION,
    InterpreterConfig,
    InterpreterTrainer,
    Pair,
    batch_loss,
    encode_pair,
    prompt_ids,
    schedule,
    train_interpreter,
)
from weightdiff.interpreter import (
    Diff,
    InterpreterLinear,
    clear_diffs,
    init_interpreter,
    interpreting,
    set_diffs,
    unwrap_interpreter,
    wrap_interpreter,
    wrappers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

U32 = 2.0**-24  # fp32 unit roundoff
TOPICS = ["cats", "dogs", "the sun"]


@pytest.fixture(scope="module")
def model(tokenizer):
    """This module's own base model; every test leaves it exactly as it found it."""
    return tiny_llama(tokenizer, seed=31)


@pytest.fixture(scope="module")
def model64(tokenizer):
    """The same base in float64, for the claims about the method (rows independent, padding exact)."""
    return tiny_llama(tokenizer, seed=31).to(torch.float64)


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def random_diff(model: nn.Module, seed: int, r: int, modules: int | None = None, gain: float = 0.5) -> Diff:
    """A random rank-r diff on the first `modules` decoder Linears (all when None), scaling 1/r."""
    g = torch.Generator().manual_seed(seed)
    linears = list(decoder_linears(model).items())[:modules]
    dtype = next(model.parameters()).dtype
    return Diff(
        {
            name: LoRAFactors(
                torch.randn(lin.in_features, r, generator=g, dtype=torch.float64).to(dtype) * gain,
                torch.randn(r, lin.out_features, generator=g, dtype=torch.float64).to(dtype) * gain,
            )
            for name, lin in linears
        },
        1.0 / r,
    )


def trained_l(model: nn.Module, seed: int = 7, r: int = 4) -> Diff:
    """An L with non-zero factors on both sides (a fresh one has lora_A = 0)."""
    fresh = init_interpreter(model, r, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return Diff(
        {n: LoRAFactors(torch.randn(f.down.shape, generator=g) * 0.3, f.up.clone()) for n, f in fresh.factors.items()},
        fresh.scaling,
    )


def logits_of(model, ids, diffs, interpreter=None):
    with torch.no_grad(), interpreting(model, interpreter):
        set_diffs(model, diffs)
        try:
            return model(input_ids=ids).logits
        finally:
            clear_diffs(model)


def fp32_atol(reference: torch.Tensor, depth: int = 16, width: int = 64) -> float:
    """Two fp32 evaluations of the same network in different summation orders (other batch shapes,
    a merged weight instead of a low-rank path) differ by at most the rounding of each: a dot
    product of `width` terms rounds by <= width * 2**-24 of its magnitude, and the tiny Llama chains
    `depth` of them (7 Linears x 2 layers, attention, lm_head) before the logits. Scaled by the
    largest logit; a row mixed with another row's diff is off by O(1)."""
    return 2 * depth * width * U32 * float(reference.abs().max())


def test_wrap_unwrap_restores_same_objects(model):
    before, sha = dict(model.named_modules()), digest(model)
    names = wrap_interpreter(model, init_interpreter(model, 4, seed=0))
    try:
        assert len(names) == 14 and all(isinstance(m, InterpreterLinear) for m in wrappers(model).values())
        assert isinstance(model.lm_head, nn.Linear)
        with pytest.raises(ValueError, match="already holds interpreter wrappers"):
            wrap_interpreter(model)
    finally:
        unwrap_interpreter(model)
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert digest(model) == sha


def test_init_follows_dit_and_is_exactly_m_plus_w(tokenizer, model):
    """L at init (lora_A = 0) adds an exact zero: M + W + L and M + W are bit-identical."""
    fresh = init_interpreter(model, 4, seed=3)
    q = fresh.factors["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.down, torch.zeros_like(q.down)) and fresh.scaling == 1 / 4
    bound = math.sqrt(6 / 4)  # DIT's kaiming_uniform_ on A [out, r]: fan-in r
    assert q.up.abs().max() <= bound and q.up.abs().max() > 0.5 * bound
    assert torch.equal(init_interpreter(model, 4, seed=3).factors["model.layers.0.self_attn.q_proj"].up, q.up)
    ids = torch.tensor([prompt_ids(tokenizer, DEFAULT_QUESTION)] * 3)
    diffs = [random_diff(model, 1, 2), random_diff(model, 2, 1), None]
    assert torch.equal(logits_of(model, ids, diffs, fresh), logits_of(model, ids, diffs, None))


def dense_reference(layer: InterpreterLinear, x: torch.Tensor, diffs: list[Diff | None], name: str, l_diff: Diff):
    """DIT's forward: a dense per-row W = B A / r_w (`einsum("bir,bro->boi")`) plus L's two matmuls."""
    rows = []
    for d in diffs:
        if d is None or name not in d.factors:
            rows.append(torch.zeros(layer.base.out_features, layer.base.in_features, dtype=x.dtype))
        else:
            f = d.factors[name]
            rows.append(torch.einsum("ir,ro->oi", f.down, f.up) * d.scaling)
    dense = torch.stack(rows)  # [b, out, in]
    lf = l_diff.factors[name]
    lora = (x @ lf.down.to(x.dtype) @ lf.up.to(x.dtype)) * l_diff.scaling
    return layer.base(x) + torch.einsum("bsi,boi->bso", x, dense) + lora


def test_factored_path_equals_dits_dense_einsum(model64):
    """Mixed ranks (1, 3) padded with zeros, a diff on only some modules, a row with no diff."""
    name = "model.layers.0.self_attn.q_proj"
    l_diff = trained_l(model64)
    lacks_name = Diff({n: f for n, f in random_diff(model64, 6, 2).factors.items() if n != name}, 0.5)
    diffs = [random_diff(model64, 4, 1), random_diff(model64, 5, 3), lacks_name, None]
    x = torch.randn(4, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with interpreting(model64, l_diff), torch.no_grad():
        set_diffs(model64, diffs)
        layer = model64.get_submodule(name)
        assert layer.down.shape == (4, 32, 3) and torch.equal(layer.down[0, :, 1:], torch.zeros(32, 2, dtype=torch.float64))
        got = layer(x)
        clear_diffs(model64)
    # float64: the two paths sum at most 32 + 3 products in other orders, ~1e-15 on outputs of ~10;
    # a wrong row, rank or scaling is off by O(1).
    torch.testing.assert_close(got, dense_reference(layer, x, diffs, name, l_diff), rtol=0.0, atol=1e-12)


def test_rows_are_independent(tokenizer, model, model64):
    """A row's logits in a batch of different diffs equal that row run alone."""
    ids = torch.tensor([tokenizer("The quick brown fox jumps")["input_ids"]] * 4)
    for m, tol in ((model64, None), (model, "fp32")):
        l_diff = trained_l(m)
        diffs = [random_diff(m, 11, 1), random_diff(m, 12, 3), None, random_diff(m, 13, 2, modules=5)]
        together = logits_of(m, ids, diffs, l_diff)
        for i, d in enumerate(diffs):
            alone = logits_of(m, ids[:1], [d], l_diff)[0]
            atol = 1e-10 if tol is None else fp32_atol(alone)
            torch.testing.assert_close(together[i], alone, rtol=0.0, atol=atol)
        assert not torch.allclose(together[0], together[1])  # the diffs do change the rows


def test_candidate_rows_group_by_diff(tokenizer, model64):
    """With D diffs set and D*K rows, rows d*K .. d*K+K-1 use diff d."""
    ids = torch.tensor([tokenizer("Hello world")["input_ids"]] * 4)
    diffs = [random_diff(model64, 21, 2), random_diff(model64, 22, 2)]
    grouped = logits_of(model64, ids, diffs)
    for row in range(4):
        alone = logits_of(model64, ids[:1], [diffs[row // 2]])[0]
        torch.testing.assert_close(grouped[row], alone, rtol=0.0, atol=1e-10)
    with pytest.raises(ValueError, match="not a multiple"), interpreting(model64), torch.no_grad():
        set_diffs(model64, diffs)
        model64(input_ids=ids[:3])


def test_diffs_built_for_other_modules_are_refused(model):
    bad_name = Diff({"model.layers.9.self_attn.q_proj": LoRAFactors(torch.zeros(32, 1), torch.zeros(1, 32))}, 1.0)
    bad_shape = Diff({"model.layers.0.self_attn.q_proj": LoRAFactors(torch.zeros(48, 1), torch.zeros(1, 32))}, 1.0)
    with interpreting(model):
        with pytest.raises(ValueError, match=r"diffs\[1\]: module 'model.layers.9.self_attn.q_proj' is not"):
            set_diffs(model, [None, bad_name])
        with pytest.raises(ValueError, match=r"diffs\[0\]: .*another model"):
            set_diffs(model, [bad_shape])
    with pytest.raises(ValueError, match="interpreter: module"):
        wrap_interpreter(model, bad_name)
    assert not wrappers(model)


def test_encode_pair_targets_description_and_end_of_turn(tokenizer):
    enc = encode_pair(tokenizer, DEFAULT_QUESTION, "the sun")
    prompt = prompt_ids(tokenizer, DEFAULT_QUESTION)
    assert enc.ids[: len(prompt)] == prompt and enc.labels[: len(prompt)] == [IGNORE] * len(prompt)
    target = enc.labels[len(prompt) :]
    assert tokenizer.decode(target) == "the sun</s>\n"  # the demo template's end of turn is `</s>\n`
    assert target[: len(tokenizer("the sun", add_special_tokens=False)["input_ids"])] == tokenizer(
        "the sun", add_special_tokens=False
    )["input_ids"]
    with pytest.raises(ValueError, match="empty description"):
        encode_pair(tokenizer, DEFAULT_QUESTION, "  ")


def test_prompt_and_padding_carry_no_loss(tokenizer, model64):
    """A batch's summed loss is the sum of its rows alone, whatever the pad token."""
    prompt_len = len(prompt_ids(tokenizer, DEFAULT_QUESTION))
    short, long = (encode_pair(tokenizer, DEFAULT_QUESTION, d) for d in ("cats", "the quick brown fox"))
    diffs = [random_diff(model64, 31, 1), random_diff(model64, 32, 2)]
    with interpreting(model64, trained_l(model64)), torch.no_grad():
        total, count = batch_loss(model64, [short, long], diffs, prompt_len, pad_id=0)
        other_pad, _ = batch_loss(model64, [short, long], diffs, prompt_len, pad_id=5)
        alone = [batch_loss(model64, [e], [d], prompt_len, pad_id=0) for e, d in zip((short, long), diffs)]
    assert count == sum(n for _, n in alone) == sum(lab != IGNORE for e in (short, long) for lab in e.labels)
    torch.testing.assert_close(total, alone[0][0] + alone[1][0], rtol=0.0, atol=1e-10)
    torch.testing.assert_close(other_pad, total, rtol=0.0, atol=1e-10)


def test_schedule_and_config():
    config = InterpreterConfig(batch_size=3, epochs=2, seed=1)
    steps = schedule(7, config)
    assert [len(s) for s in steps] == [3, 3, 1, 3, 3, 1]
    assert sorted(sum(steps[:3], [])) == sorted(sum(steps[3:], [])) == list(range(7))
    assert len(schedule(7, InterpreterConfig(batch_size=3, steps=5))) == 5
    for bad, field in (({"r": 0}, "r"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"),
                       ({"weight_decay": -1.0}, "weight_decay"), ({"question": " "}, "question"), ({"seed": -1}, "seed")):
        with pytest.raises(ValueError, match=field):
            InterpreterConfig(**bad)


def test_training_reduces_loss_and_leaves_base_untouched(tokenizer, model):
    sha, modules = digest(model), dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    diffs = [random_diff(model, 40 + i, 1 + i % 2) for i in range(6)]
    pairs = [Pair(d, TOPICS[i % 3]) for i, d in enumerate(diffs)]
    plain = [(p.diff, p.description) for p in pairs]
    config = InterpreterConfig(r=4, lr=1e-2, batch_size=3, steps=30, seed=0)
    before = pairs_loss(model, tokenizer, plain, init_interpreter(model, 4, seed=0))
    with InterpreterTrainer(model, tokenizer, pairs, config) as trainer:
        trainer.detach()
        assert not wrappers(model) and all(modules[n] is m for n, m in model.named_modules())
        while not trainer.done:
            trainer.attach()
            trainer.step()
            trainer.detach()
        result = trainer.result()
    assert result.steps_done == 30 and len(result.losses) == 30
    after = pairs_loss(model, tokenizer, plain, result.interpreter)
    assert after < before - 1.0, (before, after)  # nats per target token
    assert digest(model) == sha and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert dict(model.named_modules()).keys() == modules.keys()


def test_failed_step_leaves_the_model_plain(tokenizer, model, monkeypatch):
    sha, flags = digest(model), {n: p.requires_grad for n, p in model.named_parameters()}
    pairs = [Pair(random_diff(model, 50, 1), "cats")]
    with pytest.raises(ValueError, match=r"pairs\[0\].description: empty"):
        InterpreterTrainer(model, tokenizer, [Pair(pairs[0].diff, " ")], InterpreterConfig(r=2))
    assert not wrappers(model)
    trainer = InterpreterTrainer(model, tokenizer, pairs, InterpreterConfig(r=2, steps=2))
    try:
        def fail(*args, **kwargs):
            raise RuntimeError("out of memory (simulated)")

        monkeypatch.setattr(model.lm_head, "forward", fail)  # fails mid-forward, diffs set
        with pytest.raises(RuntimeError, match="simulated"):
            trainer.step()
        assert all(m.down is None for m in wrappers(model).values())  # the step's diffs are gone
        monkeypatch.undo()
        trainer.step()  # and the next step runs
    finally:
        trainer.close()
    assert not wrappers(model) and digest(model) == sha
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_peft_export_reproduces_trainer_logits(tokenizer, model, tmp_path):
    l_diff = trained_l(model, r=4)
    out = export_interpreter(l_diff, model, tmp_path / "dit", question="Q?", dit_adapter=True)
    config = json.loads((out / "adapter_config.json").read_text())
    info = json.loads((out / "dit.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 1.0
    assert info["question"] == "Q?" and len(info["target_modules"]) == 14 and info["base_model"]["model_type"] == "llama"
    ids = torch.tensor([encode_pair(tokenizer, DEFAULT_QUESTION, "the sun").ids])
    ours = logits_of(model, ids, [None], l_diff)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), out)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0.0, atol=fp32_atol(ours))
    assert not torch.allclose(ours, logits_of(model, ids, [None], None))
    # DIT's layout: {module: (A [out, r], B [r, in])}, update x @ B^T @ A^T / r.
    dit = torch.load(out / DIT_ADAPTER, weights_only=True)
    a, b = dit["model.layers.1.mlp.down_proj"]
    f = l_diff.factors["model.layers.1.mlp.down_proj"]
    assert a.shape == (32, 4) and b.shape == (4, 64)
    torch.testing.assert_close(b.T @ a.T / 4, f.down @ f.up * l_diff.scaling, rtol=0.0, atol=1e-6)
    assert to_dit_adapter(l_diff).keys() == l_diff.factors.keys()
    back = from_dit_adapter(load_dit_adapter(out / DIT_ADAPTER))  # the importer's reading, scale 1/r
    torch.testing.assert_close(back["model.layers.1.mlp.down_proj"].down @ back["model.layers.1.mlp.down_proj"].up / 4,
                               f.down @ f.up * l_diff.scaling, rtol=0.0, atol=1e-6)


def merged_copy(model: nn.Module, diffs: list[Diff]) -> nn.Module:
    """A client's view: a plain HF model whose weights hold `W + sum_k scaling_k (down_k up_k)^T`."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for d in diffs:
            for name, f in d.factors.items():
                merged.get_submodule(name).weight += (f.down @ f.up).T * d.scaling
    return merged


def test_candidate_logprob_equals_client_recomputation(tokenizer, model):
    diff, l_diff = random_diff(model, 60, 2), trained_l(model)
    got = describe(model, tokenizer, [diff], l_diff, max_new_tokens=3, candidates=TOPICS)[0]
    client = merged_copy(model, [diff, l_diff])
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_QUESTION}], add_generation_prompt=True, tokenize=False)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    for candidate, logprob in zip(TOPICS, got.logprobs):
        cand = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = client(input_ids=torch.tensor([prefix_ids + cand])).logits[0]
        logp = torch.log_softmax(logits[len(prefix_ids) - 1 : -1], -1)
        expected = float(logp[torch.arange(len(cand)), torch.tensor(cand)].sum())
        # Each log-prob is a logit minus a logsumexp; both carry the logits' rounding (fp32_atol).
        assert math.isclose(logprob, expected, abs_tol=2 * len(cand) * fp32_atol(logits)), (candidate, logprob, expected)
    with torch.no_grad():
        greedy = client.generate(
            input_ids=torch.tensor([prefix_ids]), max_new_tokens=3, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )[0, len(prefix_ids) :].tolist()
    assert list(got.token_ids) == [t for t in greedy if t != tokenizer.eos_token_id][: len(got.token_ids)]


def test_describe_batched_equals_each_alone(tokenizer, model):
    l_diff = trained_l(model)
    diffs = [random_diff(model, 70 + i, 1 + i % 3) for i in range(5)] + [None]
    together = describe(model, tokenizer, diffs, l_diff, max_new_tokens=6, candidates=TOPICS)
    assert len({d.text for d in together}) > 1
    for d, got in zip(diffs, together):
        alone = describe(model, tokenizer, [d], l_diff, max_new_tokens=6, candidates=TOPICS)[0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(got.logprobs, alone.logprobs))
    chunked = describe(model, tokenizer, diffs, l_diff, max_new_tokens=6, candidates=TOPICS, max_rows=4)
    assert [c.token_ids for c in chunked] == [t.token_ids for t in together]


def test_describe_sampling_is_seeded_per_row(tokenizer, model):
    diffs = [random_diff(model, 80, 1), random_diff(model, 81, 1)]
    kw = {"max_new_tokens": 8, "temperature": 1.5}
    together = describe(model, tokenizer, diffs, None, seed=100, **kw)
    assert together == describe(model, tokenizer, diffs, None, seed=100, **kw)
    assert describe(model, tokenizer, diffs[1:], None, seed=101, **kw)[0].token_ids == together[1].token_ids


def test_describe_refuses_bad_input(tokenizer, model):
    with pytest.raises(ValueError, match="diffs"):
        describe(model, tokenizer, [], None)
    with pytest.raises(ValueError, match="temperature"):
        describe(model, tokenizer, [None], None, temperature=-1.0)
    with pytest.raises(ValueError, match=r"candidates\[1\]"):
        describe(model, tokenizer, [None], None, candidates=["cats", ""])
    with pytest.raises(ValueError, match=r"diffs\[0\]"):
        describe(model, tokenizer, [Diff({"lm_head": LoRAFactors(torch.zeros(32, 1), torch.zeros(1, 8))}, 1.0)], None)
    assert not wrappers(model)


def test_normalise():
    assert normalise("  The   Sun.!\n") == "the sun" and normalise("Cats") == normalise("cats.")
    assert normalise("a.b") == "a.b" and normalise("...") == ""


def test_evaluate_on_a_hand_made_case(tokenizer, model):
    """Descriptions chosen from the model's own answers, so the right numbers are known."""
    l_diff = trained_l(model)
    d0, d1 = random_diff(model, 90, 1), random_diff(model, 91, 2)
    answers = describe(model, tokenizer, [d0, d1], l_diff, max_new_tokens=4, candidates=TOPICS)
    best = [TOPICS[max(range(3), key=a.logprobs.__getitem__)] for a in answers]
    wrong = next(t for t in TOPICS if t != best[1])
    pairs = [(d0, best[0]), (d1, wrong), (d0, best[0])]  # d0 asked once, counted twice
    result = evaluate(model, tokenizer, pairs, l_diff, candidates=TOPICS, max_new_tokens=4)
    assert result.n == 3 and result.chance == pytest.approx(1 / 3)
    assert result.candidate_hits == 2 and [i.correct for i in result.items] == [True, False, True]
    assert [i.candidate for i in result.items] == [best[0], best[1], best[0]]
    assert [i.text for i in result.items] == [answers[0].text, answers[1].text, answers[0].text]
    exact = evaluate(model, tokenizer, [(d0, answers[0].text.upper() + "."), (d1, "zzz")], l_diff, max_new_tokens=4)
    assert [i.exact for i in exact.items] == [bool(normalise(answers[0].text)), False] and exact.chance is None
    with pytest.raises(ValueError, match=r"pairs\[0\].description: 'zebra' is not among"):
        evaluate(model, tokenizer, [(d0, "zebra")], l_diff, candidates=TOPICS)


def test_train_interpreter_end_to_end_on_held_out_diffs(tokenizer, model):
    """A miniature DIT: each topic's diffs share a direction; L learns to name it on unseen diffs."""
    sha = digest(model)
    topics = {t: random_diff(model, 100 + k, 1, gain=0.3) for k, t in enumerate(TOPICS)}

    def noisy(topic: str, seed: int) -> Diff:
        noise = random_diff(model, seed, 1, gain=0.03)
        return Diff({n: LoRAFactors(torch.cat([f.down, noise.factors[n].down], 1), torch.cat([f.up, noise.factors[n].up], 0))
                     for n, f in topics[topic].factors.items()}, 1.0)

    train = [Pair(noisy(t, 200 + i), t) for i in range(4) for t in TOPICS]
    test = [(noisy(t, 300 + i), t) for i in range(2) for t in TOPICS]
    result = train_interpreter(model, tokenizer, train, InterpreterConfig(r=4, lr=2e-2, batch_size=6, steps=150, seed=1))
    held_out = evaluate(model, tokenizer, test, result.interpreter, candidates=TOPICS, max_new_tokens=8)
    no_dit = evaluate(model, tokenizer, test, None, candidates=TOPICS, max_new_tokens=8)
    assert held_out.candidate_hits == 6 and held_out.exact_hits >= 4, [(i.text, i.description) for i in held_out.items]
    assert no_dit.exact_hits == 0
    assert digest(model) == sha and not wrappers(model)
