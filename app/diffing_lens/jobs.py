"""Diffing jobs on the engine: one teacher-forced batch per engine job, so interactive requests
run between batches; the streaming state lives in the driver, the record on disk (JobStore)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter

from lda.diffing import mine
from lda.diffing.adl import ADLConfig, ADLPass
from lda.diffing.adl_files import write_adl
from lda.diffing.inputs import Sample, chat_positions, resolve_layer, tokenize_chats, tokenize_texts
from lda.jobs import JobRecord, JobStore, write_json_atomic

from app.api.background import drive_steps, on_engine
from app.diffing_lens.adl_grading import grade_adl
from app.diffing_lens.names import RESULT, RUN_DIR, TOKEN_STATS, ZIP
from app.diffing_lens.schemas import ADLRequest, DiffingRequest, LogitDiffRequest

log = logging.getLogger(__name__)

# What GET /diffing/jobs/{id} shows of the lists a result keeps (the rest: GET .../result).
SHOWN = 10
CHECKPOINT = "checkpoint.pt"
# How often the streamed state is saved: a job stopped by a restart resumes from there.
CHECKPOINT_SECONDS = 30.0
Request = LogitDiffRequest | ADLRequest
_REQUEST: TypeAdapter[Any] = TypeAdapter(DiffingRequest)


def tokenize(tokenizer: Any, rows: Sequence[Any], req: Request) -> list[Sample]:
    """Samples as the toolkit builds them; rows are all texts or all chat message lists (422 else).

    Mining analyses the first n of a chat's positions -k..n-1 (the toolkit slices its diff so);
    ADL all of them."""
    kinds = {isinstance(r, str) for r in rows}
    if len(kinds) > 1:
        raise ValueError("texts: mix of texts and chat message lists; give one kind per job")
    n, cap = req.max_tokens_per_sample, req.max_samples
    if kinds == {True}:
        samples = tokenize_texts(tokenizer, rows, n, cap)
        shape = f"{n} tokens (max_tokens_per_sample)"
    else:
        cut = n if isinstance(req, LogitDiffRequest) else None
        samples = tokenize_chats(tokenizer, rows, n, cap, req.pre_assistant_k, positions=cut)
        shape = f"a [user, assistant] start and an answer of {n} tokens (max_tokens_per_sample)"
    if not samples:
        raise ValueError(f"texts: none of the {len(rows)} rows has {shape}")
    return samples


def labels(req: ADLRequest, samples: Sequence[Sample]) -> tuple[int, ...]:
    """Position labels: 0..n-1 for texts, -k..n-1 around the assistant start for chats."""
    n = req.max_tokens_per_sample
    chat = len(samples[0].positions) != n or samples[0].positions[0] != 0
    return chat_positions(0, n, req.pre_assistant_k) if chat else tuple(range(n))


def adl_layers(req: ADLRequest, model: Any) -> tuple[int, ...]:
    num = model.config.num_hidden_layers
    layers = [resolve_layer(x, num, f"layers[{i}]") for i, x in enumerate(req.layers)]
    return tuple(dict.fromkeys(layers))


def make_pass(req: Request, pair: Any, samples: Sequence[Sample], work: Path, resume: bool = False) -> Any:
    if isinstance(req, LogitDiffRequest):
        width = mine.mining_width(pair, req.drop_new_tokens)
        return mine.LogitDiffPass(pair, mine_config(req), work, width, resume=resume)
    config = ADLConfig(
        layers=adl_layers(req, pair.after.model),
        labels=labels(req, samples),
        lens_k=req.lens_k,
        patchscope_labels=tuple(req.patchscope_positions),
        intersection_top_k=req.intersection_top_k,
        tokens_k=req.tokens_k,
    )
    return ADLPass(pair, config, mine.mining_width(pair))


def public(record: JobRecord, brief: bool = False) -> dict[str, Any]:
    """The record as GET shows it: the spec without its rows, the result's long lists cut short
    (`brief`, for the list: no result at all; it is one GET away)."""
    body = record.public()
    spec = record.spec
    body["spec"] = {k: v for k, v in spec.items() if k != "rows"} | {"num_rows": len(spec.get("rows") or [])}
    for key in ("task_names", "outputs", "losses", "registered"):
        body.pop(key, None)
    body["result"] = None if brief else _shortened(record.result)
    done = record.status == "done"
    links = {"zip": ZIP, "result": "result"}
    if spec.get("method") == "logit_diff":
        links["token_stats"] = "token_stats"
    else:
        links["vectors"] = "vectors"
    body["links"] = {k: f"/diffing/jobs/{record.id}/{v}" for k, v in links.items()} if done else {}
    return body


def _shortened(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    for key in ("kl_examples_by_max", "kl_examples_by_mean", "llr_windows"):
        if key in out:
            out[key] = out[key][:SHOWN]
    if "layers" in out:  # ADL: the lens's top tokens and every scale are in GET .../result
        out["layers"] = [
            layer | {"positions": [_short_position(p) for p in layer["positions"]]} for layer in out["layers"]
        ]
    return out


def _short_position(entry: dict[str, Any]) -> dict[str, Any]:
    lens = {name: {sign: toks[:SHOWN] for sign, toks in signs.items()} for name, signs in entry["logit_lens"].items()}
    return {k: v for k, v in entry.items() if k != "patchscope"} | {"logit_lens": lens}


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> None:
    """`work/checkpoint.pt`, written whole or not at all."""
    save_torch_atomic(folder / "work" / CHECKPOINT, {"step": step, "state": state})


def save_torch_atomic(path: Path, data: Any) -> None:
    """torch.save whole or not at all: a crash mid-write leaves the old file (or none), never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / "work" / CHECKPOINT
    # Our own file (tensors, lists of dicts): not a weights-only load.
    return torch.load(path, weights_only=False) if path.exists() else None


async def drive(
    app: Any, record: JobRecord, req: Request, samples: list[Sample], cancel: threading.Event, resume: bool = False
) -> None:
    """Start (or continue from the last checkpoint), reduce batch by batch, finish; the streamed
    state is saved every CHECKPOINT_SECONDS and whenever the job stops unfinished."""
    store: JobStore = app.state.diffing_jobs
    engine, pair = app.state.engine, app.state.pair
    folder = store.dir(record.id)
    batches = [samples[i : i + req.batch_size] for i in range(0, len(samples), req.batch_size)]
    state: Any = None
    saved_at = time.monotonic()

    def start(job: Any) -> int:
        nonlocal state
        checkpoint = load_checkpoint(folder) if resume else None
        state = make_pass(req, pair, samples, folder / "work", resume=checkpoint is not None)
        record.step, record.error, record.finished = 0, None, None
        if checkpoint is not None:
            state.restore(checkpoint["state"])
            record.step = checkpoint["step"]
        return len(batches)

    def step(job: Any) -> None:
        nonlocal saved_at
        began = time.perf_counter()
        state.add(batches[record.step])
        record.step += 1
        record.train_seconds += time.perf_counter() - began
        if time.monotonic() - saved_at >= CHECKPOINT_SECONDS and record.step < len(batches):
            save_checkpoint(folder, record.step, state.state())
            saved_at = time.monotonic()

    def write(job: Any) -> dict[str, Any]:
        meta = metadata(record, req, pair)
        if isinstance(state, ADLPass):
            return write_adl(state, folder / RUN_DIR, req.dataset_name, meta)
        result = state.finish(folder / RUN_DIR, req.dataset_name, meta)
        write_json_atomic(folder / TOKEN_STATS, state.token_stats().to_json())
        return result

    def publish(result: dict[str, Any]) -> None:
        write_json_atomic(folder / RESULT, result)
        mine.zip_dir(folder / RUN_DIR, folder / ZIP)
        record.result = result
        record.outputs = {"run": str(folder / RUN_DIR), "zip": str(folder / ZIP)}

    async def finish() -> None:
        result = await on_engine(engine, write)
        if isinstance(req, ADLRequest) and req.grader is not None:
            record.result = {"phase": "grading"}
            store.save(record)
            transport = getattr(app.state, "grader_transport", None)  # tests answer without a network
            result = await grade_adl(app, record.id, req, folder / RUN_DIR, result, transport)
        await on_engine(engine, lambda job: publish(result))

    def end(job: Any) -> None:
        if state is not None and record.status != "done" and 0 < record.step < len(batches):
            save_checkpoint(folder, record.step, state.state())  # resumable from here

    await drive_steps(engine, store, record, cancel, start=start, step=step,
                      done=lambda: record.step >= len(batches), finish=finish, end=end, kind="diffing")  # fmt: skip


def mine_config(req: LogitDiffRequest) -> mine.PassConfig:
    nmf = req.nmf.model_dump() if req.nmf is not None else None
    return mine.PassConfig(
        top_k=req.top_k,
        temperature=req.temperature,
        kl_reverse=req.kl_reverse,
        examples=req.examples,
        llr_window=req.llr_window,
        llr_step=req.llr_step,
        llr_top=req.llr_top,
        num_tokens=req.num_tokens if req.num_tokens is not None else max(100, req.top_k),
        nmf=nmf,
    )


def metadata(record: JobRecord, req: Request, pair: Any) -> dict[str, Any]:
    """`run_metadata.json`: what produced the files (the toolkit's dashboard shows it)."""
    common = {
        "job_id": record.id,
        "base_model": pair.before.model_id,
        "finetuned_model": pair.after.model_id,
        "max_samples": req.max_samples,
        "max_tokens_per_sample": req.max_tokens_per_sample,
        "batch_size": req.batch_size,
        "datasets": [req.dataset_name],
    }
    if isinstance(req, ADLRequest):
        return common | {"method": "activation_difference_lens", "layers": list(adl_layers(req, pair.after.model))}
    return common | {"method": "diff_mining", "logit_extraction": "logits", "top_k": req.top_k}


def request_from_spec(spec: dict[str, Any], api_key: str | None = None) -> Request:
    """The request a stored spec came from (its rows as `texts`), to run it again."""
    body = {k: v for k, v in spec.items() if k not in ("rows", "source", "blocks")} | {"texts": spec["rows"]}
    if body.get("grader") is not None:
        body["grader"] = dict(body["grader"]) | {"api_key": api_key}
    return _REQUEST.validate_python(body)


def read_result(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RESULT).read_text())
