"""`/dit/...`: train DIT's interpreter L as a background job, describe diffs, evaluate L."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lda.jobs import ACTIVE, JobRecord, JobStore
from weightdiff import describe, normalise
from weightdiff.interpret_train import encode_pair

from app.amplification_lens.jobs import text_side
from app.api.background import start_job
from app.api.deps import AmplifierDep, EngineDep, SettingsDep, get_amplifier
from app.api.schemas import ERRORS, not_found
from app.dit_lens.jobs import RESULT, default_candidates, drive, evaluate_all, public, resolve
from app.dit_lens.schemas import DescribeRequest, EvaluateRequest, JobRequest
from app.settings import Settings

router = APIRouter()


def _store(request: Request) -> JobStore:
    return request.app.state.dit_jobs


def _check_new_tokens(settings: Settings, max_new_tokens: int) -> None:
    if max_new_tokens > settings.max_new_tokens_limit:
        raise ValueError(f"max_new_tokens must be <= {settings.max_new_tokens_limit}, got {max_new_tokens}")


def _check_candidates(candidates: list[str] | None, described: list[tuple[str, str]]) -> None:
    """Candidate accuracy needs every description among the candidates (a 422 now, not a failed job).

    `described` holds `(field, description)`, e.g. `("pairs[3].description", "cats")`.
    """
    if candidates is None:
        return
    keys = {normalise(c) for c in candidates}
    for where, description in described:
        if normalise(description) not in keys:
            raise ValueError(f"{where}: {description!r} is not among the candidates")


async def _check_texts(engine: Any, amp: Any, question: str, described: list[tuple[str, str]]) -> None:
    """The chat template renders the question, and each description fits the context (422 otherwise)."""
    tokenizer = text_side(amp.pair).tokenizer
    limit = getattr(amp.model.config, "max_position_embeddings", None)

    def check(job: Any) -> None:
        for where, description in described:
            try:
                ids = encode_pair(tokenizer, question, description).ids
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if isinstance(limit, int) and len(ids) > limit:
                raise ValueError(f"{where}: {len(ids)} tokens with the question, the context is {limit}")

    await engine.run(check)


def _described(req: JobRequest) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`(field, description)` of every pair, and of the held-out ones (named where they were given)."""
    given = [(f"pairs[{i}].description", p.description) for i, p in enumerate(req.pairs)]
    tests = [(f"test_pairs[{i}].description", p.description) for i, p in enumerate(req.test_pairs or [])]
    if req.test_fraction is None:
        return given + tests, tests
    index = {id(p): i for i, p in enumerate(req.pairs)}
    return given, [given[index[id(p)]] for p in req.split()[1]]


def _check_job(req: JobRequest, amp: Any, settings: Settings) -> None:
    """The limits, the adapters and the candidates of a job, before anything is written."""
    total = len(req.pairs) + len(req.test_pairs or [])
    if total > settings.max_dit_pairs:
        limit = settings.max_dit_pairs
        raise ValueError(f"pairs: too many pairs ({total}, test pairs included), the limit is {limit}")
    if req.batch_size > settings.max_describe_diffs:
        raise ValueError(
            f"batch_size must be <= {settings.max_describe_diffs} (MAX_DESCRIBE_DIFFS), got {req.batch_size}"
        )
    steps, step_limit = req.step_estimate, settings.max_weightdiff_steps
    if steps > step_limit:
        raise ValueError(f"steps: the job would take {steps} optimizer steps, the limit is {step_limit}")
    _check_new_tokens(settings, req.max_new_tokens)
    resolve(amp, [p.diff for p in req.pairs], "pairs[{}].diff")
    resolve(amp, [p.diff for p in req.test_pairs or []], "test_pairs[{}].diff")
    _check_candidates(req.candidates, _described(req)[1])
    if req.register_adapter:
        amp.check_room(1)


@router.post("/dit/jobs", status_code=202, responses=ERRORS)
async def submit(
    req: JobRequest, request: Request, amp: AmplifierDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Train the interpreter L on (diff, description) pairs; returns the job id at once."""
    _check_job(req, amp, settings)
    await _check_texts(engine, amp, req.question, _described(req)[0])
    app = request.app
    return start_job(request, _store(request), req.model_dump(), [RESULT], app.state.dit_cancels,
                    lambda record, cancel: drive(app, record, req, cancel), settings.max_weightdiff_jobs,
                    "interpreter", "/dit/jobs")  # fmt: skip


def _record(request: Request, job_id: str) -> JobRecord:
    record = _store(request).get(job_id)
    if record is None:
        raise FileNotFoundError(f"no interpreter job {job_id!r}")
    return record


@router.get("/dit/jobs")
async def list_jobs(request: Request) -> Any:
    return {"jobs": [public(r) for r in _store(request).list()]}


@router.get("/dit/jobs/{job_id}", responses=not_found("job"))
async def job_status(job_id: str, request: Request) -> Any:
    """Step / total, the loss history, and at the end the held-out metrics (`result.test`)."""
    return public(_record(request, job_id))


@router.delete("/dit/jobs/{job_id}", responses=not_found("job"))
async def cancel_job(job_id: str, request: Request, engine: EngineDep, purge: bool = False) -> Any:
    """Cancel a queued or running job (it stops before its next step); `purge=true` deletes a
    finished one: its folder and the adapter it registered."""
    record = _record(request, job_id)
    if purge:
        return await _purge(request, engine, record)
    cancel = request.app.state.dit_cancels.get(job_id)
    if record.status in ACTIVE and cancel is not None:  # None: it finished a moment ago
        cancel.set()
    return {"id": job_id, "status": record.status, "cancelling": record.status in ACTIVE}


async def _purge(request: Request, engine: Any, record: JobRecord) -> Any:
    if record.status in ACTIVE:
        raise ValueError(
            f"purge: job {record.id!r} is {record.status}; cancel it first and wait until it has stopped"
        )
    names = list(record.registered.values())
    if names:
        amp = get_amplifier(request)
        await engine.run(lambda job: [amp.delete_adapter(n) for n in names if n in amp.registry])
    try:
        _store(request).remove(record.id)
    except KeyError:
        raise FileNotFoundError(f"no interpreter job {record.id!r}") from None
    return {"id": record.id, "status": record.status, "deleted": True}


@router.get("/dit/jobs/{job_id}/adapter", responses=not_found("job or finished adapter"))
async def download(job_id: str, request: Request, format: Literal["zip", "tar"] = "zip") -> Response:
    """L as a PEFT adapter directory plus `dit.json`, in a zip (or tar.gz) archive."""
    record = _record(request, job_id)
    if RESULT not in record.outputs:
        raise FileNotFoundError(f"job {job_id!r} has no finished interpreter (status {record.status})")
    folder, top = Path(record.outputs[RESULT]), f"dit-{job_id}"
    buf = io.BytesIO()
    if format == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{top}/{f.name}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            tf.add(folder, arcname=top)
    name = f"{top}.{'zip' if format == 'zip' else 'tar.gz'}"
    media = "application/zip" if format == "zip" else "application/gzip"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(buf.getvalue(), media_type=media, headers=headers)


@router.post("/dit/describe", responses=ERRORS)
async def describe_diffs(
    req: DescribeRequest, amp: AmplifierDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Each diff's answer to the question (M + W + L; `dit: null` M + W; a null diff M + L), all in
    one batch, and each candidate's summed log-probability after the chat prompt."""
    if len(req.diffs) > settings.max_describe_diffs:
        limit = settings.max_describe_diffs
        raise ValueError(f"diffs: too many diffs ({len(req.diffs)}), the limit is {limit}")
    _check_new_tokens(settings, req.max_new_tokens)
    interpreter = None if req.dit is None else resolve(amp, [req.dit], "dit")[0]
    diffs = resolve(amp, req.diffs, "diffs[{}]")
    tokenizer, candidates = text_side(amp.pair).tokenizer, req.candidates or []

    def run(job: Any) -> Any:
        return describe(
            amp.model,
            tokenizer,
            diffs,
            interpreter,
            question=req.question,
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            seed=req.seed,
            candidates=candidates,
            max_rows=settings.max_describe_diffs,
        )

    answers = await engine.run(run)
    return {
        "dit": req.dit,
        "question": req.question,
        "results": [
            {
                "diff": name,
                "text": a.text,
                "candidates": [{"text": c, "logprob": lp} for c, lp in zip(candidates, a.logprobs)],
            }
            for name, a in zip(req.diffs, answers)
        ],
    }


@router.post("/dit/evaluate", responses=ERRORS)
async def evaluate_pairs(
    req: EvaluateRequest, amp: AmplifierDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Exact match and candidate accuracy of L on (diff, description) pairs, against chance and the
    baselines no_dit (M + W) and no_diff (M + L), with Wilson 95% intervals and per-item rows."""
    if len(req.pairs) > settings.max_dit_pairs:
        raise ValueError(f"pairs: too many pairs ({len(req.pairs)}), the limit is {settings.max_dit_pairs}")
    _check_new_tokens(settings, req.max_new_tokens)
    descriptions = [p.description for p in req.pairs]
    _check_candidates(req.candidates, [(f"pairs[{i}].description", d) for i, d in enumerate(descriptions)])
    interpreter = resolve(amp, [req.dit], "dit")[0]
    assert interpreter is not None
    names = [p.diff for p in req.pairs]
    diffs = resolve(amp, names, "pairs[{}].diff")
    return await evaluate_all(
        engine,
        amp,
        names,
        descriptions,
        interpreter,
        diffs,
        candidates=req.candidates or default_candidates(descriptions),
        question=req.question,
        max_new_tokens=req.max_new_tokens,
        chunk=settings.max_describe_diffs,
    )
