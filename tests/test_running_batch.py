"""Continuous batching in the library: rows that join a running batch at step boundaries, or leave
it, decode exactly what they decode alone (greedy and seeded; two models, adapter mode, and a pair
whose logits widths differ)."""

from __future__ import annotations

import pytest
import torch

from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.cache_ops import padding_columns
from lda.decode import RowFailed, RunningBatch
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
