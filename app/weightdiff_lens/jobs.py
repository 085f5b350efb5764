"""Weight-diff jobs on the engine.

Each optimizer step is its own engine job, so generation requests queued meanwhile run between
steps; the trainer's wrappers are attached only inside a step. Records live on disk (JobStore).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from lda.jobs import JobRecord, JobStore
from weightdiff import Task, Trainer, export_dit, export_peft, unwrap

from app.amplification_lens.jobs import text_side
from app.api.background import drive_steps
from app.api.background import on_engine as _on_engine  # noqa: F401  (app/diffing_lens/jobs.py imports it)
from app.weightdiff_lens.schemas import JobRequest

log = logging.getLogger(__name__)


async def drive(app: Any, record: JobRecord, req: JobRequest, cancel: threading.Event) -> None:
    """Train one job step by step (`drive_steps`), then export (and register) its adapters."""
    store: JobStore = app.state.jobs
    amp = app.state.amplifier
    model, side = amp.model, text_side(amp.pair)
    trainer: Trainer | None = None

    def start(job: Any) -> int:
        nonlocal trainer
        tasks = [
            Task(samples=t.library_samples(), seed=t.seed, name=n) for t, n in zip(req.tasks, req.task_names)
        ]
        # Held here, on the engine thread, the moment it exists: `end` closes it even when what
        # follows fails or the await on this job is cancelled.
        trainer = Trainer(model, side.tokenizer, tasks, req.train_config())
        trainer.detach()
        return trainer.total_steps

    def step(job: Any) -> None:
        assert trainer is not None
        trainer.attach()
        try:
            trainer.step()
        finally:
            trainer.detach()
        record.step, record.losses, record.train_seconds = trainer.steps_done, trainer.losses, trainer.seconds

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

    def end(job: Any) -> None:
        if trainer is not None:
            trainer.close()
        unwrap_leftovers(model, record.id)

    def done() -> bool:
        assert trainer is not None
        return trainer.done

    await drive_steps(
        app.state.engine, store, record, cancel,
        start=start, step=step, done=done, finish=finish, end=end, kind="weight-diff",
    )


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
