"""Continuous batching in the library: rows that join a running batch at step boundaries, or leave
it, decode exactly what they decode alone (greedy and seeded; two models, adapter mode, and a pair
whose logits widths differ)."""

from __future__ import annotations

import pytest
import torch

from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.cache_ops import padding_columns
from lda.decode import RowFailed, RunningBatch
from lda.sampling import NonFiniteLogitsError, sample
from lda.source import ModelSource
from tests.test_shared_prefill import LOGPROB_ATOL, adapter_setup  # noqa: F401  (fixture)
from tests.tiny import tiny_llama

GREEDY = SamplingParams(0.0)
HOT = SamplingParams(1.0, top_k=50, top_p=0.9)


@pytest.fixture(params=["two_models", "adapter_mode", "wider_before"])
def make_source(request, pair, adapter_setup, tokenizer):  # noqa: F811
    """A fresh LogitsSource (empty caches, same models) per call."""
    if request.param == "two_models":
        return lambda: ModelSource(pair.after.model, pair.before.model)
    if request.param == "wider_before":
        # 64 padding rows in the before model's embeddings: logits widths differ, the shared width is used.
        wide = tiny_llama(tokenizer, seed=9, vocab_size=len(tokenizer) + 64)
        width = len(tokenizer)
        return lambda: ModelSource(pair.after.model, wide, width)
    from amplification.adapter_mode import AdapterSource

    base, plan = adapter_setup
    return lambda: AdapterSource(base, plan)


def requests(tokenizer):
    eos = frozenset({tokenizer.eos_token_id})

    def ids(text):
        return tuple(tokenizer(text)["input_ids"])

    long = ids("What should I do if I feel bored today? Tell me everything about it, please.")
    return {
        "A": ([Row(ids("Hello world"), 1.0), Row(long, 1.0)], DecodeConfig(12, GREEDY, eos)),
        "B": ([Row(ids("What is a cat?"), 2.0, 5), Row(ids("What is a cat?"), 2.0, 6), Row(long, 0.5, 7)],
              DecodeConfig(8, HOT, eos, stop=("e t",))),
        "C": ([Row(ids("Hi"), 0.5, 11)], DecodeConfig(10, HOT, eos, details=True, top_logprobs=3)),
    }  # fmt: skip


def alone(make_source, tokenizer, reqs):
    return {name: collect(decode(make_source(), tokenizer, rows, cfg), len(rows)) for name, (rows, cfg) in reqs.items()}


def joined(make_source, tokenizer, reqs, admit_at, cancel=None):
    """Run the requests through one RunningBatch, admitting request k after `admit_at[k]` steps."""
    batch = RunningBatch(make_source, tokenizer)
    outputs = {name: [None] * len(rows) for name, (rows, _) in reqs.items()}
    events = {name: 0 for name in reqs}
    steps, pending = 0, dict(admit_at)
    while pending or batch:
        due = [name for name, at in pending.items() if steps >= at]
        if due and batch.can_join:  # requests due at one step join with one prefill forward
            batch.admit_all([(*reqs[name], name) for name in due])
            for name in due:
                del pending[name]
        if cancel and steps == cancel[1]:
            batch.cancel(cancel[0])
        for ticket, event in batch.step():
            events[ticket] += 1
            if hasattr(event, "finish_reason"):
                outputs[ticket][event.row] = event
        if batch:
            assert padding_columns(batch.mask) == 0  # columns no row uses are trimmed
            assert batch.mask.shape[0] == len(batch.live)
        steps += 1
    return outputs, events


def same(a, b):
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    if a.logprobs is not None:
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.amplified == pytest.approx(y.amplified, abs=LOGPROB_ATOL)


@pytest.mark.parametrize(
    "admit_at", [{"A": 0, "B": 0, "C": 0}, {"A": 0, "B": 2, "C": 5}, {"C": 0, "A": 3, "B": 4}, {"B": 0, "A": 3, "C": 3}]
)
def test_rows_joining_a_running_batch_decode_as_alone(make_source, tokenizer, admit_at):
    reqs = requests(tokenizer)
    expected = alone(make_source, tokenizer, reqs)
    got, _ = joined(make_source, tokenizer, reqs, admit_at)
    for name in reqs:
        for a, b in zip(got[name], expected[name]):
            same(a, b)
    assert {o.finish_reason for outs in expected.values() for o in outs} >= {"length"}


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(make_source, tokenizer):
    reqs = requests(tokenizer)
    expected = alone(make_source, tokenizer, reqs)
    got, events = joined(make_source, tokenizer, reqs, {"A": 0, "B": 1, "C": 2}, cancel=("B", 3))
    assert events["B"] < sum(len(o.token_ids) + 1 for o in expected["B"])  # B stopped early
    for name in ("A", "C"):
        for a, b in zip(got[name], expected[name]):
            same(a, b)


def test_a_row_whose_logits_go_non_finite_fails_its_request_alone(pair, tokenizer):
    make_source = lambda: ModelSource(pair.after.model, pair.before.model)  # noqa: E731
    reqs = requests(tokenizer)
    expected = alone(make_source, tokenizer, {"A": reqs["A"]})
    bad_rows = [Row(r.prompt_ids, float("inf"), r.seed) for r in reqs["B"][0]]  # inf * (after - before)
    batch = RunningBatch(make_source, tokenizer)
    batch.admit(*reqs["A"], ticket="A")
    batch.admit(bad_rows, reqs["B"][1], ticket="B")
    got, failed = [None, None], []
    while batch:
        for ticket, event in batch.step():
            if isinstance(event, RowFailed):
                failed.append((ticket, event.row, type(event.error).__name__))
            elif ticket == "A" and hasattr(event, "finish_reason"):
                got[event.row] = event
            else:
                assert ticket == "A"  # B yields nothing but its failure
    assert failed == [("B", 0, "NonFiniteLogitsError")]  # its other rows left with it
    for a, b in zip(got, expected["A"]):
        same(a, b)


def out_of_memory_once(make_source, rows: int, fired: list):
    """`make_source` whose sources raise CUDA's out-of-memory error in the first decode step of
    `rows` rows, after the forward wrote every cache (as an OOM in the logits would): the rows
    that go on match their alone runs only if the batch crops that write away."""

    def make():
        source = make_source()
        real = source.decode_one_token

        def decode_one_token(tokens, mask, positions):
            logits = real(tokens, mask, positions)
            if tokens.shape[0] == rows and not fired:
                fired.append(rows)
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return logits

        source.decode_one_token = decode_one_token
        return source

    return make


def test_a_step_out_of_memory_fails_the_request_admitted_last_and_the_rest_go_on(make_source, tokenizer):
    reqs = requests(tokenizer)
    expected = alone(make_source, tokenizer, reqs)
    fired = []
    failing_once = out_of_memory_once(make_source, 6, fired)  # all three requests in the batch
    batch = RunningBatch(failing_once, tokenizer)
    outputs = {name: [None] * len(rows) for name, (rows, _) in reqs.items()}
    failed = {}
    for step in range(40):
        for name, at in {"A": 0, "B": 1, "C": 2}.items():
            if step == at:
                batch.admit(*reqs[name], ticket=name)
        for ticket, event in batch.step():
            if isinstance(event, RowFailed):
                failed[ticket] = event.error
            elif hasattr(event, "finish_reason"):
                outputs[ticket][event.row] = event
        if not batch:
            break
    assert fired and list(failed) == ["C"] and isinstance(failed["C"], torch.OutOfMemoryError)
    assert outputs["C"] == [None]
    for name in ("A", "B"):
        for a, b in zip(outputs[name], expected[name]):
            same(a, b)


def drain(batch, outputs, failed=None):
    """Step `batch` until empty, collecting rows per ticket (`outputs[ticket][row]`) and failures."""
    while batch:
        for ticket, event in batch.step():
            if isinstance(event, RowFailed):
                if failed is not None:
                    failed.append((ticket, event.row, type(event.error).__name__))
            elif hasattr(event, "finish_reason"):
                outputs.setdefault(ticket, {})[event.row] = event


@pytest.mark.parametrize("sampling", [GREEDY, HOT], ids=["greedy", "sampled"])
def test_a_failed_request_leaves_in_the_step_it_fails_and_its_ticket_means_nothing_after(
    pair, tokenizer, sampling
):
    # B's first row is fine, its second overflows (inf alpha). B must leave in that very step with
    # both rows, so a later request under the same ticket (CPython reuses an `id` as soon as its
    # object is freed) decodes in full instead of being skipped as cancelled. Greedy rows fail too:
    # an argmax of NaN logits is no token.
    make_source = lambda: ModelSource(pair.after.model, pair.before.model)  # noqa: E731
    reqs = requests(tokenizer)
    ok = Row(reqs["A"][0][0].prompt_ids, 1.0, 3)
    config = DecodeConfig(8, sampling, frozenset({tokenizer.eos_token_id}))
    expected = alone(make_source, tokenizer, {"A": reqs["A"], "again": ([ok], config)})
    batch = RunningBatch(make_source, tokenizer)
    batch.admit(*reqs["A"], ticket="A")
    batch.admit([ok, Row(ok.prompt_ids, float("inf"), 4)], config, ticket="B")
    failed = [(t, e.row) for t, e in batch.step() if isinstance(e, RowFailed)]
    assert failed == [("B", 1)]
    assert [live.ticket for live in batch.live] == ["A", "A"]  # B's good row left with it
    assert batch.mask.shape[0] == len(batch.live) == batch.alphas.shape[0]
    batch.admit([ok], config, ticket="B")  # the ticket again, as a reused id would be
    outputs = {}
    drain(batch, outputs)
    for a, b in zip([outputs["A"][0], outputs["A"][1]], expected["A"]):
        same(a, b)
    same(outputs["B"][0], expected["again"][0])


def test_greedy_rows_without_a_finite_maximum_raise_like_sampled_ones():
    for logits in ([0.0, float("nan")], [float("inf"), 0.0], [float("-inf")] * 2):
        with pytest.raises(NonFiniteLogitsError):
            sample(torch.tensor(logits), GREEDY, None)
    assert sample(torch.tensor([float("-inf"), 1.0]), GREEDY, None) == 1  # masked tokens are fine


def test_an_out_of_memory_victim_takes_its_padding_columns_with_it(pair, tokenizer):
    # The request admitted last has the longest prompt, so when it fails the step out of memory
    # the columns only it reached are padding for every row left: they go, and the caches keep
    # the width the token budget assumes.
    make_source = lambda: ModelSource(pair.after.model, pair.before.model)  # noqa: E731
    reqs = requests(tokenizer)
    short = ([reqs["A"][0][0]], reqs["A"][1])  # "Hello world"
    long = ([Row(reqs["A"][0][1].prompt_ids, 1.0)], reqs["A"][1])
    expected = alone(make_source, tokenizer, {"short": short})
    fired = []
    batch = RunningBatch(out_of_memory_once(make_source, 2, fired), tokenizer)
    batch.admit(*short, ticket="short")
    batch.admit(*long, ticket="long")
    failed = [t for t, e in batch.step() if isinstance(e, RowFailed)]
    assert fired and failed == ["long"]
    assert padding_columns(batch.mask) == 0
    for cache in batch.source.caches:  # the retried forward wrote the step's token: mask-wide
        assert all(layer.keys.shape[-2] == batch.mask.shape[-1] for layer in cache.layers)
    outputs = {}
    drain(batch, outputs)
    same(outputs["short"][0], expected["short"][0])


class _Faults:
    """Counts torch.cat / torch.index_select calls and raises CUDA's out-of-memory error at call `at`."""

    def __init__(self, monkeypatch, at: int | None = None) -> None:
        self.calls, self.at = 0, at
        for name in ("cat", "index_select"):
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(*args, **kwargs)

        return call


def test_out_of_memory_anywhere_in_a_join_leaves_the_running_rows_as_they_were(make_source, tokenizer, monkeypatch):
    # B (a shared prompt, expanded at the join) joins A after two steps. Out of memory at each
    # allocation the admission makes (its prefill, the expansions, every layer of every model's
    # cache join, the masks): the join fails as a whole, A goes on exactly as alone, and B, admitted
    # again, decodes as alone too.
    reqs = requests(tokenizer)
    expected = alone(make_source, tokenizer, reqs)

    def run(at):
        batch = RunningBatch(make_source, tokenizer)
        batch.admit(*reqs["A"], ticket="A")
        outputs = {}
        for _ in range(2):
            for ticket, event in batch.step():
                if hasattr(event, "finish_reason"):
                    outputs.setdefault(ticket, {})[event.row] = event
        with monkeypatch.context() as m:
            faults = _Faults(m, at)
            try:
                batch.admit(*reqs["B"], ticket="B")
                joined = True
            except torch.OutOfMemoryError:
                joined = False
        if not joined:
            batch.admit(*reqs["B"], ticket="B")
        drain(batch, outputs)
        for name in ("A", "B"):
            for k, b in enumerate(expected[name]):
                same(outputs[name][k], b)
        return faults.calls, joined

    calls, joined = run(None)
    assert joined and calls > 8
    for at in range(1, calls + 1):
        assert run(at) == (at, False), at
