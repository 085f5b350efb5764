"""Engine jobs for the amplification lens: adapter-mode LDA and side-by-side amplified columns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from amplification import field_path, merged
from amplification.adapter_mode import AdapterSource
from lda import LDAModelPair, Row, decode
from lda.pair import Side, check_context, readable_prompt
from lda.source import ModelSource

from app.amplification_lens.amplifier import Amplifier, Compiled
from app.amplification_lens.schemas import AmplificationGenerateRequest
from app.api.chunking import chunked_events, plan_chunks
from app.api.generation import BatchTarget, Usage, base_seed, emit_text, row_body, run_events, sampling_params
from app.engine import Job
from app.lda_lens.jobs import Decoder
from app.lda_lens.schemas import LDARequest


def text_side(pair: LDAModelPair) -> Side:
    """Prompts for the base model are formatted like the after model's when the vocabularies agree."""
    return pair.after if pair.compatibility.compatible else pair.before


def adapter_target(amp: Amplifier, compiled: Compiled) -> BatchTarget:
    """Adapter-mode rows of one compiled config share a running batch (same adapters, same tables)."""
    plan = amp.plan(compiled)
    side = text_side(amp.pair)
    key = ("adapter", id(amp.model), compiled.content_hash, tuple(map(id, compiled.adapters)), id(side.tokenizer))
    return BatchTarget(key, lambda: AdapterSource(amp.model, plan), side.tokenizer)


def adapter_decoder(amp: Amplifier, req: LDARequest) -> Callable[[], Decoder]:
    """Adapter-mode LDA: after = base + (amplified) adapter, before = base, one forward."""

    def make() -> Decoder:
        reference = req.amplification if req.amplification is not None else req.adapter
        with field_path("amplification" if req.amplification is not None else "adapter"):
            compiled = amp.lookup(reference)  # type: ignore[arg-type]
        base = amp.pair.before.model_id
        return Decoder(
            text_side(amp.pair),
            adapter_target(amp, compiled),
            f"{base}+{compiled.lora_name}",
            base,
            (amp.model,),
        )

    return make


def columns_for(amp: Amplifier, req: AmplificationGenerateRequest) -> list[tuple[str, str, Compiled | None]]:
    """(name, kind, compiled) per column: base, plain adapters, then each config, in that order."""
    configs = []
    for i, ref in enumerate(req.configs):
        with field_path(f"configs[{i}]"):
            configs.append(amp.lookup(ref))
    columns: list[tuple[str, str, Compiled | None]] = []
    if req.include_base:
        columns.append(("base", "base", None))
    if req.include_adapters:
        adapters = {a.name: a for c in configs for a in c.adapters}  # first-seen order, no repeats
        columns += [(a.name, "adapter", amp.plain(a)) for a in adapters.values()]
    columns += [(c.config.name, "config", c) for c in configs]
    return columns


def amplification_job(
    amp: Amplifier, req: AmplificationGenerateRequest, usage: Usage, max_batch_tokens: int | None = None
) -> Callable[[Job], dict[str, Any] | None]:
    """Each column merges its config into the base in place, decodes every row (in chunks of at most
    `max_batch_tokens` padded tokens), and restores."""

    def run(job: Job) -> dict[str, Any] | None:
        columns = columns_for(amp, req)
        side = text_side(amp.pair)
        formatted, ids = zip(
            *(
                amp.pair.prompt_ids(p, req.system_prompt, req.apply_chat_template, side=side)
                for p in req.prompt_list
            )
        )
        for prompt_ids in ids:
            check_context(len(prompt_ids), req.max_new_tokens, amp.model)
        shown = [readable_prompt(side.tokenizer, f) for f in formatted]  # once per prompt
        seed0 = base_seed(req)
        rows = [Row(ids[p], 0.0, seed0 + p * req.n + k) for p in range(len(ids)) for k in range(req.n)]
        config = amp.pair.decode_config(req.max_new_tokens, sampling_params(req), req.stop, side=side)
        chunks = [range(len(rows))]
        if max_batch_tokens is not None:
            chunks = plan_chunks(rows, req.max_new_tokens, max_batch_tokens)
        out_columns = []
        for c, (name, kind, compiled) in enumerate(columns):
            plan = amp.plan(compiled) if compiled is not None else {}
            with merged(amp.model, plan):
                events = chunked_events(
                    lambda part: decode(ModelSource(amp.model), side.tokenizer, part, config), rows, chunks
                )
                outputs = run_events(job, events, len(rows), usage, emit_text(job, column=c))
            if outputs is None:
                return None
            out_columns.append(
                {
                    "name": name,
                    "kind": kind,
                    "lora_name": compiled.lora_name if compiled is not None else None,
                    "results": [
                        {
                            "prompt_index": i // req.n,
                            "sample_index": i % req.n,
                            "seed": rows[i].seed,
                            **row_body(o, shown[i // req.n]),
                        }
                        for i, o in enumerate(outputs)
                    ],
                }
            )
        return {
            "prompts": req.prompt_list,
            "formatted_prompts": list(formatted),
            "model": amp.base_model_id,
            "columns": out_columns,
        }

    return run
