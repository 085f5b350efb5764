"""Experiments on the engine: one engine job per chunk, whose rows decode in the running batches
beside interactive requests (which join at the next step, not after the chunk), or, with
EXPERIMENT_ISOLATION, in batches of their own (see `chunk_generate`).

A chunk's rows come grouped by condition (the spec's condition-major order); each group decodes in
one call the way `/generate_lda` would decode it (same formatting, sampling and seed per row), so
sample i reproduces alone through `/generate_lda` with `seed` = its seed:
- plain LDA: the two-model pair;
- adapter / amplification: adapter-mode LDA on the base (`/generate_lda` with `adapter` /
  `amplification`);
- control: the before model stands in for the after model. `before + alpha * (before - before)` is
  `before` at any alpha, so the before model decodes alone; `/generate_lda` with alpha -1 gives the
  same rows (its formula is exact there).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amplification import field_path
from lda import LDAModelPair, Row
from lda.experiments import Condition, ExperimentStore
from lda.experiments.runner import STOPPED, step_steps
from lda.pair import Side, check_context, encode
from lda.static import source_factory

from app.amplification_lens.amplifier import Amplifier
from app.amplification_lens.jobs import adapter_target, text_side
from app.api.chunking import plan_chunks
from app.api.generation import BatchTarget, Usage, in_batches, sampling_params
from app.api.schemas import SamplingFields
from app.diffing_lens.steering import Steering, resolve_steer, steer_target
from app.engine import Job, QueueFullError
from app.experiments_lens.pins import check_pin, compiled_hash
from app.lda_lens.jobs import pair_target

log = logging.getLogger(__name__)


class ChunkAborted(BaseException):
    """The server is shutting down mid-chunk: the chunk is dropped, the experiment not failed.

    A BaseException so that `step`, which marks an experiment failed on any Exception, lets it
    through: the record stays "running" and the shutdown (or the next start) marks it interrupted.
    """


@dataclass(frozen=True)
class Lens:
    """Where one condition's logits come from (the running batch its rows join), whose
    tokenizer formats its prompts, and the content hash of its adapters and config (`pins`)."""

    side: Side
    target: BatchTarget
    models: tuple[Any, ...]
    pin: str | None = None  # None: the pair's own models, fixed for the server's life


# Resolves a condition's steering reference into a vector (`app.diffing_lens.steering`).
Steerer = Callable[[Any, str], Steering]


def lens_for(
    pair: LDAModelPair,
    amp: Amplifier | None,
    condition: Condition,
    where: str = "condition",
    steerer: Steerer | None = None,
) -> Lens:
    """The decoder of one condition; raises ValueError naming `where` for an unknown adapter, config
    or steering job."""
    if condition.steer is not None:
        if steerer is None:
            raise ValueError(f"{where}.steer: steering is not set up")
        steering = steerer(condition.steer, f"{where}.steer")
        pin = hashlib.sha256(steering.vector.numpy().tobytes()).hexdigest()
        return Lens(pair.after, steer_target(pair, steering), (pair.after.model, pair.before.model), pin)
    if condition.control:
        # The before model alone, formatted and detokenized as the after model's rows are.
        before, width, tok = pair.before.model, pair.compatibility.shared_width, pair.after.tokenizer
        key = ("control", id(before), width, id(tok))
        target = BatchTarget(key, source_factory((before,), width), tok)
        return Lens(pair.after, target, (pair.after.model, pair.before.model))
    if condition.adapter is None and condition.amplification is None:
        return Lens(pair.after, pair_target(pair), (pair.after.model, pair.before.model))
    if amp is None:
        raise ValueError(f"{where}: adapters are not set up")
    field = "amplification" if condition.amplification is not None else "adapter"
    with field_path(f"{where}.{field}"):
        reference = condition.amplification if condition.amplification is not None else condition.adapter
        compiled = amp.lookup(reference)  # type: ignore[arg-type]
    return Lens(text_side(amp.pair), adapter_target(amp, compiled), (amp.model,), compiled_hash(compiled))


def changed_what(condition: Condition) -> str:
    """What a pin mismatch names: the adapter, the amplification config, or the steering job."""
    if condition.steer is not None:
        return f"steering vector of ADL job {condition.steer.get('adl')!r}"
    if condition.adapter is not None:
        return f"adapter {condition.adapter!r}"
    amplification = condition.amplification
    if not isinstance(amplification, str):
        amplification = dict(amplification or {}).get("name", "inline")
    return f"amplification config {amplification!r} (or an adapter it applies)"


def prompt_ids(pair: LDAModelPair, side: Side, prompt: Any, fields: SamplingFields) -> tuple[int, ...]:
    """A spec prompt as `/generate_lda` formats it; chat messages go through the chat template."""
    if isinstance(prompt, str):
        return pair.prompt_ids(prompt, fields.system_prompt, fields.apply_chat_template, side=side)[1]
    messages = [{"role": role, "content": content} for role, content in prompt]
    if fields.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fields.system_prompt})
    if not fields.apply_chat_template or not getattr(side.tokenizer, "chat_template", None):
        raise ValueError("chat messages need apply_chat_template and a tokenizer with a chat template")
    formatted = side.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode(side.tokenizer, formatted, templated=True)


def _groups(rows: Sequence[tuple[Any, Condition, int]]) -> Iterator[range]:
    """Runs of adjacent rows with the same condition."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][1] != rows[start][1]:
            yield range(start, i)
            start = i


@dataclass(frozen=True)
class ChunkContext:
    """What a chunk needs to know about its experiment beyond its rows."""

    exp_id: str
    pins: Mapping[str, str]  # condition label -> content hash at submit (see `pins`)
    isolated: bool = False  # EXPERIMENT_ISOLATION


def isolated_target(target: BatchTarget, exp_id: str) -> BatchTarget:
    """The lens's batch, but one of the experiment's own: no interactive row ever joins it.

    A chunk's condition groups decode one after another, and a batch is dropped once its rows are
    out, so each group's rows start an empty batch and decode beside each other only: the batch
    shapes (padding, rows per forward) are a function of the chunk alone, whatever else the server
    serves. In fp32 on CPU a row's tokens never depend on its neighbours; in bf16 or on a GPU the
    kernels a shape selects change the rounding, and this is what keeps such samples reproducible.
    """
    return replace(target, key=("experiment", exp_id, target.key))


def chunk_generate(
    pair: LDAModelPair,
    amp: Amplifier | None,
    fields: SamplingFields,
    max_batch_tokens: int,
    cancel_requested: Callable[[], bool],
    context: ChunkContext | None = None,
    steerer: Steerer | None = None,
) -> Callable[[list[tuple[Any, Condition, int]]], Generator[Any, Any, list[tuple[str, str]]]]:
    """The `generate` callback of one chunk: each condition group's rows join the engine's running
    batch of its lens (beside interactive requests; with `context.isolated`, a batch of their own),
    split only where `max_batch_tokens` demands (rows sharing a prompt are adjacent and prefill it
    once). Before any row decodes, every group's adapters and configs are checked against the pins
    taken at submit: a mismatch raises AdapterChanged and the chunk decodes nothing."""
    sampling = sampling_params(fields)

    def lenses(rows: list[tuple[Any, Condition, int]]) -> list[tuple[range, Lens]]:
        found = []
        for group in _groups(rows):
            condition = rows[group.start][1]
            lens = lens_for(pair, amp, condition, steerer=steerer)
            if context is not None:
                pinned = context.pins.get(condition.label)
                check_pin(condition.label, changed_what(condition), pinned, lens.pin, context.exp_id)
                if context.isolated:
                    lens = replace(lens, target=isolated_target(lens.target, context.exp_id))
            found.append((group, lens))
        return found

    def generate(rows: list[tuple[Any, Condition, int]]) -> Generator[Any, Any, list[tuple[str, str]]]:
        results: list[tuple[str, str]] = []
        for group, lens in lenses(rows):
            ids: dict[Any, tuple[int, ...]] = {}
            decode_rows = []
            for prompt, condition, seed in (rows[i] for i in group):
                if prompt not in ids:
                    ids[prompt] = prompt_ids(pair, lens.side, prompt, fields)
                    check_context(len(ids[prompt]), fields.max_new_tokens, *lens.models)
                decode_rows.append(Row(ids[prompt], condition.alpha, seed))
            config = pair.decode_config(fields.max_new_tokens, sampling, fields.stop, side=lens.side)
            chunks = plan_chunks(decode_rows, fields.max_new_tokens, max_batch_tokens)
            outputs = yield from in_batches(lens.target, decode_rows, config, Usage(), lambda event: None, chunks)
            if outputs is None:
                if cancel_requested():
                    raise RuntimeError("cancelled")  # `step` ends the experiment as cancelled
                raise ChunkAborted()
            results += [(o.text, o.finish_reason) for o in outputs]
        return results

    return generate


def check_spec(
    pair: LDAModelPair, amp: Amplifier | None, spec: Any, fields: SamplingFields, steerer: Steerer | None = None
) -> dict[str, str]:
    """At submit, on the engine: every adapter and config resolves, every prompt fits the context.
    Returns the pins: condition label -> content hash of its adapters and config."""
    checked: set[tuple[int, ...]] = set()
    pins: dict[str, str] = {}
    for i, condition in enumerate(spec.conditions):
        lens = lens_for(pair, amp, condition, f"conditions[{i}]", steerer)
        if lens.pin is not None:
            pins[condition.label] = lens.pin
        key = (id(lens.side), *map(id, lens.models))  # conditions decoding alike need one check
        if key in checked:
            continue
        checked.add(key)
        seen: set[Any] = set()
        for p, prompt in enumerate(spec.prompts):
            if prompt in seen:
                continue
            seen.add(prompt)
            try:
                ids = prompt_ids(pair, lens.side, prompt, fields)
                check_context(len(ids), fields.max_new_tokens, *lens.models)
            except ValueError as exc:
                raise ValueError(f"prompts[{p}]: {exc}") from None
    return pins


class Runner:
    """Drives experiments: one asyncio task each, one engine job per chunk."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store: ExperimentStore = app.state.experiments
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.jobs: dict[str, Job] = {}  # the chunk each experiment has on the engine

    def start(self, exp_id: str) -> None:
        task = asyncio.create_task(self.drive(exp_id))
        self.tasks[exp_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(exp_id, None))

    async def requeue(self, exp_id: str) -> tuple[Any, bool]:
        """Queue a failed or interrupted experiment again and drive it: (record, True); any other
        status is left alone: (record, False).

        A task that just recorded a failure may still be on its way out; it is awaited first, so
        two tasks never drive one experiment (the old one would see "queued" and carry on). No
        await lies between the status check and the requeue, so two concurrent calls start one task.
        """
        task = self.tasks.get(exp_id)
        if task is not None and self.store.require(exp_id).status in ("failed", "interrupted"):
            await asyncio.shield(task)
        record = self.store.require(exp_id)
        if record.status not in ("failed", "interrupted") or exp_id in self.tasks:
            return record, False
        record = self.store.requeue(exp_id)
        self.start(exp_id)
        return record, True

    def cancel(self, exp_id: str) -> None:
        """After `store.cancel`: abort the chunk in flight, so the cancel needs no chunk to finish."""
        job = self.jobs.get(exp_id)
        if job is not None:
            job.cancel()

    def stop(self) -> None:
        """At shutdown: drop the chunks in flight and stop the tasks."""
        for job in list(self.jobs.values()):
            job.cancel()
        for task in list(self.tasks.values()):
            task.cancel()

    async def resume(self, loading: asyncio.Task[None], ids: Sequence[str]) -> None:
        """Once the models are loaded, continue the experiments the last process left."""
        await loading
        if self.app.state.pair is None:
            return
        for exp_id in ids:
            log.info("resuming experiment %s", exp_id)
            self.start(exp_id)

    async def drive(self, exp_id: str) -> None:
        state = self.app.state
        settings = state.settings
        while True:
            record = self.store.require(exp_id)
            if record.status in STOPPED:
                return
            fields = SamplingFields(**record.spec["sampling"])
            context = ChunkContext(exp_id, record.pins, settings.experiment_isolation)

            def run(job: Job, fields: SamplingFields = fields, context: ChunkContext = context) -> Any:
                generate = chunk_generate(
                    state.pair,
                    state.amplifier,
                    fields,
                    settings.max_batch_tokens,
                    lambda: self.store.require(exp_id).cancel_requested,
                    context,
                    lambda body, where: resolve_steer(self.app, body, where),
                )
                return step_steps(self.store, exp_id, generate)  # a generator job: rows join the batch

            try:
                await self._on_engine(exp_id, run)
            except ChunkAborted:
                return  # shutting down: the lifespan marks it interrupted
            except Exception as exc:  # step records its own failures; this is the engine refusing
                log.exception("experiment %s stopped", exp_id)
                self.store.fail(exp_id, f"{type(exc).__name__}: {exc}")
                return

    async def _on_engine(self, exp_id: str, fn: Callable[[Job], Any]) -> Any:
        """Submit one chunk, waiting politely while the queue is full (experiments are background work)."""
        engine = self.app.state.engine
        while True:
            try:
                job = engine.submit(fn, background=True)
                break
            except QueueFullError:
                await asyncio.sleep(0.2)
        self.jobs[exp_id] = job
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancel()
            # Nobody awaits the future now: retrieve its outcome (ChunkAborted) so it is not logged.
            job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return None  # only the job was cancelled (DELETE before it started): `step` ends it next
        finally:
            self.jobs.pop(exp_id, None)
