"""Routes of the LDA lens: validate, enqueue on the engine, translate results. No torch here."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from lda import IncompatibleTokenizersError

from app.amplification_lens.jobs import adapter_decoder
from app.api.deps import PairDep, SettingsDep, check_limits, get_amplifier, observe
from app.api.generation import Usage
from app.api.schemas import ERRORS, STREAMING
from app.api.streaming import run_job, stream_response
from app.diffing_lens.steering import resolve_steer, steer_decoder
from app.lda_lens.jobs import generate_job, lda_batch_job, lda_job
from app.lda_lens.schemas import (
    GenerateRequest,
    GenerateResponse,
    LDABatchRequest,
    LDABatchResponse,
    LDARequest,
    LDAResponse,
    TokenizerCompatibilityResponse,
)

router = APIRouter()


@router.post("/generate_lda", response_model=LDAResponse, responses=STREAMING)
async def generate_lda(req: LDARequest, request: Request, pair: PairDep, settings: SettingsDep) -> Any:
    """Decode with `after + alpha * (after - before)` for every prompt x alpha x n row."""
    t0 = time.perf_counter()
    rows = len(req.prompt_list) * len(req.alpha_list) * req.n
    check_limits(settings, req, rows)
    make_decoder = None
    if req.steer is not None:
        if req.adapter is not None or req.amplification is not None:
            raise ValueError("steer: give `steer` or `adapter`/`amplification`, not both")
        if not pair.compatibility.compatible:
            raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
        steering = await asyncio.to_thread(resolve_steer, request.app, req.steer)
        make_decoder = steer_decoder(pair, steering)
    elif req.adapter is not None or req.amplification is not None:
        if req.adapter is not None and req.amplification is not None:
            raise ValueError("give `adapter` or `amplification`, not both")
        make_decoder = adapter_decoder(get_amplifier(request), req)
    elif not pair.compatibility.compatible:
        raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
    usage = Usage()
    job_fn = lda_job(pair, req, usage, make_decoder, settings.max_batch_tokens)
    if req.stream:
        return stream_response(request, job_fn, t0, usage, "/generate_lda")
    body = await run_job(request, job_fn)
    observe(request, "/generate_lda", t0, usage)
    return body


@router.post("/generate_lda_batch", response_model=LDABatchResponse, responses=ERRORS)
async def generate_lda_batch(
    req: LDABatchRequest, request: Request, pair: PairDep, settings: SettingsDep
) -> Any:
    """The seed's batch route: one alpha, one row per prompt, decoded in chunks of at most
    `MAX_BATCH_TOKENS`; row i uses `seed + i`, exactly as `/generate_lda` with `prompts`."""
    t0 = time.perf_counter()
    check_limits(settings, req, len(req.prompts), what="prompts")
    if not pair.compatibility.compatible:
        raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
    usage = Usage()
    body = await run_job(request, lda_batch_job(pair, req, usage, settings.max_batch_tokens))
    observe(request, "/generate_lda_batch", t0, usage)
    return body


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(req: GenerateRequest, request: Request, pair: PairDep, settings: SettingsDep) -> Any:
    """Both models alone, no amplification, each with its own tokenizer and template."""
    t0 = time.perf_counter()
    check_limits(settings, req, 1)
    usage = Usage()
    body = await run_job(request, generate_job(pair, req, usage))
    observe(request, "/generate", t0, usage)
    return body


@router.get("/tokenizer_compatibility", response_model=TokenizerCompatibilityResponse, responses=ERRORS)
async def tokenizer_compatibility(pair: PairDep) -> Any:
    c = pair.compatibility
    return {
        "compatible": c.compatible,
        "vocab_size_1": c.vocab_size_after,
        "vocab_size_2": c.vocab_size_before,
        "vocabs_match": c.vocabs_match,
        "warning": c.warning,
        "special_tokens_match": c.special_tokens_match,
        "logits_width_1": c.logits_width_after,
        "logits_width_2": c.logits_width_before,
        "shared_width": c.shared_width,
    }
