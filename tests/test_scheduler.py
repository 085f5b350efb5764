"""The scheduler alone: works of one key share a batch; rows, padded tokens, the prefill budget
and re-padding decide admission; interactive works go before background ones; a step out of
memory fails the work admitted last and lowers the budget; a model whose caches cannot be
re-padded serves one work at a time (with a log line)."""

from __future__ import annotations

import logging

import torch

from lda import DecodeConfig, Row, SamplingParams, collect, decode
from lda.source import ModelSource

from app.scheduler import BACKOFF, BatchWork, Scheduler
from tests.test_running_batch import out_of_memory_once


class FakeJob:
    cancelled = False

    def __init__(self, background: bool = False) -> None:
        self.background = background


class FixedCaches(ModelSource):
    """A source whose caches claim not to be re-paddable (as sliding-window ones are)."""

    repaddable = False


def work(pair, tokenizer, source_cls, prompt, seed, n=1):
    config = DecodeConfig(6, SamplingParams(1.0), frozenset({tokenizer.eos_token_id}))
    rows = [Row(tuple(tokenizer(prompt)["input_ids"]), 1.0, seed + k) for k in range(n)]
    make = lambda: source_cls(pair.after.model, pair.before.model)  # noqa: E731
    return BatchWork("pair", make, tokenizer, rows, config), make


def alone(items, make, tokenizer):
    return [[o.token_ids for o in collect(decode(make(), tokenizer, w.rows, w.config), len(w.rows))] for w in items]


def run(scheduler, items, jobs=None, watch=lambda: None):
    """Submit every work at once, step until all ended; returns outputs per work and peak rows.
    `watch()` runs after every step (and before the first)."""
    ended, peak = {}, 0
    for i, w in enumerate(items):
        scheduler.submit(jobs[i] if jobs else FakeJob(), i, w)
    while scheduler.busy:
        watch()
        peak = max(peak, scheduler.rows)
        for item in scheduler.step():
            ended[item.resume] = item
    return [ended[i].outputs for i in range(len(items))], peak


def token_ids(outputs):
    return [[o.token_ids for o in out] for out in outputs]


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


PROMPTS = ["Hello world", "What is a cat?", "Tell me about the sun.", "Hi", "What should I do today?"]


def test_the_token_budget_bounds_the_batch_and_a_larger_work_runs_alone(pair, tokenizer):
    items = [work(pair, tokenizer, ModelSource, "Hello world", seed=k, n=3 if k == 1 else 1)[0] for k in range(4)]
    make = lambda: ModelSource(pair.after.model, pair.before.model)  # noqa: E731
    scheduler = Scheduler(max_rows=64, max_tokens=2 * items[0].width)  # two one-row works
    seen = []
    outputs, peak = run(scheduler, items, watch=lambda: seen.append((scheduler.rows, len(scheduler.admitted))))
    assert token_ids(outputs) == alone(items, make, tokenizer)
    assert peak == 3  # the three-row work, over the budget, ran
    assert all(works == 1 for rows, works in seen if rows > 2)  # ...alone
    assert (2, 2) in seen  # the two last works shared the batch


def test_a_flood_of_prefills_joins_one_budget_per_step_and_together(pair, tokenizer):
    prefills = []

    def make():
        prefills.append(1)  # a fresh source per prefill forward
        return ModelSource(pair.after.model, pair.before.model)

    items = [work(pair, tokenizer, ModelSource, p, seed=k)[0] for k, p in enumerate(PROMPTS)]
    expected = alone(items, make, tokenizer)
    items = [BatchWork(w.key, make, w.tokenizer, w.rows, w.config) for w in items]
    for budget, joined_per_step, forwards in ((min(w.prompt_tokens for w in items), 1, 5), (None, 5, 2)):
        scheduler = Scheduler(max_rows=64, max_prefill_tokens=budget)
        admitted = []
        prefills.clear()
        outputs, _ = run(scheduler, items, watch=lambda: admitted.append(len(scheduler.admitted)))
        assert token_ids(outputs) == expected
        # with the budget the rows decoding get a step between two admissions (one more per step);
        # without it every work joins at the first step: the first starts the batch, the other four
        # are prefilled in one forward and joined once
        assert admitted[1 : 1 + 5 // joined_per_step] == list(range(joined_per_step, 6, joined_per_step))
        assert len(prefills) == forwards


def test_interactive_works_join_before_background_ones(pair, tokenizer):
    items = [work(pair, tokenizer, ModelSource, p, seed=k)[0] for k, p in enumerate(PROMPTS[:4])]
    jobs = [FakeJob(), FakeJob(background=True), FakeJob(background=True), FakeJob()]
    scheduler = Scheduler(max_rows=1)  # one work at a time: admission order is completion order
    order = []
    real_step = scheduler.step

    def step():
        ended = real_step()
        order.extend(item.resume for item in ended)
        return ended

    scheduler.step = step
    run(scheduler, items, jobs)
    assert order == [0, 3, 1, 2]


def test_a_step_out_of_memory_fails_the_last_work_and_lowers_the_budget(pair, tokenizer):
    items = [work(pair, tokenizer, ModelSource, p, seed=k)[0] for k, p in enumerate(PROMPTS[:3])]
    make = lambda: ModelSource(pair.after.model, pair.before.model)  # noqa: E731
    expected = alone(items, make, tokenizer)
    fired = []
    failing_once = out_of_memory_once(make, 3, fired)
    items = [BatchWork(w.key, failing_once, w.tokenizer, w.rows, w.config) for w in items]
    scheduler = Scheduler(max_rows=64, max_tokens=10**6)
    ended = {}
    for i, w in enumerate(items):
        scheduler.submit(FakeJob(), i, w)
    while scheduler.busy:
        for item in scheduler.step():
            ended[item.resume] = item
    assert fired and isinstance(getattr(ended[2], "error", None), torch.OutOfMemoryError)
    assert token_ids([ended[0].outputs, ended[1].outputs]) == expected[:2]
    # below what failed (three works) by the margin, never below what the batch held after (two)
    held, failed = 2 * max(w.width for w in items[:2]), 3 * max(w.width for w in items)
    assert scheduler.max_tokens == max(held, int(failed * BACKOFF)) < failed


def test_a_request_submitted_after_a_neighbour_fails_is_served(pair, tokenizer):
    # X fails in a step (its second row overflows) while its first row was fine; Y, queued right
    # after, must be served: its rows carry a ticket no earlier request ever had (tickets were
    # `id()`s, which CPython reuses as soon as X's InFlight is freed).
    x, make = work(pair, tokenizer, ModelSource, "Hello world", seed=1)
    x.rows.append(Row(x.rows[0].prompt_ids, float("inf"), 2))
    y, _ = work(pair, tokenizer, ModelSource, "What is a cat?", seed=3)
    scheduler = Scheduler(max_rows=64)
    scheduler.submit(FakeJob(), "x", x)
    ended = {item.resume: item for item in scheduler.step()}
    assert "x" in ended and ended["x"].error is not None
    scheduler.submit(FakeJob(), "y", y)
    for _ in range(20):
        ended.update({item.resume: item for item in scheduler.step()})
    assert not scheduler.busy and token_ids([ended["y"].outputs]) == alone([y], make, tokenizer)
    tickets = [scheduler_item.ticket for scheduler_item in ended.values()]
    assert len(set(tickets)) == len(tickets)


def fails_to_prefill(make, prompt_tokens: int):
    """`make` whose sources run out of memory prefilling a prompt of `prompt_tokens` tokens or more."""

    def make_failing():
        source = make()
        real = source.prefill

        def prefill(ids, mask, positions):
            if ids.shape[-1] >= prompt_tokens:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(ids, mask, positions)

        source.prefill = prefill
        return source

    return make_failing


def test_an_oversized_prefill_lowers_the_budget_by_its_own_size_and_the_budget_recovers(pair, tokenizer, caplog):
    # One short request decodes; a long prompt joining it runs out of memory in its prefill. The
    # budget must not drop to what the lone request holds (that left the server decoding one
    # request at a time until restart): it drops below what failed, four later requests still
    # share a step, and clean steps raise it back to the configured value, each change logged.
    long_prompt = "What should I do if I feel bored today? Tell me everything about it, please. " * 2
    first, make = work(pair, tokenizer, ModelSource, "Hi", seed=0)
    oversized, _ = work(pair, tokenizer, ModelSource, long_prompt, seed=1)
    failing = fails_to_prefill(make, len(oversized.rows[0].prompt_ids))
    first, oversized = (BatchWork(w.key, failing, w.tokenizer, w.rows, w.config) for w in (first, oversized))
    configured = 10**6
    scheduler = Scheduler(max_rows=64, max_tokens=configured, recover_after=4)
    scheduler.submit(FakeJob(), "first", first)
    scheduler.step()
    scheduler.submit(FakeJob(), "oversized", oversized)
    with caplog.at_level(logging.WARNING, logger="app.scheduler"):
        ended = {item.resume: item for item in scheduler.step()}
    assert isinstance(ended["oversized"].error, torch.OutOfMemoryError)
    held, failed = first.width, 2 * oversized.width
    assert scheduler.max_tokens == max(held, int(failed * BACKOFF)) > 4 * first.width
    assert "out of memory: a running batch now holds at most" in caplog.text
    while scheduler.busy:
        scheduler.step()
    later = [work(pair, tokenizer, ModelSource, "Hi", seed=10 + k)[0] for k in range(4)]
    _, peak = run(scheduler, later)
    assert peak == 4  # they shared a step
    with caplog.at_level(logging.WARNING, logger="app.scheduler"):
        for _ in range(20):
            run(scheduler, [work(pair, tokenizer, ModelSource, "Hi", seed=20)[0]])
            if scheduler.max_tokens == configured:
                break
    assert scheduler.max_tokens == configured and "recovered:" in caplog.text


def test_a_background_work_joins_within_bounded_steps_under_steady_interactive_load(pair, tokenizer):
    # 8 rows; a 6-row experiment chunk waits while one 1-row request arrives every step. Without
    # promotion the requests, which always fit, took every freed row and the chunk never joined.
    # With it the chunk joins once it waited `promote_after` steps and rows drain for it, and
    # every request still joins within a bound (nothing waits longer than the rows ahead need).
    def one(prompt, seed, n=1, length=6):
        config = DecodeConfig(length, SamplingParams(1.0), frozenset())  # no EOS: every row runs `length` steps
        rows = [Row(tuple(tokenizer(prompt)["input_ids"]), 1.0, seed + k) for k in range(n)]
        return BatchWork("pair", lambda: ModelSource(pair.after.model, pair.before.model), tokenizer, rows, config)

    promote = 16
    scheduler = Scheduler(max_rows=8, promote_after=promote)
    queued, joined = {}, {}
    for step in range(120):
        if step == 4:
            scheduler.submit(FakeJob(background=True), "chunk", one("What is a cat?", 100, n=6, length=8))
            queued["chunk"] = step
        scheduler.submit(FakeJob(), step, one("Hello world", step))
        queued[step] = step
        scheduler.step()
        for item in scheduler.admitted.values():
            joined.setdefault(item.resume, step)
    assert "chunk" in joined
    # it waits `promote` steps, then at most one request's lifetime (6 steps) for 6 rows to drain
    assert joined["chunk"] - queued["chunk"] <= promote + 6
    waits = [joined[k] - queued[k] for k in queued if k != "chunk" and k in joined]
    # a request waits at most while the chunk waits for rows (6 steps) and runs (8 steps): with 8
    # rows of 6 steps the requests' capacity (8/6 per step) exceeds their arrivals, so the backlog
    # built meanwhile drains, and late requests join at once again
    assert len(waits) > 100 and max(waits) <= 6 + 8, waits
    assert max(waits[-30:]) == 0
