"""Request -> library calls -> response, run on the engine thread.

Turns a validated request into decode rows (prompts x alphas x n), runs the decode loop,
emits stream events, checks the cancel flag between tokens, and builds the response body.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from lda import IncompatibleTokenizersError, LDAModelPair, Row, RowOutput, Side
from lda.pair import check_context, readable_prompt
from lda.static import source_factory

from app.api.chunking import plan_chunks
from app.api.generation import BatchTarget, Usage, base_seed, emit_text, in_batches, row_body, sampling_params
from app.engine import Job
from app.lda_lens.schemas import BATCH_ROW_FIELDS, GenerateRequest, LDABatchRequest, LDARequest


@dataclass(frozen=True)
class RowMeta:
    prompt_index: int
    alpha: float
    sample_index: int
    seed: int


@dataclass(frozen=True)
class Decoder:
    """Where an LDA request's logits come from: the two-model pair, or adapter mode."""

    side: Side  # whose tokenizer formats prompts and decodes text
    target: BatchTarget  # the running batch its rows join
    model_after: str
    model_before: str
    models: tuple[Any, ...]  # whose context windows bound prompt + completion


def pair_target(pair: LDAModelPair) -> BatchTarget:
    """Two-model LDA rows: any request's rows can share the pair's running batch."""
    after, before, width = pair.after.model, pair.before.model, pair.compatibility.shared_width
    key = ("lda", id(after), id(before), width, id(pair.after.tokenizer))
    return BatchTarget(key, source_factory((after, before), width), pair.after.tokenizer)


def side_target(side: Side) -> BatchTarget:
    """One model alone (`/generate`, the `after` / `before` OpenAI models)."""
    key = ("single", id(side.model), id(side.tokenizer))
    return BatchTarget(key, source_factory((side.model,)), side.tokenizer)


def pair_decoder(pair: LDAModelPair) -> Decoder:
    if not pair.compatibility.compatible:
        raise IncompatibleTokenizersError(f"LDA needs compatible tokenizers: {pair.compatibility.warning}")
    models = (pair.after.model, pair.before.model)
    return Decoder(pair.after, pair_target(pair), pair.after.model_id, pair.before.model_id, models)


def lda_job(
    pair: LDAModelPair,
    req: LDARequest,
    usage: Usage,
    make_decoder: Callable[[], Decoder] | None = None,
    max_batch_tokens: int | None = None,
) -> Callable[[Job], dict[str, Any] | None]:
    """The engine job for `/generate_lda` (streaming or not).

    With `max_batch_tokens` the rows decode in chunks of at most that many padded tokens, one
    after another within this job (see `app.api.chunking`); the result is the unchunked one.
    """

    def run(job: Job) -> Generator[Any, Any, dict[str, Any] | None]:
        decoder = make_decoder() if make_decoder else pair_decoder(pair)
        formatted, rows, metas = [], [], []
        seed0 = base_seed(req)
        for p_i, prompt in enumerate(req.prompt_list):
            text, ids = pair.prompt_ids(prompt, req.system_prompt, req.apply_chat_template, side=decoder.side)
            check_context(len(ids), req.max_new_tokens, *decoder.models)
            formatted.append(text)
            for alpha in req.alpha_list:
                for k in range(req.n):
                    seed = seed0 + len(rows)
                    rows.append(Row(ids, alpha, seed))
                    metas.append(RowMeta(p_i, alpha, k, seed))
        config = pair.decode_config(
            req.max_new_tokens, sampling_params(req), req.stop, req.details, side=decoder.side
        )
        if max_batch_tokens is None:
            chunks = [range(len(rows))]
        else:
            chunks = plan_chunks(rows, req.max_new_tokens, max_batch_tokens)
        outputs = yield from in_batches(decoder.target, rows, config, usage, emit_text(job), chunks)
        if outputs is None:
            return None
        return lda_response(decoder, req, formatted, metas, outputs)

    return run


def lda_response(
    decoder: Decoder, req: LDARequest, formatted: list[str], metas: list[RowMeta], outputs: list[RowOutput]
) -> dict[str, Any]:
    tok = decoder.side.tokenizer
    shown = [readable_prompt(tok, f) for f in formatted]  # once per prompt, not once per row
    results = []
    for meta, out in zip(metas, outputs):
        details = None
        if out.logprobs is not None:
            details = [
                {
                    "token_id": lp.token_id,
                    "token": tok.convert_ids_to_tokens(lp.token_id),
                    "logprob_after": lp.after,
                    "logprob_before": lp.before,
                    "logprob_amplified": lp.amplified,
                }
                for lp in out.logprobs
            ]
        results.append(
            {
                "prompt_index": meta.prompt_index,
                "prompt": req.prompt_list[meta.prompt_index],
                "formatted_prompt": formatted[meta.prompt_index],
                "alpha": meta.alpha,
                "sample_index": meta.sample_index,
                "seed": meta.seed,
                **row_body(out, shown[meta.prompt_index]),
                "details": details,
            }
        )
    first = results[0]
    return {
        "prompt": first["prompt"],
        "formatted_prompt": first["formatted_prompt"],
        "completion": first["completion"],
        "text": first["text"],
        "alpha": first["alpha"],
        "model_after": decoder.model_after,
        "model_before": decoder.model_before,
        "tokens_generated": first["tokens_generated"],
        "stopped_early": first["stopped_early"],
        "results": results,
    }


def lda_batch_job(
    pair: LDAModelPair, req: LDABatchRequest, usage: Usage, max_batch_tokens: int | None = None
) -> Callable[[Job], dict[str, Any] | None]:
    """The engine job for the seed's `/generate_lda_batch`: `/generate_lda` with one alpha and one
    row per prompt, answered in the seed's batch shape."""
    lda_req = LDARequest(**req.model_dump())
    inner = lda_job(pair, lda_req, usage, max_batch_tokens=max_batch_tokens)

    def run(job: Job) -> Generator[Any, Any, dict[str, Any] | None]:
        body = yield from inner(job)
        if body is None:
            return None
        return {
            "results": [{k: row[k] for k in BATCH_ROW_FIELDS} for row in body["results"]],
            "alpha": req.alpha,
            "model_after": body["model_after"],
            "model_before": body["model_before"],
            "batch_size": len(req.prompts),
        }

    return run


def generate_job(
    pair: LDAModelPair, req: GenerateRequest, usage: Usage
) -> Callable[[Job], dict[str, Any] | None]:
    """The engine job for `/generate`: each model alone, with its own tokenizer and template."""

    def run(job: Job) -> Generator[Any, Any, dict[str, Any] | None]:
        seed = base_seed(req)
        sides: list[dict[str, Any]] = []
        for side in (pair.after, pair.before):
            out = yield from _single(job, pair, side, req, seed, usage)
            if out is None:
                return None
            sides.append(out)
        return {"prompt": req.prompt, "model_1": sides[0], "model_2": sides[1]}

    return run


def _single(
    job: Job, pair: LDAModelPair, side: Side, req: GenerateRequest, seed: int, usage: Usage
) -> Generator[Any, Any, dict[str, Any] | None]:
    formatted, ids = pair.prompt_ids(req.prompt, req.system_prompt, req.apply_chat_template, side=side)
    check_context(len(ids), req.max_new_tokens, side.model)
    config = pair.decode_config(req.max_new_tokens, sampling_params(req), req.stop, side=side)
    outputs = yield from in_batches(side_target(side), [Row(ids, 0.0, seed)], config, usage, lambda event: None)
    if outputs is None:
        return None
    body = row_body(outputs[0], readable_prompt(side.tokenizer, formatted))
    del body["finish_reason"]  # not part of the seed's `/generate` response
    return {"model_id": side.model_id, **body}
