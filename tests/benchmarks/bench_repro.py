"""Reproducibility of a row batched vs alone, in the dtype served (bf16 on a GPU): token agreement.

    python -m tests.benchmarks.bench_repro [--prompts 32] [--tokens 32]
        [--size tiny|bench|1b] [--device auto|cpu|cuda] [--dtype bf16|fp32|auto]

In fp32 on a CPU a row's tokens do not depend on its batch neighbours (the suite checks it exactly).
In bf16, and on GPUs in any dtype, kernels pick their reduction order by batch shape, so a row
batched beside longer neighbours can round differently from the row alone; once one token differs
the rest of the row follows another path. This measures how often that happens, for greedy and for
seeded sampling, with rows of varied prompt lengths decoded (a) each alone, (b) together in one
batch, (c) joining a running batch at staggered steps (continuous batching). Prints JSON:
`*_rows_same_tokens` (fraction of rows whose tokens equal the row alone), `*_tokens_agree` (the
fraction of tokens before each row's first difference), `*_first_difference_median` (the step of
the first difference among rows that differ), and `max_after_logprob_diff` (the largest change of
the after model's logprob at a token both runs chose, before any difference).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from lda import DecodeConfig, LDAModelPair, Row, SamplingParams, Side, collect
from lda.decode import RunningBatch
from lda.source import ModelSource
from tests.benchmarks.bench_lda import (
    add_model_args,
    bench_model,
    bench_tokenizer,
    corpus,
    hardware,
    model_placement,
)

SAMPLINGS = {"greedy": SamplingParams(0.0), "seeded": SamplingParams(1.0, top_k=50, top_p=0.95)}


def prompts(pair: LDAModelPair, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`n` prompts of 4 to 60 words: varied lengths, so rows carry different left padding."""
    rng, words = random.Random(seed), " ".join(corpus(4000, seed)).split()
    out = []
    for _ in range(n):
        start = rng.randrange(len(words) - 60)
        out.append(tuple(pair.after.tokenizer(" ".join(words[start : start + rng.randint(4, 60)]))["input_ids"]))
    return out


def staggered(pair: LDAModelPair, rows: list[Row], config: DecodeConfig) -> list[Any]:
    """Rows join one running batch a few at a time, one group per step (as requests arrive)."""
    make = lambda: ModelSource(pair.after.model, pair.before.model, pair.compatibility.shared_width)  # noqa: E731
    batch, outputs, pending = RunningBatch(make, pair.after.tokenizer), [None] * len(rows), list(enumerate(rows))
    while pending or batch:
        if pending:
            group, pending = pending[:3], pending[3:]
            batch.admit([r for _, r in group], config, ticket=tuple(i for i, _ in group))
        for ticket, event in batch.step():
            if hasattr(event, "finish_reason"):
                outputs[ticket[event.row]] = event
    return outputs


def compare(alone: list[Any], other: list[Any]) -> dict[str, Any]:
    same, agree, total, firsts, drift = 0, 0, 0, [], 0.0
    for a, b in zip(alone, other, strict=True):
        n = min(len(a.token_ids), len(b.token_ids))
        k = next((i for i in range(n) if a.token_ids[i] != b.token_ids[i]), n)
        same += a.token_ids == b.token_ids
        agree += k
        total += max(len(a.token_ids), len(b.token_ids))
        if a.token_ids != b.token_ids:
            firsts.append(k)
        for x, y in zip(a.logprobs[:k], b.logprobs[:k]):
            drift = max(drift, abs(x.after - y.after))
    return {
        "rows_same_tokens": round(same / len(alone), 4),
        "tokens_agree": round(agree / max(total, 1), 4),
        "first_difference_median": statistics.median(firsts) if firsts else None,
        "max_after_logprob_diff": drift,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    add_model_args(ap)
    ap.set_defaults(dtype="bf16")
    args = ap.parse_args()
    device, dtype = model_placement(args)
    started = time.perf_counter()
    tokenizer = bench_tokenizer(args.size)
    pair = LDAModelPair(
        Side("after", bench_model(tokenizer, 1, args.size, device, dtype), tokenizer),
        Side("before", bench_model(tokenizer, 2, args.size, device, dtype), tokenizer),
    )
    ids = prompts(pair, args.prompts)
    result: dict[str, Any] = {
        "benchmark": "repro_batched_vs_alone",
        "size": args.size,
        "prompts": args.prompts,
        "new_tokens": args.tokens,
        **hardware(device, dtype),
    }
    for name, sampling in SAMPLINGS.items():
        # No EOS: every row runs the full length, so every row is compared over the same tokens.
        config = DecodeConfig(args.tokens, sampling, frozenset(), details=True, pad_id=pair.after.pad_id)
        rows = [Row(p, 1.0, seed=i) for i, p in enumerate(ids)]
        alone = [collect(pair.lda_events([r], config), 1)[0] for r in rows]
        together = collect(pair.lda_events(rows, config), len(rows))
        for how, outputs in (("batched", together), ("joined", staggered(pair, rows, config))):
            for key, value in compare(alone, outputs).items():
                result[f"{name}_{how}_{key}"] = value
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
