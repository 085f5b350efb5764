"""Generation plumbing every lens shares, run on the engine thread: sampling parameters from a
request, seeds, and draining a decode while forwarding its events and checking the cancel flag."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lda import DecodeConfig, Row, RowOutput, SamplingParams, TokenEvent

from app.api.schemas import SamplingFields
from app.engine import Job
from app.scheduler import BatchWork


@dataclass
class Usage:
    """What the route reports to metrics after the job."""

    first_token_at: float | None = None
    tokens: int = 0
    prefill_seconds: float = 0.0  # in running batches: prefilling its prompts, then decoding its rows
    decode_seconds: float = 0.0


def sampling_params(req: SamplingFields) -> SamplingParams:
    temperature = req.temperature if req.do_sample else 0.0
    return SamplingParams(temperature=temperature, top_k=req.top_k, top_p=req.top_p)


def base_seed(req: SamplingFields) -> int:
    return req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)


def run_events(
    job: Job,
    events: Iterator[TokenEvent | RowOutput],
    n_rows: int,
    usage: Usage,
    on_event: Callable[[Any], None],
) -> list[RowOutput] | None:
    """Drain a decode, forwarding events; None when the job was cancelled part-way."""
    outputs: list[RowOutput | None] = [None] * n_rows
    for event in events:
        if isinstance(event, TokenEvent):
            if usage.first_token_at is None:
                usage.first_token_at = time.perf_counter()
            usage.tokens += 1
        else:
            outputs[event.row] = event
        on_event(event)
        if job.cancelled:
            events.close()  # type: ignore[attr-defined]
            return None
    return outputs  # type: ignore[return-value]


@dataclass(frozen=True)
class BatchTarget:
    """Where rows decode in the engine's running batches: rows with equal keys share a batch."""

    key: Hashable
    make_source: Callable[[], Any]
    tokenizer: Any


def in_batches(
    target: BatchTarget,
    rows: Sequence[Row],
    config: DecodeConfig,
    usage: Usage,
    on_event: Callable[[Any], None],
    chunks: Sequence[range] | None = None,
) -> Generator[BatchWork, Any, list[RowOutput] | None]:
    """Decode rows in the engine's running batch, chunk after chunk (`yield from` it in a job);
    events and outputs carry global row indices. None when the job was cancelled part-way."""
    outputs: list[RowOutput | None] = [None] * len(rows)
    for chunk in chunks or [range(len(rows))]:

        def forward(event: Any, offset: int = chunk.start) -> None:
            if isinstance(event, TokenEvent):
                if usage.first_token_at is None:
                    usage.first_token_at = time.perf_counter()
                usage.tokens += 1
            on_event(dataclasses.replace(event, row=event.row + offset))

        work = BatchWork(target.key, target.make_source, target.tokenizer, [rows[i] for i in chunk], config, forward)
        part = yield work
        usage.prefill_seconds += work.prefill_seconds
        usage.decode_seconds += work.decode_seconds
        if part is None:
            return None
        for out in part:
            outputs[out.row + chunk.start] = dataclasses.replace(out, row=out.row + chunk.start)
    return outputs  # type: ignore[return-value]


def row_body(out: RowOutput, shown_prompt: str) -> dict[str, Any]:
    """The fields every route reports for one decoded row; `shown_prompt` is the readable prompt."""
    return {
        "completion": out.text,
        "text": shown_prompt + out.text,
        "tokens_generated": out.tokens_generated,
        "stopped_early": out.stopped_early,
        "finish_reason": out.finish_reason,
    }


def emit_text(job: Job, **labels: Any) -> Callable[[Any], None]:
    """An event handler that streams each row's new text: sampled tokens, then any tail the stop
    check held back. `labels` (e.g. the column) go into every item."""

    def forward(event: Any) -> None:
        if isinstance(event, TokenEvent) and event.text:
            job.emit({**labels, "row": event.row, "token_id": event.token_id, "text": event.text})
        elif isinstance(event, RowOutput) and event.tail:
            job.emit({**labels, "row": event.row, "token_id": None, "text": event.tail})

    return forward
