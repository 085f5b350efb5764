"""QUEUE_SIZE bounds everything that waits: jobs not started and decode works not yet in a batch."""

from __future__ import annotations

import asyncio
import threading

from lda import DecodeConfig, Row, SamplingParams
from lda.source import ModelSource

from app.engine import Engine, QueueFullError
from app.scheduler import BatchWork


def test_a_full_server_refuses_at_once_and_the_gauge_counts_what_waits(pair, tokenizer):
    # 300 one-row requests 5 ms apart against QUEUE_SIZE=4 and two rows per batch. The engine used
    # to move every queued job into the scheduler's unbounded queue at once: all 300 accepted, 277
    # waiting there at peak, while the waiting gauge read 0.
    prompt = tuple(tokenizer("Tell me about the sun.")["input_ids"])
    config = DecodeConfig(16, SamplingParams(1.0), frozenset())
    make = lambda: ModelSource(pair.after.model, pair.before.model)  # noqa: E731

    def decode_job(seed):
        def fn(job):
            outputs = yield BatchWork("pair", make, tokenizer, [Row(prompt, 1.0, seed)], config)
            return outputs

        return fn

    gauge: list[int] = []
    engine = Engine(queue_size=4, on_change=lambda waiting, *rest: gauge.append(waiting), max_batch_rows=2)
    peak, stop = [0], threading.Event()

    def watch() -> None:  # what really waits, read off the engine's own structures
        while not stop.is_set():
            queued = engine._queue.qsize() + len(engine._deferred) + engine.scheduler.queued
            peak[0] = max(peak[0], queued)
            stop.wait(0.0005)

    async def flood() -> tuple[int, int, list]:
        accepted, refused, futures = 0, 0, []
        for seed in range(300):
            try:
                futures.append(engine.submit(decode_job(seed)).future)
                accepted += 1
            except QueueFullError:
                refused += 1
            await asyncio.sleep(0.005)
        return accepted, refused, await asyncio.gather(*futures)

    engine.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        accepted, refused, results = asyncio.run(flood())
    finally:
        stop.set()
        watcher.join()
        engine.stop()
    assert refused > 0 and accepted + refused == 300
    assert all(out is not None and out[0].tokens_generated == 16 for out in results)
    assert peak[0] <= 4
    assert max(gauge) == 4 and gauge[-1] == 0
