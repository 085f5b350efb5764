"""An experiment request turned into its stored spec: prompts resolved, the seed drawn, the grid
validated. `POST /experiments` and `python -m app.batch experiment` build specs here, so a job
file and a request body mean the same experiment and fail with the same messages."""

from __future__ import annotations

from typing import Any

from lda.experiments import (
    ExperimentRecord,
    ExperimentSpec,
    control_flag,
    extrapolate_alpha0,
    resolve_prompts,
    summarize,
)

from app.api.generation import base_seed
from app.experiments_lens.schemas import ExperimentRequest
from app.settings import Settings


def build_spec(req: ExperimentRequest, settings: Settings, max_samples: int | None) -> ExperimentSpec:
    """The spec of a request; `max_samples` caps conditions x prompts x n (None: no cap, for
    offline runs larger than one server takes). Reads prompt files: call it off the event loop."""
    conditions = req.condition_list()
    cap = prompt_cap(max_samples, len(conditions), req.n) if max_samples is not None else None
    prompts = resolve_prompts(
        req.prompt_source(), settings.config_root_paths, max_prompts=cap, allow_hub=settings.allow_hub_datasets
    )
    body: dict[str, Any] = {
        "name": req.name,
        "prompts": prompts,
        "conditions": conditions,
        "n": req.n,
        "seed": base_seed(req),
        "detectors": req.detectors,
        "store": req.store,
        "chunk_size": settings.experiment_chunk_size,
        "sampling": req.sampling(),
    }
    return ExperimentSpec.from_dict(body, max_samples=max_samples)


def prompt_cap(max_samples: int, conditions: int, n: int) -> int:
    """The most prompts MAX_EXPERIMENT_SAMPLES leaves room for at these conditions and n: a
    prompts_file or dataset is read no further than one prompt past it."""
    per_prompt = conditions * n
    if per_prompt > max_samples:
        raise ValueError(
            f"n: {conditions} conditions x n={n} = {per_prompt} samples per prompt exceeds "
            f"MAX_EXPERIMENT_SAMPLES={max_samples}"
        )
    return max_samples // per_prompt


def summary(record: ExperimentRecord, spec: ExperimentSpec) -> dict[str, Any]:
    """Rates with intervals per condition and detector, the control's flags and the alpha-0
    extrapolation: what GET /experiments/{id} and the batch report show."""
    rows = summarize(record.counts, record.totals, spec)
    control = any(c.control for c in spec.conditions)
    return {
        "summary": rows,
        "control_flags": control_flag(rows) if control else None,
        "extrapolation": extrapolate_alpha0(rows),
    }
