"""`/experiments`: rare-behaviour hunts run in the background, one engine job per chunk."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from lda import IncompatibleTokenizersError
from lda.experiments import (
    ExperimentRecord,
    ExperimentStore,
    report_csv,
    report_png,
)

from app.api.deps import EngineDep, PairDep, SettingsDep, check_limits
from app.api.schemas import ERRORS, not_found
from app.diffing_lens.steering import resolve_steer
from app.experiments_lens.jobs import Runner, check_spec
from app.experiments_lens.schemas import ExperimentRequest
from app.experiments_lens.specs import build_spec, summary

router = APIRouter()

NOT_FOUND = not_found("experiment")
MAX_PAGE = 1000


def _store(request: Request) -> ExperimentStore:
    return request.app.state.experiments


def _runner(request: Request) -> Runner:
    return request.app.state.experiment_runner


def _record(request: Request, exp_id: str) -> ExperimentRecord:
    record = _store(request).get(exp_id)
    if record is None:
        raise FileNotFoundError(f"no experiment {exp_id!r}")
    return record


@router.post("/experiments", status_code=202, responses=ERRORS)
async def submit(
    req: ExperimentRequest, request: Request, pair: PairDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Validate the whole grid, store it, and run it in the background; returns the id at once."""
    # The sample count is bounded by MAX_EXPERIMENT_SAMPLES below, not by MAX_ROWS_PER_REQUEST:
    # an experiment decodes in chunks of EXPERIMENT_CHUNK_SIZE rows.
    check_limits(settings, req, 1)
    spec = await asyncio.to_thread(build_spec, req, settings, settings.max_experiment_samples)
    lda_conditions = [c for c in spec.conditions if c.adapter is None and c.amplification is None]
    if lda_conditions and not pair.compatibility.compatible:
        raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
    amp = request.app.state.amplifier
    steerer = lambda body, where: resolve_steer(request.app, body, where)  # noqa: E731
    pins = await engine.run(lambda job: check_spec(pair, amp, spec, req, steerer))
    record = _store(request).create(spec, pins)
    _runner(request).start(record.id)
    return {"id": record.id, "status": record.status}


def _summary(request: Request, record: ExperimentRecord) -> dict[str, Any]:
    return summary(record, _store(request).spec(record.id))


def _public(record: ExperimentRecord) -> dict[str, Any]:
    spec = record.spec
    return {
        "id": record.id,
        "name": spec["name"],
        "status": record.status,
        "error": record.error,
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "cancel_requested": record.cancel_requested,
        "control": any(c.get("control") for c in spec["conditions"]),
        "progress": {
            "done": record.done,
            "total": record.total,
            "samples_per_s": record.samples_per_s,
            "eta_s": record.eta_s,
        },
    }


@router.get("/experiments")
async def list_experiments(request: Request) -> Any:
    return {"experiments": [_public(r) for r in _store(request).list()]}


@router.get("/experiments/{exp_id}", responses=NOT_FOUND)
async def experiment(exp_id: str, request: Request) -> Any:
    """Status, progress, the spec, the pins (content hash per adapter or amplification condition,
    taken at submit), and the summary so far: rate with Wilson 95% interval per condition and
    detector, rate ratios against the first condition, control flags, and the alpha-0
    extrapolation when plain conditions at two or more alphas > 0 have samples."""
    record = _record(request, exp_id)
    return {
        **_public(record),
        "spec": record.spec,
        "pins": record.pins,
        "written": record.written,
        **_summary(request, record),
    }


@router.get("/experiments/{exp_id}/samples", responses=NOT_FOUND)
async def experiment_samples(
    exp_id: str,
    request: Request,
    detector: str | None = Query(None, description="with `hit`: the hits of this detector only"),
    hit: bool | None = Query(None, description="true: samples with a hit; false: samples without"),
    condition: str | None = Query(None, description="a condition label, e.g. `alpha=2`"),
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> Any:
    """Committed samples, filtered, in index order (with store="hits" only samples with a hit exist)."""
    _record(request, exp_id)

    def page() -> dict[str, Any]:
        matched = 0
        rows = []
        for sample in _store(request).read_samples(exp_id):
            if condition is not None and sample["condition"] != condition:
                continue
            if hit is not None:
                hits = sample["hits"] if detector is None else [h for h in sample["hits"] if h == detector]
                if bool(hits) != hit:
                    continue
            elif detector is not None and detector not in sample["hits"]:
                continue
            if offset <= matched < offset + limit:
                rows.append(sample)
            matched += 1
        return {"total": matched, "offset": offset, "limit": limit, "samples": rows}

    return await asyncio.to_thread(page)


@router.get(
    "/experiments/{exp_id}/report.csv",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {"content": {"text/csv": {}}, "description": "one row per condition x detector"},
    },
)
async def experiment_csv(exp_id: str, request: Request) -> Response:
    record = _record(request, exp_id)
    text = report_csv(_summary(request, record)["summary"])
    return Response(text, media_type="text/csv", headers=_attachment(f"{exp_id}.csv"))


@router.get(
    "/experiments/{exp_id}/report.png",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {"content": {"image/png": {}}, "description": "rate per condition, 95% bars"},
    },
)
async def experiment_png(exp_id: str, request: Request) -> Response:
    record = _record(request, exp_id)
    summary = _summary(request, record)["summary"]

    def draw() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return report_png(summary, Path(tmp) / "report.png", title=record.spec["name"]).read_bytes()

    return Response(await asyncio.to_thread(draw), media_type="image/png")


@router.get(
    "/experiments/{exp_id}/samples.jsonl",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {"content": {"application/x-ndjson": {}}, "description": "committed samples"},
    },
)
async def experiment_jsonl(exp_id: str, request: Request) -> Response:
    record = _record(request, exp_id)

    def read() -> bytes:
        with open(_store(request).samples_path(exp_id), "rb") as f:
            return f.read(record.committed_bytes)  # never a chunk still being written

    return Response(
        await asyncio.to_thread(read),
        media_type="application/x-ndjson",
        headers=_attachment(f"{exp_id}.jsonl"),
    )


@router.delete("/experiments/{exp_id}", responses=NOT_FOUND)
async def cancel_experiment(exp_id: str, request: Request) -> Any:
    """Cancel: a queued experiment stops at once, a running one drops the chunk in flight."""
    _record(request, exp_id)
    record = _store(request).cancel(exp_id)
    if record.cancel_requested:
        _runner(request).cancel(exp_id)
    return {"id": exp_id, "status": record.status, "cancelling": record.cancel_requested}


@router.post("/experiments/{exp_id}/resume", status_code=202, responses={**NOT_FOUND, **ERRORS})
async def resume_experiment(exp_id: str, request: Request, pair: PairDep) -> Any:
    """Queue a failed (e.g. disk full, out of memory) or interrupted experiment again; it continues
    after its last committed chunk, with the samples an uninterrupted run would have produced."""
    _record(request, exp_id)
    record, resumed = await _runner(request).requeue(exp_id)
    if not resumed:
        raise HTTPException(
            409, f"experiment {exp_id} is {record.status}; only failed or interrupted ones resume"
        )
    return {"id": exp_id, "status": record.status, "done": record.done}


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}
