"""`/weightdiff/jobs`: batched weight-diff training as background jobs on the engine."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lda.jobs import ACTIVE, JobRecord, JobStore
from weightdiff.lora import select_targets

from app.api.background import start_job
from app.api.deps import AmplifierDep, EngineDep, SettingsDep, get_amplifier
from app.api.schemas import ERRORS, not_found
from app.weightdiff_lens.jobs import drive
from app.weightdiff_lens.schemas import JobRequest

router = APIRouter()


def _store(request: Request) -> JobStore:
    return request.app.state.jobs


@router.post("/weightdiff/jobs", status_code=202, responses=ERRORS)
async def submit(
    req: JobRequest, request: Request, amp: AmplifierDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Train one LoRA per task in one batched forward/backward; returns the job id at once."""
    limit = settings.max_weightdiff_tasks
    if len(req.tasks) > limit:
        raise ValueError(f"tasks: too many tasks ({len(req.tasks)}), the limit is {limit}")
    samples, sample_limit = sum(len(t.samples) for t in req.tasks), settings.max_weightdiff_samples
    if samples > sample_limit:
        raise ValueError(f"tasks: too many samples ({samples} in all tasks), the limit is {sample_limit}")
    steps, step_limit = req.step_estimate, settings.max_weightdiff_steps
    if steps > step_limit:
        raise ValueError(f"steps: the job would take {steps} optimizer steps, the limit is {step_limit}")
    if req.register_adapters:
        amp.check_room(len(req.tasks))
    if req.targets is not None:
        await engine.run(lambda job: select_targets(amp.model, req.targets))
    app = request.app
    return start_job(request, _store(request), req.model_dump(), req.task_names, app.state.job_cancels,
                    lambda record, cancel: drive(app, record, req, cancel), settings.max_weightdiff_jobs,
                    "weight-diff", "/weightdiff/jobs")  # fmt: skip


def _record(request: Request, job_id: str) -> JobRecord:
    record = _store(request).get(job_id)
    if record is None:
        raise FileNotFoundError(f"no weight-diff job {job_id!r}")
    return record


@router.get("/weightdiff/jobs")
async def list_jobs(request: Request) -> Any:
    return {"jobs": [r.public() for r in _store(request).list()]}


@router.get("/weightdiff/jobs/{job_id}", responses=not_found("job"))
async def job_status(job_id: str, request: Request) -> Any:
    return _record(request, job_id).public()


@router.delete("/weightdiff/jobs/{job_id}", responses=not_found("job"))
async def cancel_job(job_id: str, request: Request, engine: EngineDep, purge: bool = False) -> Any:
    """Cancel a queued or running job; it stops before its next step.

    With `purge=true`, delete a finished job instead: its folder (outputs included) and the adapters
    it registered, which frees a place under MAX_WEIGHTDIFF_JOBS.
    """
    record = _record(request, job_id)
    if purge:
        return await _purge(request, engine, record)
    cancel = request.app.state.job_cancels.get(job_id)
    if record.status in ACTIVE and cancel is not None:  # None: it finished a moment ago
        cancel.set()
    return {"id": job_id, "status": record.status, "cancelling": record.status in ACTIVE}


async def _purge(request: Request, engine: Any, record: JobRecord) -> Any:
    if record.status in ACTIVE:
        raise ValueError(
            f"purge: job {record.id!r} is {record.status}; cancel it first (DELETE without purge) and wait "
            "until it has stopped"
        )
    names = list(record.registered.values())
    if names:
        amp = get_amplifier(request)
        # Its adapters' files go with the folder: unregister them (and the configs built on them).
        await engine.run(lambda job: [amp.delete_adapter(n) for n in names if n in amp.registry])
    try:
        _store(request).remove(record.id)
    except KeyError:  # purged by another request meanwhile
        raise FileNotFoundError(f"no weight-diff job {record.id!r}") from None
    return {"id": record.id, "status": record.status, "deleted": True}


@router.get("/weightdiff/jobs/{job_id}/tasks/{task}/adapter", responses=not_found("job or finished task adapter"))
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
