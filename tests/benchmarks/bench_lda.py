"""LDA decoding speed against plain `generate`, on a ~30M-parameter Llama-shaped pair (CPU ok).

    python -m tests.benchmarks.bench_lda [--tokens 64] [--rows 8] [--repeats 3]

Prints JSON. Ratios compare runs made in this same process:
- lda_b1_over_generate_b1: LDA tokens/s at 1 row over the after model's own greedy `generate`
  tokens/s (two forward passes per token, so 0.5 is the ceiling);
- lda_rows_over_lda_b1: LDA tokens/s at `--rows` rows over LDA at 1 row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from app.demo import build_tokenizer  # noqa: E402
from lda import DecodeConfig, LDAModelPair, Row, SamplingParams, Side, collect  # noqa: E402
from tests.tiny import tiny_llama  # noqa: E402


def corpus(n_words: int = 60000, seed: int = 0) -> list[str]:
    """Random pseudo-words: enough distinct pairs for BPE to learn an ~8k vocabulary."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(n_words)
    ]
    return [" ".join(words[i : i + 20]) for i in range(0, n_words, 20)]


def bench_model(tokenizer, seed: int):
    # ~29M parameters: 6 layers x 3.4M + 2 x 8192 x 512 embeddings.
    return tiny_llama(
        tokenizer,
        seed,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    )


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tokenizer = build_tokenizer(corpus(), vocab_size=8192)
    after, before = bench_model(tokenizer, 1), bench_model(tokenizer, 2)
    pair = LDAModelPair(Side("after", after, tokenizer), Side("before", before, tokenizer))
    _, prompt = pair.prompt_ids("What should I do if I feel bored on a rainy afternoon?")
    config = DecodeConfig(args.tokens, SamplingParams(0.0), frozenset(), pad_id=pair.after.pad_id)
    n = args.tokens

    def generate_b1() -> None:
        with torch.no_grad():
            out = after.generate(
                torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        assert out.shape[1] == len(prompt) + n

    def lda(rows: int) -> None:
        outs = collect(pair.lda_events([Row(prompt, 1.0 + i) for i in range(rows)], config), rows)
        assert all(o.tokens_generated == n for o in outs)

    generate_b1()
    lda(1)  # warm-up
    t_gen = best_of(args.repeats, generate_b1)
    t_b1 = best_of(args.repeats, lambda: lda(1))
    t_rows = best_of(args.repeats, lambda: lda(args.rows))
    gen_tps, b1_tps, rows_tps = n / t_gen, n / t_b1, n * args.rows / t_rows
    print(
        json.dumps(
            {
                "benchmark": "lda_decode",
                "parameters_per_model": sum(p.numel() for p in after.parameters()),
                "prompt_tokens": len(prompt),
                "new_tokens": n,
                "rows": args.rows,
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "generate_b1_tokens_per_s": round(gen_tps, 1),
                "lda_b1_tokens_per_s": round(b1_tps, 1),
                f"lda_b{args.rows}_tokens_per_s": round(rows_tps, 1),
                "lda_b1_over_generate_b1": round(b1_tps / gen_tps, 3),
                "lda_rows_over_lda_b1": round(rows_tps / b1_tps, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
