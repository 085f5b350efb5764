"""The decode loop's equivalences: cached vs recomputed, alpha endpoints, batched vs alone."""

from __future__ import annotations

import pytest
import torch

from lda import DecodeConfig, LDAModelPair, Row, SamplingParams, Side, collect, logit_diff
from lda.decode import TextTracker

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Hello world", "What should I do if I feel bored today?", "A"]


def ids(pair: LDAModelPair, prompt: str) -> tuple[int, ...]:
    return pair.prompt_ids(prompt)[1]


def run(pair, rows, max_new=12, sampling=GREEDY, eos=None, stop=(), details=False):
    config = DecodeConfig(
        max_new,
        sampling,
        frozenset(eos if eos is not None else pair.eos_ids),
        tuple(stop),
        details,
        pair.after.pad_id,
    )
    return collect(pair.lda_events(rows, config), len(rows))


def recompute_greedy(pair: LDAModelPair, prompt_ids, alpha: float, steps: int) -> list[int]:
    """Reference: run both models over the whole sequence at every step, no cache."""
    seq = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([seq])
            a = pair.after.model(x).logits[:, -1].float()
            b = pair.before.model(x).logits[:, -1].float()
            tok = int(torch.argmax(a + alpha * (a - b)))
            out.append(tok)
            seq.append(tok)
    return out


@pytest.mark.parametrize("steps", [1, 5, 17])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_cached_equals_recomputed(pair, steps, alpha):
    prompt = ids(pair, PROMPTS[1])
    got = run(pair, [Row(prompt, alpha)], max_new=steps, eos=())[0]
    assert got.token_ids == recompute_greedy(pair, prompt, alpha, steps)
    assert got.finish_reason == "length" and got.tokens_generated == steps


def hf_greedy(model, prompt_ids, steps, eos_id):
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False, eos_token_id=eos_id, pad_token_id=0
    )
    new = out[0, len(prompt_ids) :].tolist()
    return new[:-1] if new and new[-1] == eos_id else new


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_zero_is_after_and_minus_one_is_before(pair, prompt):
    p = ids(pair, prompt)
    eos = pair.after.tokenizer.eos_token_id
    zero, minus_one = run(pair, [Row(p, 0.0), Row(p, -1.0)], max_new=20)
    assert zero.token_ids == hf_greedy(pair.after.model, p, 20, eos)
    assert minus_one.token_ids == hf_greedy(pair.before.model, p, 20, eos)
    assert zero.token_ids != minus_one.token_ids  # the two tiny models really differ


def test_logit_diff_is_exact_at_the_endpoints():
    a, b = torch.randn(3, 50), torch.randn(3, 50)
    assert torch.equal(logit_diff(a, b, torch.zeros(3)), a)
    assert torch.equal(logit_diff(a, b, -torch.ones(3)), b)
    got, want = logit_diff(a, b, torch.full((3,), 2.0)).double(), (a + 2.0 * (a - b)).double()
    # logit_diff is fp32 by design, and `3 * a - 2 * b` rounds 3 * a and the difference where
    # `a + 2 * (a - b)` rounds a - b and the sum (doubling is exact), so with u = 2**-24 the two
    # differ by at most u * (3|a| + 2|a - b| + 2|3a - 2b|) per element (1.001: second-order terms),
    # ~1e-6 for these values; a wrong formula or sign is off by O(|a - b|) ~ 1.
    a, b = a.double(), b.double()
    bound = 2**-24 * (3 * a.abs() + 2 * (a - b).abs() + 2 * (3 * a - 2 * b).abs()) * 1.001
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()


def test_identical_models_give_the_same_output_for_every_alpha(after_model, tokenizer):
    same = LDAModelPair(Side("a", after_model, tokenizer), Side("b", after_model, tokenizer))
    p = ids(same, PROMPTS[0])
    alphas = [-1.0, 0.0, 0.5, 4.0, 20.0]
    greedy = run(same, [Row(p, a) for a in alphas], max_new=15)
    assert all(o.token_ids == greedy[0].token_ids for o in greedy)
    sampled = run(same, [Row(p, a, seed=7) for a in alphas], max_new=15, sampling=SamplingParams(1.0))
    assert all(o.token_ids == sampled[0].token_ids for o in sampled)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(1.0, top_k=50, top_p=0.9)])
def test_each_row_of_a_batch_equals_the_row_alone(pair, sampling):
    rows = [
        Row(ids(pair, PROMPTS[0]), 0.0, seed=1),
        Row(ids(pair, PROMPTS[1]), 1.5, seed=2),
        Row(ids(pair, PROMPTS[2]), -0.5, seed=3),
        Row(ids(pair, PROMPTS[1]), 4.0, seed=4),
    ]
    # A frequent token as extra EOS makes rows finish at different steps (rows get dropped).
    alone = [run(pair, [r], max_new=16, sampling=sampling)[0] for r in rows]
    eos = set(pair.eos_ids) | {alone[1].token_ids[3]}
    alone = [run(pair, [r], max_new=16, sampling=sampling, eos=eos)[0] for r in rows]
    batched = run(pair, rows, max_new=16, sampling=sampling, eos=eos)
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.finish_reason for o in batched] == [o.finish_reason for o in alone]
    assert len({len(o.token_ids) for o in batched}) > 1  # rows really finished at different times


def test_same_seed_same_output_different_seed_different_samples(pair):
    p = ids(pair, PROMPTS[0])
    hot = SamplingParams(1.5)
    a = run(pair, [Row(p, 1.0, seed=11)], max_new=20, sampling=hot)[0]
    b = run(pair, [Row(p, 1.0, seed=11)], max_new=20, sampling=hot)[0]
    assert a.token_ids == b.token_ids
    others = {
        tuple(run(pair, [Row(p, 1.0, seed=s)], max_new=20, sampling=hot)[0].token_ids) for s in range(12, 16)
    }
    assert len(others | {tuple(a.token_ids)}) > 2


def test_eos_stops_and_is_not_emitted(pair):
    p = ids(pair, PROMPTS[1])
    free = run(pair, [Row(p, 1.0)], max_new=12, eos=())[0]
    eos_tok = free.token_ids[4]
    first = free.token_ids.index(eos_tok)
    got = run(pair, [Row(p, 1.0)], max_new=12, eos={eos_tok})[0]
    assert got.token_ids == free.token_ids[:first]
    assert got.finish_reason == "eos" and got.stopped_early
    assert got.tokens_generated == first + 1


def test_stop_string_truncates_the_text(pair):
    p = ids(pair, PROMPTS[1])
    free = run(pair, [Row(p, 1.0)], max_new=20, eos=())[0]
    stop = free.text[5:8]
    assert stop.strip(), free.text
    got = run(pair, [Row(p, 1.0)], max_new=20, eos=(), stop=[stop])[0]
    assert got.finish_reason == "stop"
    assert got.text == free.text[: free.text.find(stop)]


def test_text_tracker_holds_back_stop_prefixes(tokenizer):
    ids_ = tokenizer("hello world, the end", add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tokenizer, ["the end"])
    streamed, hit = "", False
    for t in ids_:
        delta, hit = tracker.push(t)
        streamed += delta
        if hit:
            break
    assert hit and streamed == "hello world, " == tracker.text


def test_details_report_logprobs_of_each_model(pair):
    p = ids(pair, PROMPTS[0])
    out = run(pair, [Row(p, 2.0)], max_new=5, details=True)[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert lp.after < 0 and lp.before < 0 and lp.amplified <= 0
        assert lp.after != lp.before


def test_shared_width_for_padded_embeddings(tokenizer, after_model):
    from tests.tiny import tiny_llama

    padded = tiny_llama(tokenizer, seed=3, vocab_size=len(tokenizer) + 64)
    p = LDAModelPair(Side("a", after_model, tokenizer), Side("b", padded, tokenizer))
    c = p.compatibility
    assert c.compatible and c.shared_width == len(tokenizer)
    assert c.logits_width_before == len(tokenizer) + 64 and "shared width" in c.warning
    out = run(p, [Row(ids(p, PROMPTS[0]), 1.0)], max_new=5)[0]
    assert max(out.token_ids) < len(tokenizer)


def test_different_vocabs_refuse_lda_but_single_model_works(after_model, tokenizer):
    from lda import IncompatibleTokenizersError
    from tests.tiny import CORPUS, tiny_llama
    from app.demo import build_tokenizer

    other_tok = build_tokenizer([t.upper() for t in CORPUS], vocab_size=300)
    other = tiny_llama(other_tok, seed=4)
    p = LDAModelPair(Side("a", after_model, tokenizer), Side("b", other, other_tok))
    assert not p.compatibility.compatible and "different vocabularies" in p.compatibility.warning
    with pytest.raises(IncompatibleTokenizersError):
        run(p, [Row(ids(p, PROMPTS[0]), 1.0)])
    cfg = p.decode_config(5, GREEDY, side=p.before)
    out = collect(p.single_events(p.before, [Row(p.prompt_ids("hi", side=p.before)[1])], cfg), 1)[0]
    assert out.tokens_generated >= 1


def test_chat_template_adds_exactly_one_bos(pair):
    formatted, p = pair.prompt_ids("Hello there", system_prompt="Be brief.")
    tok = pair.after.tokenizer
    assert p.count(tok.bos_token_id) == 1 and p[0] == tok.bos_token_id
    assert "Be brief." in formatted
    raw_formatted, raw = pair.prompt_ids("Hello there", apply_chat_template=False)
    assert raw_formatted == "Hello there" and raw.count(tok.bos_token_id) <= 1
