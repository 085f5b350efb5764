"""Generation plumbing every lens shares, run on the engine thread: sampling parameters from a
request, seeds, and draining a decode while forwarding its events and checking the cancel flag."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lda import RowOutput, SamplingParams, TokenEvent

from app.api.schemas import SamplingFields
from app.engine import Job


@dataclass
class Usage:
    """What the route reports to metrics after the job."""

    first_token_at: float | None = None
    tokens: int = 0


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
