"""One prefill per distinct prompt: rows that share a prompt share its prefill, and each row is
still what it is alone (two-model LDA and adapter mode, greedy and seeded sampling)."""

from __future__ import annotations

import math

import pytest

from amplification.adapter_mode import AdapterSource
from amplification.merge import plan_deltas
from amplification.registry import AdapterRegistry
from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.decode import distinct_prompts
from lda.source import ModelSource
from tests.test_amplification_merge import fresh_base, make_adapter, table

PROMPTS = ["What should I do if I feel bored today?", "Hello world"]
ALPHAS = [0.0, 1.0, 4.0]
SAMPLES = 3
GREEDY = SamplingParams(0.0)
HOT = SamplingParams(1.0, top_k=50, top_p=0.9)
# Logprobs of a row batched and alone: the logits come from differently shaped matmuls (batch
# size, padding), which may round differently in the last bits (an fp32 ulp at |logit| < 32 is
# <= 4e-6), amplified by at most 1 + 2 * alpha = 9 in `amplified`; measured: <= 1.2e-6 on the
# tiny pair. Greedy tokens match exactly (no near-ties among these prompts' top logits).
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def adapter_setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tokenizer, root / "lora", seed=5)
    base = fresh_base(tokenizer)
    adapter = AdapterRegistry([root], hub_enabled=False).load("lora", str(root / "lora"), base)
    return base, plan_deltas(base, [(adapter, table(1, 1, 1, 1))])


@pytest.fixture(params=["two_models", "adapter_mode"])
def make_source(request, pair, adapter_setup):
    """A fresh LogitsSource per decode."""
    if request.param == "two_models":
        return lambda: ModelSource(pair.after.model, pair.before.model)
    base, plan = adapter_setup
    return lambda: AdapterSource(base, plan)


def app_rows(tokenizer, seed: int | None = None) -> list[Row]:
    """prompts x alphas x samples, prompt-major, as the app builds them; seeds differ per row."""
    rows = []
    for p in PROMPTS:
        ids = tuple(tokenizer(p)["input_ids"])
        for a in ALPHAS:
            for _ in range(SAMPLES):
                rows.append(Row(ids, a, None if seed is None else seed + len(rows)))
    return rows


def config(tokenizer, sampling, eos=(), details=False, max_new=12):
    eos_ids = frozenset({tokenizer.eos_token_id, *eos})
    return DecodeConfig(max_new, sampling, eos_ids, details=details, pad_id=tokenizer.pad_token_id)


def run(make_source, tokenizer, rows, cfg, share=True):
    return collect(decode(make_source(), tokenizer, rows, cfg, share_prefill=share), len(rows))


def test_distinct_prompts_keep_first_seen_order():
    rows = [Row((1, 2)), Row((3,)), Row((1, 2), 1.0), Row((4, 5, 6)), Row((3,), 2.0)]
    assert distinct_prompts(rows) == ([(1, 2), (3,), (4, 5, 6)], [0, 1, 0, 2, 1])


@pytest.mark.parametrize("sampling", [GREEDY, HOT])
def test_rows_sharing_prompts_equal_each_row_alone(make_source, tokenizer, sampling):
    rows = app_rows(tokenizer, seed=100)
    # A frequent token as extra EOS makes rows finish at different steps, so rows are dropped
    # from the expanded caches too.
    free = run(make_source, tokenizer, rows[:1], config(tokenizer, sampling))[0]
    cfg = config(tokenizer, sampling, eos={free.token_ids[3]})
    alone = [run(make_source, tokenizer, [r], cfg)[0] for r in rows]
    shared = run(make_source, tokenizer, rows, cfg)
    unshared = run(make_source, tokenizer, rows, cfg, share=False)
    for got in (shared, unshared):
        assert [o.token_ids for o in got] == [o.token_ids for o in alone]
        assert [o.finish_reason for o in got] == [o.finish_reason for o in alone]
    assert len({len(o.token_ids) for o in shared}) > 1  # rows really finished at different times
    assert len({tuple(o.token_ids) for o in shared}) > len(PROMPTS)  # alphas (and seeds) matter


def test_prompts_in_any_row_order(make_source, tokenizer):
    rows = app_rows(tokenizer, seed=7)
    order = [5, 12, 0, 17, 3, 9, 1, 14, 8]  # prompts interleaved, some rows left out
    mixed = [rows[i] for i in order]
    cfg = config(tokenizer, HOT)
    full = [o.token_ids for o in run(make_source, tokenizer, rows, cfg)]
    assert [o.token_ids for o in run(make_source, tokenizer, mixed, cfg)] == [full[i] for i in order]


def test_details_logprobs_match_the_row_alone(make_source, tokenizer):
    rows = app_rows(tokenizer)
    cfg = config(tokenizer, GREEDY, details=True, max_new=6)
    shared = run(make_source, tokenizer, rows, cfg)
    for row, got in zip(rows, shared):
        want = run(make_source, tokenizer, [row], cfg)[0]
        assert got.token_ids == want.token_ids
        for g, w in zip(got.logprobs, want.logprobs, strict=True):
            assert g.token_id == w.token_id
            for field in ("after", "before", "amplified"):
                assert math.isclose(getattr(g, field), getattr(w, field), rel_tol=0, abs_tol=LOGPROB_ATOL)


class Recording:
    """A source that records the batch size of each prefill."""

    def __init__(self, source):
        self.source, self.device, self.prefill_rows = source, source.device, []

    def prefill(self, input_ids, attention_mask, position_ids):
        self.prefill_rows.append(input_ids.shape[0])
        return self.source.prefill(input_ids, attention_mask, position_ids)

    def decode_one_token(self, tokens, attention_mask, position_ids):
        return self.source.decode_one_token(tokens, attention_mask, position_ids)

    def keep_rows(self, rows):
        self.source.keep_rows(rows)


@pytest.mark.parametrize("share", [True, False])
def test_prefill_runs_once_per_distinct_prompt(make_source, tokenizer, share):
    rows = app_rows(tokenizer, seed=1)
    source = Recording(make_source())
    outs = collect(decode(source, tokenizer, rows, config(tokenizer, HOT, max_new=3), share), len(rows))
    assert source.prefill_rows == [len(PROMPTS) if share else len(rows)]
    assert all(o.tokens_generated >= 1 for o in outs)
