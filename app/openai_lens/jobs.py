"""What the OpenAI-compatible routes run on the engine thread: a lens, prompts, choices.

A request is one `Work`: prompts (text, token ids or chat messages) x n choices, decoded under one
lens with the native routes' semantics, so choice i of prompt p with `seed` decodes exactly what
`/generate_lda` decodes for row p * n + i with that seed (same formula, generators and stopping).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from amplification import field_path, merged
from lda import LDAModelPair, Row, RowOutput, SamplingParams, TokenEvent, TokenLogprobs, decode
from lda.pair import Side, check_context, encode
from lda.score import prompt_logprobs
from lda.source import ModelSource, context_window

from app.amplification_lens.jobs import adapter_target
from app.amplification_lens.jobs import text_side as base_side
from app.api.chunking import plan_chunks
from app.api.generation import BatchTarget, Usage, in_batches, run_events
from app.diffing_lens.steering import steer_target
from app.engine import Job
from app.lda_lens.jobs import pair_target, side_target
from app.openai_lens.logprobs import Pieces
from app.openai_lens.models import Lens

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # OpenAI names both ends "stop"


@dataclass(frozen=True)
class Target:
    """A resolved lens: where logits come from, whose tokenizer, whose context windows, and the
    running batch its rows join (None for a merged adapter: the weights change for its decode)."""

    source: Callable[[], Any]
    side: Side
    models: tuple[Any, ...]
    alpha: float
    batch: BatchTarget | None = None


@contextlib.contextmanager
def open_lens(
    lens: Lens, alpha: float, adapter: str | None, pair: LDAModelPair, amp: Any, steering: Any = None
) -> Iterator[Target]:
    """The lens, ready to decode; an adapter model is merged in place for the duration, restored
    after (also on errors and cancellation). `steering` (models after and lda only) adds an ADL
    vector to the after model."""
    if steering is not None:
        alone = lens.kind == "after"
        batch = steer_target(pair, steering, alone=alone)
        models = (pair.after.model,) if alone else (pair.after.model, pair.before.model)
        yield Target(batch.make_source, pair.after, models, 0.0 if alone else alpha, batch)
        return
    if lens.kind in ("after", "before"):
        side = pair.after if lens.kind == "after" else pair.before
        batch = side_target(side)
        yield Target(batch.make_source, side, (side.model,), 0.0, batch)
        return
    if lens.kind == "lda" and adapter is None:
        batch = pair_target(pair)
        yield Target(batch.make_source, pair.after, (pair.after.model, pair.before.model), alpha, batch)
        return
    with field_path("model" if lens.adapter else "adapter"):
        compiled = amp.lookup(adapter)
    side = base_side(amp.pair)
    if lens.kind == "lda":  # adapter mode: base + adapter vs base in one forward
        batch = adapter_target(amp, compiled)
        yield Target(batch.make_source, side, (amp.model,), alpha, batch)
        return
    plan = amp.plan(compiled)
    with merged(amp.model, plan):
        yield Target(lambda: ModelSource(amp.model), side, (amp.model,), 0.0)


@dataclass(frozen=True)
class Work:
    """One request's generation, route-independent."""

    prompts: list[str] | list[list[int]] | list[list[dict[str, Any]]]
    kind: str  # "text" | "ids" | "chat"
    n: int
    max_tokens: int | None  # None: as many as fit (chat), capped by `limit`
    limit: int  # the server's MAX_NEW_TOKENS_LIMIT
    sampling: SamplingParams
    stop: tuple[str, ...]
    seed: int
    logprobs: int | None  # None: no logprobs; k: the chosen token's and the top k
    echo: bool = False
    add_generation_prompt: bool = True
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_batch_tokens: int | None = None  # MAX_BATCH_TOKENS: larger choices x prompts run in chunks
    steering: Any = None  # a resolved `steer` (app.diffing_lens.steering.Steering)


@dataclass
class Choice:
    index: int
    prompt_index: int
    output: RowOutput | None  # None when max_tokens is 0 (echo only)
    prompt_ids: tuple[int, ...]
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class Result:
    choices: list[Choice]
    side: Side
    prompt_tokens: int
    prompt_texts: list[str]


def usage_body(result: Result) -> dict[str, int]:
    """OpenAI's `usage`: each prompt counted once, every choice's generated tokens (EOS included)."""
    completion = sum(c.output.tokens_generated for c in result.choices if c.output is not None)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}  # fmt: skip


def prompt_ids(work: Work, side: Side, i: int) -> tuple[str, tuple[int, ...]]:
    """(prompt text, ids) of prompt i as vLLM encodes it: completions add the tokenizer's special
    tokens (BOS) to text, take ids as they are, and chat messages go through the chat template."""
    tok = side.tokenizer
    prompt = work.prompts[i]
    if work.kind == "ids":
        ids = tuple(prompt)  # type: ignore[arg-type]
        vocab = len(tok)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary of {vocab}")
        return tok.decode(list(ids), skip_special_tokens=True), ids
    if work.kind == "text":
        return prompt, encode(tok, prompt, templated=False)  # type: ignore[arg-type]
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"messages: the model {side.model_id!r} has no chat template; use /v1/completions")
    formatted = tok.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=work.add_generation_prompt, **work.template_kwargs
    )
    return formatted, encode(tok, formatted, templated=True)


def completion_job(
    work: Work, lens: Lens, alpha: float, adapter: str | None, pair: LDAModelPair, amp: Any, usage: Usage
) -> Callable[[Job], Result | None]:
    """The engine job: encode, check the context, score the prompts (echo), decode the choices."""

    def run(job: Job) -> Generator[Any, Any, Result | None]:
        with open_lens(lens, alpha, adapter, pair, amp, work.steering) as target:
            texts, ids = zip(*(prompt_ids(work, target.side, i) for i in range(len(work.prompts))))
            window = context_window(target.models)
            max_tokens = work.max_tokens
            if max_tokens is None:  # as much as fits, up to the server's limit
                room = window - max(map(len, ids)) if window is not None else work.limit
                max_tokens = max(1, min(work.limit, room))
            for p in ids:
                if not p:
                    raise ValueError("prompt: encodes to no tokens")
                check_context(len(p), max_tokens, *target.models)
            choices = [
                Choice(p * work.n + k, p, None, ids[p]) for p in range(len(ids)) for k in range(work.n)
            ]
            for c in choices:  # streams start here: everything above may still fail with a 400
                job.emit({"choice": c.index, "start": texts[c.prompt_index]})
            if work.echo and work.logprobs is not None:
                scored = [
                    prompt_logprobs(target.source(), p, target.alpha, work.logprobs, target.side.pad_id)
                    for p in ids
                ]
                for c in choices:
                    c.prompt_logprobs = scored[c.prompt_index]
            if max_tokens > 0:
                rows = [Row(c.prompt_ids, target.alpha, work.seed + c.index) for c in choices]
                config = pair.decode_config(
                    max_tokens, work.sampling, work.stop, details=work.logprobs is not None, side=target.side
                )
                config = dataclasses.replace(config, top_logprobs=work.logprobs or 0)
                pieces = [Pieces(target.side.tokenizer, c.prompt_ids) for c in choices]
                if target.batch is not None:
                    chunks = plan_chunks(rows, max_tokens, work.max_batch_tokens) if work.max_batch_tokens else None
                    outputs = yield from in_batches(target.batch, rows, config, usage, forward(job, pieces), chunks)
                else:  # merged weights: decoded here, whole, before anything else runs
                    events = decode(target.source(), target.side.tokenizer, rows, config)
                    outputs = run_events(job, events, len(rows), usage, forward(job, pieces))
                if outputs is None:
                    return None
                for c, out in zip(choices, outputs):
                    c.output = out
            return Result(choices, target.side, sum(map(len, ids)), list(texts))

    return run


def forward(job: Job, pieces: list[Pieces]) -> Callable[[Any], None]:
    """Stream items (a no-op unless the job streams): each sampled token with its safe text and
    logprobs, and each choice's end with its held-back tail (and the EOS token's logprobs).
    Logprobs travel as (token string, logprob, top alternatives), strings made here, in order."""

    def logprob(row: int, entry: TokenLogprobs | None) -> tuple[str, float, list[tuple[str, float]]] | None:
        if entry is None:
            return None
        token, top = pieces[row].push(entry)
        return token, entry.amplified, top

    def emit(event: Any) -> None:
        if job.events is None:
            return
        if isinstance(event, TokenEvent):
            job.emit({"choice": event.row, "text": event.text, "logprob": logprob(event.row, event.logprobs)})
        elif isinstance(event, RowOutput):
            eos = event.logprobs[-1] if event.finish_reason == "eos" and event.logprobs else None
            job.emit({"choice": event.row, "text": event.tail, "logprob": logprob(event.row, eos),
                      "finish": event.finish_reason})  # fmt: skip

    return emit
