"""`/weightdiff/jobs`: batched weight-diff training as background jobs on the engine.

Each optimizer step is its own engine job, so generation requests queued meanwhile run between
steps; the trainer's wrappers are attached only inside a step. Records live on disk (JobStore).
"""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.amp_jobs import text_side
from app.engine import QueueFullError
from app.routes import ERRORS, _engine, _settings, get_amplifier
from weightdiff import Task, TrainConfig, Trainer, export_dit, export_peft
from weightdiff.jobs import ACTIVE, JobRecord, JobStore
from weightdiff.lora import select_targets

log = logging.getLogger(__name__)
router = APIRouter()

TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: TaskName | None = None
    samples: list[Annotated[str, Field(min_length=1)] | list[ChatMessage]] = Field(min_length=1)
    seed: int | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    tasks: list[TaskSpec] = Field(min_length=1)
    r: int = Field(1, ge=1, le=256, description="LoRA rank (DIT's default is 1)")
    lora_alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description="None = scale 1/r")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, description="optimizer steps; None = `epochs` passes")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    seed: int = 0
    targets: list[str] | None = Field(None, min_length=1, description="e.g. [q_proj, v_proj]; None = all")
    register_adapters: bool = Field(
        False, alias="register", description="register each trained diff as adapter wd-<job>-<task>"
    )
    export_dit: bool = False

    @model_validator(mode="after")
    def _names(self) -> JobRequest:
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError("tasks: task names must be unique")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name or f"task{i}" for i, t in enumerate(self.tasks)]

    @property
    def step_estimate(self) -> int:
        """`steps`, else epochs over the largest task (the trainer's count, before token budgets)."""
        if self.steps is not None:
            return self.steps
        per_epoch = max(-(-len(t.samples) // (self.batch_size * self.grad_accum)) for t in self.tasks)
        return self.epochs * per_epoch

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            r=self.r, lora_alpha=self.lora_alpha, lr=self.lr, steps=self.steps, epochs=self.epochs,
            batch_size=self.batch_size, grad_accum=self.grad_accum,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch, seed=self.seed, targets=self.targets,
        )


def _store(request: Request) -> JobStore:
    return request.app.state.jobs


async def _on_engine(engine: Any, fn: Any) -> Any:
    """Run one engine job, waiting politely while the queue is full (training is background work)."""
    while True:
        try:
            return await engine.run(fn)
        except QueueFullError:
            await asyncio.sleep(0.2)


async def drive(app: Any, record: JobRecord, req: JobRequest, cancel: threading.Event) -> None:
    """Start, step and finish one job; every state change is written to disk."""
    store: JobStore = app.state.jobs
    engine, amp = app.state.engine, app.state.amplifier
    model, side = amp.model, text_side(amp.pair)
    trainer: Trainer | None = None

    def start(job: Any) -> Trainer:
        tasks = [Task(samples=[s if isinstance(s, str) else [m.model_dump() for m in s] for s in t.samples],
                      seed=t.seed, name=n) for t, n in zip(req.tasks, req.task_names)]
        new = Trainer(model, side.tokenizer, tasks, req.train_config())
        new.detach()
        record.status, record.started, record.total_steps = "running", time.time(), new.total_steps
        store.save(record)
        return new

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

    try:
        trainer = await _on_engine(engine, start)
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
        if trainer is not None:
            await _on_engine(engine, lambda job: trainer.close())


def interrupt_active(store: JobStore) -> None:
    """At shutdown: jobs still queued or running are reported interrupted, never lost."""
    for record in store.list():
        if record.status in ACTIVE:
            record.error = f"the server shut down at step {record.step}"
            record.status, record.finished = "interrupted", time.time()
            store.save(record)


@router.post("/weightdiff/jobs", status_code=202, responses=ERRORS)
async def submit(req: JobRequest, request: Request) -> Any:
    """Train one LoRA per task in one batched forward/backward; returns the job id at once."""
    amp = get_amplifier(request)
    limit = _settings(request).max_weightdiff_tasks
    if len(req.tasks) > limit:
        raise ValueError(f"tasks: too many tasks ({len(req.tasks)}), the limit is {limit}")
    samples, sample_limit = sum(len(t.samples) for t in req.tasks), _settings(request).max_weightdiff_samples
    if samples > sample_limit:
        raise ValueError(f"tasks: too many samples ({samples} in all tasks), the limit is {sample_limit}")
    steps, step_limit = req.step_estimate, _settings(request).max_weightdiff_steps
    if steps > step_limit:
        raise ValueError(f"steps: the job would take {steps} optimizer steps, the limit is {step_limit}")
    if req.targets is not None:
        await _engine(request).run(lambda job: select_targets(amp.model, req.targets))
    record = _store(request).create(req.model_dump(), req.task_names)
    cancel = threading.Event()
    request.app.state.job_cancels[record.id] = cancel
    task = asyncio.create_task(drive(request.app, record, req, cancel))
    request.app.state.job_tasks.add(task)
    task.add_done_callback(request.app.state.job_tasks.discard)
    return {"id": record.id, "status": record.status}


def _record(request: Request, job_id: str) -> JobRecord:
    record = _store(request).get(job_id)
    if record is None:
        raise FileNotFoundError(f"no weight-diff job {job_id!r}")
    return record


@router.get("/weightdiff/jobs")
async def list_jobs(request: Request) -> Any:
    return {"jobs": [r.public() for r in _store(request).list()]}


@router.get("/weightdiff/jobs/{job_id}", responses={404: ERRORS[422]})
async def job_status(job_id: str, request: Request) -> Any:
    return _record(request, job_id).public()


@router.delete("/weightdiff/jobs/{job_id}", responses={404: ERRORS[422]})
async def cancel_job(job_id: str, request: Request) -> Any:
    """Cancel a queued or running job; it stops before its next step."""
    record = _record(request, job_id)
    if record.status in ACTIVE:
        request.app.state.job_cancels[job_id].set()
    return {"id": job_id, "status": record.status, "cancelling": record.status in ACTIVE}


@router.get("/weightdiff/jobs/{job_id}/tasks/{task}/adapter", responses={404: ERRORS[422]})
async def download(job_id: str, task: str, request: Request, format: Literal["zip", "tar"] = "zip") -> Response:
    """One task's PEFT adapter directory as a zip (or tar) archive."""
    record = _record(request, job_id)
    if task not in record.outputs:
        raise FileNotFoundError(f"job {job_id!r} has no finished adapter for task {task!r} (status {record.status})")
    folder = Path(record.outputs[task])
    buf = io.BytesIO()
    if format == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{task}/{f.name}")
        media = "application/zip"
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            tf.add(folder, arcname=task)
        media = "application/gzip"
    name = f"{job_id}-{task}.{'zip' if format == 'zip' else 'tar.gz'}"
    return Response(buf.getvalue(), media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})
