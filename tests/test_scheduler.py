"""The scheduler alone: works of one key share a batch, room and re-padding decide admission,
and a model whose caches cannot be re-padded serves one work at a time (with a log line)."""

from __future__ import annotations

import logging

from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.source import ModelSource

from app.scheduler import BatchWork, Scheduler


class FakeJob:
    cancelled = False


class FixedCaches(ModelSource):
    """A source whose caches claim not to be re-paddable (as sliding-window ones are)."""

    repaddable = False


def work(pair, tokenizer, source_cls, prompt, seed):
    config = DecodeConfig(6, SamplingParams(1.0), frozenset({tokenizer.eos_token_id}))
    rows = [Row(tuple(tokenizer(prompt)["input_ids"]), 1.0, seed)]
    make = lambda: source_cls(pair.after.model, pair.before.model)  # noqa: E731
    return BatchWork("pair", make, tokenizer, rows, config), make


def run(scheduler, items):
    """Submit every work at once, step until all ended; returns outputs per work and peak rows."""
    ended, peak = {}, 0
    for i, w in enumerate(items):
        for item in scheduler.submit(FakeJob(), i, w):
            ended[item.resume] = item
    while scheduler.busy:
        peak = max(peak, scheduler.rows)
        for item in scheduler.step():
            ended[item.resume] = item
    return [ended[i].outputs for i in range(len(items))], peak


def test_works_share_a_batch_or_go_one_at_a_time_when_caches_cannot_be_repadded(pair, tokenizer, caplog):
    prompts = ["Hello world", "What should I do if I feel bored today?", "Hi"]
    for source_cls, shared in ((ModelSource, True), (FixedCaches, False)):
        items, alone = [], []
        for k, p in enumerate(prompts):
            w, make = work(pair, tokenizer, source_cls, p, seed=k)
            items.append(w)
            alone.append(collect(decode(make(), tokenizer, w.rows, w.config), 1))
        with caplog.at_level(logging.WARNING, logger="app.scheduler"):
            outputs, peak = run(Scheduler(max_rows=64), items)
        assert [[o.token_ids for o in out] for out in outputs] == [[o.token_ids for o in a] for a in alone]
        assert peak == (3 if shared else 1)
        assert ("cannot be re-padded" in caplog.text) == (not shared)


def test_a_full_batch_admits_work_as_rows_leave(pair, tokenizer):
    items = [work(pair, tokenizer, ModelSource, "Hello world", seed=k)[0] for k in range(4)]
    outputs, peak = run(Scheduler(max_rows=2), items)
    assert peak == 2 and all(out[0] is not None for out in outputs)
