"""Weight-diff jobs on the engine.

Each optimizer step is its own engine job, so generation requests queued meanwhile run between
steps; the trainer's wrappers are attached only inside a step. Records live on disk (JobStore).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from weightdiff import Task, Trainer, export_dit, export_peft, unwrap
from weightdiff.jobs import ACTIVE, JobRecord, JobStore

from app.amplification_lens.jobs import text_side
from app.engine import QueueFullError
from app.weightdiff_lens.schemas import JobRequest

log = logging.getLogger(__name__)


async def _on_engine(engine: Any, fn: Any) -> Any:
    """Run one engine job, waiting politely while the queue is full (training is background work)."""
    while True:
        try:
            return await engine.run(fn, background=True)
        except QueueFullError:
            await asyncio.sleep(0.2)


async def drive(app: Any, record: JobRecord, req: JobRequest, cancel: threading.Event) -> None:
    """Start, step and finish one job; every state change is written to disk."""
    store: JobStore = app.state.jobs
    engine, amp = app.state.engine, app.state.amplifier
    model, side = amp.model, text_side(amp.pair)
    trainer: Trainer | None = None

    def start(job: Any) -> None:
        nonlocal trainer
        tasks = [
            Task(samples=t.library_samples(), seed=t.seed, name=n) for t, n in zip(req.tasks, req.task_names)
        ]
        # Held here, on the engine thread, the moment it exists: `finally` below closes it even
        # when what follows fails or the await on this job is cancelled.
        trainer = Trainer(model, side.tokenizer, tasks, req.train_config())
        trainer.detach()
        record.status, record.started, record.total_steps = "running", time.time(), trainer.total_steps
        store.save(record)

    def step(job: Any) -> None:
        assert trainer is not None
        trainer.attach()
        try:
            trainer.step()
        finally:
            trainer.detach()
        record.step, record.losses, record.train_seconds = trainer.steps_done, trainer.losses, trainer.seconds
        store.save(record)

    def finish(job: Any) -> None:
        assert trainer is not None
        out = store.dir(record.id)
        for name, factors in zip(req.task_names, trainer.factors()):
            path = export_peft(factors, model, out / name, lora_alpha=req.lora_alpha)
            if req.export_dit:
                export_dit(factors, path / "dit.safetensors", lora_alpha=req.lora_alpha)
            record.outputs[name] = str(path)
            if req.register_adapters:
                adapter = f"wd-{record.id}-{name}"
                amp.load_adapter(adapter, str(path), replace=True)
                record.registered[name] = adapter
        record.status, record.finished = "done", time.time()
        store.save(record)

    def end(job: Any) -> None:
        if trainer is not None:
            trainer.close()
        unwrap_leftovers(model, record.id)

    try:
        await _on_engine(engine, start)
        assert trainer is not None
        while not trainer.done:
            if cancel.is_set():
                record.status, record.finished = "cancelled", time.time()
                store.save(record)
                return
            await _on_engine(engine, step)
        await _on_engine(engine, finish)
    except asyncio.CancelledError:
        raise  # shutdown: the lifespan marks the record interrupted
    except Exception as exc:  # a job failing never takes the server or other jobs down
        log.exception("weight-diff job %s failed", record.id)
        record.status, record.error, record.finished = "failed", f"{type(exc).__name__}: {exc}", time.time()
        store.save(record)
    finally:
        await _on_engine(engine, end)


def unwrap_leftovers(model: Any, job_id: str) -> list[str]:
    """After a job ends, in any way: the model must be its plain self again.

    Between steps no trainer keeps its wrappers attached, so any wrapper found here is a bug that
    would break generation, amplification and every later job ("already wrapped"): take it out.
    """
    left = unwrap(model)
    if left:
        log.error(
            "weight-diff job %s left %d LoRA wrappers in the model (%s, ...); unwrapped them",
            job_id, len(left), left[0],
        )
    return left


def interrupt_active(store: JobStore) -> None:
    """At shutdown: jobs still queued or running are reported interrupted, never lost."""
    for record in store.list():
        if record.status in ACTIVE:
            record.error = f"the server shut down at step {record.step}"
            record.status, record.finished = "interrupted", time.time()
            store.save(record)
