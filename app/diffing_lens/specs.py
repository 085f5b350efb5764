"""A diffing request turned into its rows, samples and stored spec, with every check that refuses
it (422 on the server). `POST /diffing/jobs` and `python -m app.batch scan` go through here, so a
job file and a request body mean the same scan and fail with the same messages."""

from __future__ import annotations

from typing import Any

from lda.diffing.inputs import Sample
from lda.diffing.mine import mining_width
from lda.experiments.prompts import resolve_prompts

from app.diffing_lens.jobs import adl_layers, labels, tokenize
from app.diffing_lens.schemas import LogitDiffRequest


def resolve_rows(req: Any, settings: Any, max_rows: int | None) -> list[Any]:
    """The request's rows (texts, a prompts file or a dataset); `max_rows` bounds them (None: no
    bound, for offline runs larger than one server takes). Reads files: call it off the event loop."""
    source = req.source()
    given = [k for k, v in (("texts", req.texts), ("prompts_file", req.prompts_file), ("dataset", req.dataset)) if v]
    if len(given) != 1:
        raise ValueError(f"texts: give exactly one of texts, prompts_file, dataset (got {given or 'none'})")
    if max_rows is not None and req.texts is not None and len(req.texts) > max_rows:
        raise ValueError(f"texts: {len(req.texts)} rows, the limit is {max_rows} (MAX_DIFFING_ROWS)")
    return resolve_prompts(source, settings.config_root_paths, max_prompts=max_rows, allow_hub=settings.allow_hub_datasets)


def check_on_pair(req: Any, pair: Any, rows: list[Any]) -> list[Sample]:
    """The checks that need the models; returns the tokenized samples. Sets defaulted positions."""
    if isinstance(req, LogitDiffRequest):
        width = mining_width(pair, req.drop_new_tokens)
        if req.top_k > width:
            raise ValueError(f"top_k: must be <= {width} (the compared vocabulary), got {req.top_k}")
    else:
        mining_width(pair)  # the lens reads the after model's vocabulary: the pair's must agree
        adl_layers(req, pair.after.model)  # a layer out of range is a 422 naming it
    window = getattr(pair.after.model.config, "max_position_embeddings", None)
    if isinstance(window, int) and req.max_tokens_per_sample > window:
        raise ValueError(
            f"max_tokens_per_sample: must be <= {window} (the context window), got {req.max_tokens_per_sample}"
        )
    samples = tokenize(pair.after.tokenizer, rows, req)
    if not isinstance(req, LogitDiffRequest):
        check_positions(req, labels(req, samples))
    return samples


def check_positions(req: Any, analysed: tuple[int, ...]) -> None:
    """Positions given for the patchscope or the steering search must be analysed ones; the
    defaults (0-5, 0-4) keep those that are."""
    for field in ("patchscope_positions", "steering_positions"):
        positions = getattr(req, field)
        if field not in req.model_fields_set:
            setattr(req, field, [p for p in positions if p in analysed])
            continue
        for i, p in enumerate(positions):
            if p not in analysed:
                raise ValueError(f"{field}[{i}]: position {p} is not analysed ({analysed[0]}..{analysed[-1]})")


def stored_spec(req: Any, rows: list[Any], pair: Any) -> dict[str, Any]:
    """The record's spec: the request without its source (the rows instead) or the grader's key
    (used by the job, never written to disk or shown)."""
    spec = req.model_dump(exclude={"texts": True, "prompts_file": True, "dataset": True, "grader": {"api_key"}})
    spec |= {"rows": rows, "source": source(req)}
    if not isinstance(req, LogitDiffRequest):  # the blocks read, so no client has to resolve 1.0 vs 1
        spec["blocks"] = list(adl_layers(req, pair.after.model))
    return spec


def source(req: Any) -> dict[str, Any]:
    if req.prompts_file is not None:
        return {"prompts_file": req.prompts_file}
    if req.dataset is not None:
        return {"dataset": req.dataset.model_dump(exclude_none=True)}
    return {"texts": len(req.texts or [])}
