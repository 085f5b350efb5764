"""Diffing jobs on the engine: one teacher-forced batch per engine job, so interactive requests
run between batches; the streaming state lives in the driver, the record on disk (JobStore)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lda.diffing import mine
from lda.diffing.inputs import Sample, tokenize_chats, tokenize_texts
from weightdiff.jobs import JobRecord, JobStore, write_json_atomic

from app.diffing_lens.schemas import LogitDiffRequest
from app.weightdiff_lens.jobs import _on_engine

log = logging.getLogger(__name__)

RESULT = "result.json"
TOKEN_STATS = "token_stats.json"
ZIP = "results.zip"
RUN_DIR = "run"
# What GET /diffing/jobs/{id} shows of the lists a result keeps (the rest: GET .../result).
SHOWN = 10


def tokenize(tokenizer: Any, rows: Sequence[Any], req: LogitDiffRequest) -> list[Sample]:
    """Samples as the toolkit builds them; rows are all texts or all chat message lists (422 else)."""
    kinds = {isinstance(r, str) for r in rows}
    if len(kinds) > 1:
        raise ValueError("texts: mix of texts and chat message lists; give one kind per job")
    n, cap = req.max_tokens_per_sample, req.max_samples
    if kinds == {True}:
        samples = tokenize_texts(tokenizer, rows, n, cap)
        shape = f"{n} tokens (max_tokens_per_sample)"
    else:
        samples = tokenize_chats(tokenizer, rows, n, cap, req.pre_assistant_k, positions=n)
        shape = f"a [user, assistant] start and an answer of {n} tokens (max_tokens_per_sample)"
    if not samples:
        raise ValueError(f"texts: none of the {len(rows)} rows has {shape}")
    return samples


def public(record: JobRecord) -> dict[str, Any]:
    """The record as GET shows it: the spec without its rows, the result's lists cut short."""
    body = record.public()
    spec = record.spec
    body["spec"] = {k: v for k, v in spec.items() if k != "rows"} | {"num_rows": len(spec.get("rows") or [])}
    for key in ("task_names", "outputs", "losses", "registered"):
        body.pop(key, None)
    result = dict(record.result)
    for key in ("kl_examples_by_max", "kl_examples_by_mean", "llr_windows"):
        if key in result:
            result[key] = result[key][:SHOWN]
    body["result"] = result
    links = {"token_stats": "token_stats", "zip": ZIP, "result": "result"}
    done = record.status == "done"
    body["links"] = {k: f"/diffing/jobs/{record.id}/{v}" for k, v in links.items()} if done else {}
    return body


async def drive(app: Any, record: JobRecord, req: LogitDiffRequest, samples: list[Sample], cancel: threading.Event) -> None:
    """Start, reduce batch by batch, finish; every state change is written to disk."""
    store: JobStore = app.state.diffing_jobs
    engine, pair = app.state.engine, app.state.pair
    folder = store.dir(record.id)
    batches = [samples[i : i + req.batch_size] for i in range(0, len(samples), req.batch_size)]
    miner: mine.LogitDiffPass | None = None

    def start(job: Any) -> None:
        nonlocal miner
        miner = mine.LogitDiffPass(pair, mine_config(req), folder / "work")
        record.status, record.started, record.total_steps = "running", time.time(), len(batches)
        store.save(record)

    def step(job: Any) -> None:
        assert miner is not None
        began = time.perf_counter()
        miner.add(batches[record.step])
        record.step += 1
        record.train_seconds += time.perf_counter() - began
        store.save(record)

    def finish(job: Any) -> None:
        assert miner is not None
        result = miner.finish(folder / RUN_DIR, req.dataset_name, metadata(record, req, pair))
        write_json_atomic(folder / TOKEN_STATS, miner.token_stats().to_json())
        write_json_atomic(folder / RESULT, result)
        mine.zip_dir(folder / RUN_DIR, folder / ZIP)
        record.result = result
        record.outputs = {"run": str(folder / RUN_DIR), "zip": str(folder / ZIP)}
        record.status, record.finished = "done", time.time()
        store.save(record)

    try:
        await _on_engine(engine, start)
        while record.step < len(batches):
            if cancel.is_set():
                record.status, record.finished = "cancelled", time.time()
                store.save(record)
                return
            await _on_engine(engine, step)
        await _on_engine(engine, finish)
    except asyncio.CancelledError:
        raise  # shutdown: the lifespan marks the record interrupted
    except Exception as exc:  # a job failing never takes the server or other jobs down
        log.exception("diffing job %s failed", record.id)
        record.status, record.error, record.finished = "failed", f"{type(exc).__name__}: {exc}", time.time()
        store.save(record)


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


def metadata(record: JobRecord, req: LogitDiffRequest, pair: Any) -> dict[str, Any]:
    """`run_metadata.json`: what produced the files (the toolkit's dashboard shows it)."""
    return {
        "job_id": record.id,
        "method": "diff_mining",
        "base_model": pair.before.model_id,
        "finetuned_model": pair.after.model_id,
        "logit_extraction": "logits",
        "max_samples": req.max_samples,
        "max_tokens_per_sample": req.max_tokens_per_sample,
        "top_k": req.top_k,
        "batch_size": req.batch_size,
        "datasets": [req.dataset_name],
    }


def read_result(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RESULT).read_text())
