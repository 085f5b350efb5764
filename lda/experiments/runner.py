"""Run an experiment chunk by chunk through a `generate` callback; knows no engine and no HTTP.

The server passes a `generate` that decodes rows through the LDA loop on its engine thread and
calls `step` once per engine turn, so interactive requests can go between chunks; a cancel is
honoured at the next chunk boundary. Every chunk is committed before the next starts, so a crash
loses at most the chunk in flight and `step` after a restart continues where the disk says.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from lda.experiments.detectors import Detectors
from lda.experiments.spec import Condition, ExperimentSpec, Prompt, prompt_to_json, samples
from lda.experiments.store import FINAL, ExperimentRecord, ExperimentStore, ExperimentStoreError

STOPPED = (*FINAL, "failed")  # step leaves these alone

# rows: [(prompt, condition, seed)] in sample-index order -> [(completion, finish_reason)], same order.
Generate = Callable[[list[tuple[Prompt, Condition, int]]], Sequence[tuple[str, str]]]


def _done(steps: Generator[Any, Any, Any]) -> Any:
    """The result of a generator that must finish without yielding (a plain `generate`)."""
    try:
        next(steps)
    except StopIteration as stop:
        return stop.value
    steps.close()
    raise RuntimeError("generate yielded work: drive it with the *_steps variant")


def run_chunk(
    spec: ExperimentSpec, index_range: range, generate: Generate, detectors: Detectors | None = None
) -> list[dict[str, Any]]:
    """Decode samples `index_range` and score them; one record per sample, in index order.

    Rows come in index order, so rows sharing a prompt and a condition are adjacent (the spec's
    condition-major order); `generate` may group them to prefill each prompt once.
    """
    return _done(run_chunk_steps(spec, index_range, generate, detectors))


def run_chunk_steps(
    spec: ExperimentSpec, index_range: range, generate: Any, detectors: Detectors | None = None
) -> Generator[Any, Any, list[dict[str, Any]]]:
    """`run_chunk` for a `generate` that may be a generator function: what it yields (work for a
    scheduler) is passed up and what is sent back goes down to it (`yield from`)."""
    detectors = detectors or Detectors(spec.detectors)
    refs = list(samples(spec, index_range.start, index_range.stop))
    rows = [(spec.prompts[r.prompt_index], spec.conditions[r.condition_index], r.seed) for r in refs]
    outputs = generate(rows)
    if inspect.isgenerator(outputs):
        outputs = yield from outputs
    outputs = list(outputs)
    if len(outputs) != len(rows):
        raise RuntimeError(f"generate returned {len(outputs)} outputs for {len(rows)} rows")
    records = []
    for ref, (prompt, condition, _), (completion, finish_reason) in zip(refs, rows, outputs):
        records.append(
            {
                "index": ref.index,
                "prompt_index": ref.prompt_index,
                "prompt": prompt_to_json(prompt),
                "condition_index": ref.condition_index,
                "condition": condition.label,
                "sample_index": ref.sample_index,
                "seed": ref.seed,
                "completion": completion,
                "finish_reason": finish_reason,
                "hits": detectors.detect(completion),
            }
        )
    return records


def step(
    store: ExperimentStore, exp_id: str, generate: Generate, clock: Callable[[], float] = time.monotonic
) -> ExperimentRecord:
    """Run the next chunk of `exp_id` and commit it; returns the record afterwards.

    Done, cancelled and failed experiments are returned unchanged (`store.requeue` a failed one
    first); a queued or interrupted one starts or continues at `store.resume_point`. A pending
    cancel ends the experiment here, before any work. A store write error or an exception from
    `generate` marks it failed with the message, keeping every committed chunk (`requeue` resumes
    it later); the exception is not re-raised, the record's `error` carries it. An exception while
    a cancel is pending (the server aborting the chunk it cancels) ends it as cancelled instead.
    """
    return _done(step_steps(store, exp_id, generate, clock))


def step_steps(
    store: ExperimentStore, exp_id: str, generate: Any, clock: Callable[[], float] = time.monotonic
) -> Generator[Any, Any, ExperimentRecord]:
    """`step` for a `generate` that may be a generator function (see `run_chunk_steps`); an
    exception thrown in at its yield is the generation's failure, handled as in `step`."""
    record = store.require(exp_id)
    if record.status in STOPPED:
        return record
    if record.cancel_requested:
        return store.finish_cancelled(exp_id)
    spec = store.spec(exp_id)  # parsed once per experiment, not per chunk
    try:
        if record.status != "running":
            record = store.mark_running(exp_id)
        start = store.resume_point(exp_id)
        chunk = range(start, min(start + spec.chunk_size, spec.total))
        began = clock()
        records = yield from run_chunk_steps(spec, chunk, generate)
        return store.commit_chunk(exp_id, chunk, records, seconds=clock() - began)
    except ExperimentStoreError as exc:
        return store.fail(exp_id, str(exc))
    except Exception as exc:  # the engine's fault (OOM, a bad adapter): this experiment only
        if store.require(exp_id).cancel_requested:
            return store.finish_cancelled(exp_id)
        return store.fail(exp_id, f"generation failed: {type(exc).__name__}: {exc}")


def run(
    store: ExperimentStore, exp_id: str, generate: Generate, max_chunks: int | None = None
) -> ExperimentRecord:
    """Step until the experiment is done, cancelled or failed (or `max_chunks` chunks ran)."""
    record = store.require(exp_id)
    ran = 0
    while record.status not in STOPPED and (max_chunks is None or ran < max_chunks):
        record = step(store, exp_id, generate)
        ran += 1
    return record
