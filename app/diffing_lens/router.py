"""`/diffing/jobs`: the diffing toolkit's methods (logit-diff mining + KL) as background jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lda.diffing.adl import VECTORS
from lda.diffing.adl_files import load_vectors, steering_vector
from lda.diffing.inputs import resolve_layer
from lda.jobs import ACTIVE, JobRecord, JobStore

from app.api.background import run_job_task, start_job
from app.api.deps import EngineDep, PairDep, SettingsDep
from app.api.schemas import ERRORS, not_found
from app.diffing_lens.jobs import drive, public, read_result, request_from_spec, tokenize
from app.diffing_lens.names import RUN_DIR, TOKEN_STATS, ZIP
from app.diffing_lens.schemas import DiffingRequest
from app.diffing_lens.specs import check_on_pair, resolve_rows, stored_spec

router = APIRouter()


def _store(request: Request) -> JobStore:
    return request.app.state.diffing_jobs


@router.post("/diffing/jobs", status_code=202, responses=ERRORS)
async def submit(
    req: DiffingRequest, request: Request, pair: PairDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Start a diffing job on the pair; returns the job id at once (poll GET /diffing/jobs/{id})."""
    limit = settings.max_diffing_rows
    if "max_samples" not in req.model_fields_set:
        req.max_samples = min(req.max_samples, limit)  # the toolkit's default, within the server's bound
    elif req.max_samples > limit:
        raise ValueError(f"max_samples: must be <= {limit} (MAX_DIFFING_ROWS), got {req.max_samples}")
    rows = await asyncio.to_thread(resolve_rows, req, settings, limit)
    samples = await asyncio.to_thread(check_on_pair, req, pair, rows)
    spec = stored_spec(req, rows, pair)
    app = request.app
    return start_job(request, _store(request), spec, [], app.state.diffing_cancels,
                     lambda record, cancel: drive(app, record, req, samples, cancel), settings.max_weightdiff_jobs,
                     "diffing", "/diffing/jobs")  # fmt: skip


def _record(request: Request, job_id: str) -> JobRecord:
    record = _store(request).get(job_id)
    if record is None:
        raise FileNotFoundError(f"no diffing job {job_id!r}")
    return record


def _finished(request: Request, job_id: str) -> JobRecord:
    record = _record(request, job_id)
    if record.status != "done":
        raise FileNotFoundError(f"diffing job {job_id!r} has no results (status {record.status})")
    return record


@router.get("/diffing/jobs")
async def list_jobs(request: Request) -> Any:
    """Every job's record without its result (GET /diffing/jobs/{id} has it)."""
    return {"jobs": [public(r, brief=True) for r in _store(request).list()]}


@router.get("/diffing/jobs/{job_id}", responses=not_found("job"))
async def job_status(job_id: str, request: Request) -> Any:
    """Status and progress (batches); when done: orderings, the KL summary and the top examples."""
    return public(_record(request, job_id))


@router.get("/diffing/jobs/{job_id}/result", responses=not_found("finished job"))
async def job_result(job_id: str, request: Request) -> Any:
    """The whole result: every kept KL example and likelihood-ratio window."""
    _finished(request, job_id)
    return await asyncio.to_thread(read_result, _store(request).dir(job_id))


@router.get("/diffing/jobs/{job_id}/token_stats", responses=not_found("finished job"))
async def token_stats(job_id: str, request: Request) -> Response:
    """The vocabulary arrays under the toolkit's names (`sum_logit_diff`, `count_positive`, ...)."""
    record = _finished(request, job_id)
    if record.spec.get("method") != "logit_diff":
        raise FileNotFoundError(f"diffing job {job_id!r} is not a logit_diff job: it has no token_stats")
    return FileResponse(_store(request).dir(job_id) / TOKEN_STATS, media_type="application/json")


@router.get("/diffing/jobs/{job_id}/vectors", responses=not_found("finished ADL job, layer or position"))
async def vectors(job_id: str, request: Request, layer: str, position: int) -> Any:
    """ADL's vectors at (layer, position): `delta`, `mean_before`, `mean_after` (lists of d floats)
    and the layer's mean norms `norm_before`, `norm_after`. `layer`: a block, or a fraction."""
    record = _finished(request, job_id)
    if record.spec.get("method") != "adl":
        raise FileNotFoundError(f"diffing job {job_id!r} is not an ADL job: it has no vectors")
    try:
        value: int | float = int(layer)
    except ValueError:
        try:
            value = float(layer)
        except ValueError:
            raise ValueError(f"layer: must be an integer block or a fraction in [0, 1], got {layer!r}") from None
    model = request.app.state.pair.after.model
    block = resolve_layer(value, model.config.num_hidden_layers)
    tensors = await asyncio.to_thread(load_vectors, _store(request).dir(job_id) / RUN_DIR)
    body: dict[str, Any] = {"layer": block, "position": position}
    try:
        for name in VECTORS:
            vector, norm_after = steering_vector(tensors, block, position, name)
            body[name] = vector.tolist()
    except KeyError as missing:
        raise FileNotFoundError(f"diffing job {job_id!r} has no {missing.args[0]} {block if missing.args[0] == 'layer' else position}") from None
    norms = tensors[f"layer_{block}.norms"].tolist()
    return body | {"norm_before": norms[0], "norm_after": norms[1]}


@router.get("/diffing/jobs/{job_id}/results.zip", responses=not_found("finished job"))
async def results_zip(job_id: str, request: Request) -> Response:
    """The toolkit's result layout (orderings, global token stats, plots) as a zip."""
    _finished(request, job_id)
    headers = {"Content-Disposition": f'attachment; filename="diffing-{job_id}.zip"'}
    return FileResponse(_store(request).dir(job_id) / ZIP, media_type="application/zip", headers=headers)


@router.get("/diffing/jobs/{job_id}/files/{path:path}", responses=not_found("file"))
async def result_file(job_id: str, path: str, request: Request) -> Response:
    """One file of the result layout (a plot, an ordering), e.g. `top_k_occurring/texts/global_bar.png`."""
    _finished(request, job_id)
    root = (_store(request).dir(job_id) / RUN_DIR).resolve()
    target = (root / path).resolve()
    if root not in target.parents or not target.is_file():
        raise FileNotFoundError(f"no file {path!r} in diffing job {job_id!r}")
    return FileResponse(target)


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    api_key: str | None = Field(None, description="the grader's key again (it is never stored)")


@router.post("/diffing/jobs/{job_id}/resume", status_code=202, responses=not_found("job") | ERRORS)
async def resume(job_id: str, request: Request, pair: PairDep, body: ResumeBody | None = None) -> Any:
    """Continue an interrupted, cancelled or failed job from its last checkpoint (saved every
    30 s and at cancel); the result equals an uninterrupted run's."""
    spec = _record(request, job_id).spec
    req = request_from_spec(spec, body.api_key if body else None)
    samples = await asyncio.to_thread(tokenize, pair.after.tokenizer, spec["rows"], req)
    # Checked after the await, with none before the start: two resumes cannot both start it.
    record, app = _record(request, job_id), request.app
    if record.status not in ("interrupted", "cancelled", "failed") or job_id in app.state.diffing_cancels:
        raise ValueError(f"resume: job {job_id!r} is {record.status}; only interrupted, cancelled or failed jobs resume")
    run_job_task(request, record, app.state.diffing_cancels,
                 lambda rec, cancel: drive(app, rec, req, samples, cancel, resume=True))  # fmt: skip
    record.status = "queued"
    _store(request).save(record)
    return {"id": job_id, "status": "queued"}


@router.delete("/diffing/jobs/{job_id}", responses=not_found("job"))
async def cancel_job(job_id: str, request: Request, purge: bool = False) -> Any:
    """Cancel a queued or running job (it stops before its next batch); `purge=true` deletes a
    finished one and its files."""
    record = _record(request, job_id)
    if purge:
        if record.status in ACTIVE:
            raise ValueError(f"purge: job {job_id!r} is {record.status}; cancel it first and wait until it has stopped")
        try:
            _store(request).remove(job_id)
        except KeyError:
            raise FileNotFoundError(f"no diffing job {job_id!r}") from None
        return {"id": job_id, "status": record.status, "deleted": True}
    cancel = request.app.state.diffing_cancels.get(job_id)
    if record.status in ACTIVE and cancel is not None:
        cancel.set()
    return {"id": job_id, "status": record.status, "cancelling": record.status in ACTIVE}
