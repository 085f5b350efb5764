"""One prefill per prompt: n samples of one long prompt against one sample, on the demo pair.

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_prefill [--samples 64]
        [--prompt-tokens 180] [--repeats 5] [--data-dir data] [--device cpu|cuda] [--dtype auto|bf16]

Two-model LDA on the embedded demo pair (`app.demo.ensure_demo_pair`, built under `--data-dir`
if missing), `max_new_tokens=1`, alpha 1, temperature 1, seeds 0..samples-1, the demo prompts
joined into one chat-templated prompt of about `--prompt-tokens` tokens. Prints JSON; times are
best of `--repeats`, the three runs of a repeat interleaved so a neighbour's load hits them alike:
- shared_over_one: `--samples` rows with the prompt prefilled once (the default) over one row.
  Goal <= 4.
- unshared_over_one: the same rows prefilled once per row (`share_prefill=False`, the old way).
- same_tokens: both ways sampled the same ids (asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from lda import LDAModelPair, LoadConfig, Row, SamplingParams, collect, decode
from lda.source import ModelSource
from tests.benchmarks.bench_lda import hardware, sync

from app.demo import demo_prompts, ensure_demo_pair


def long_prompt(pair: LDAModelPair, tokens: int) -> tuple[int, ...]:
    """The demo prompts, cycled, as one user message of at least `tokens` templated tokens."""
    words: list[str] = []
    ids: tuple[int, ...] = ()
    prompts = demo_prompts()
    while len(ids) < tokens:
        words.append(prompts[len(words) % len(prompts)])
        ids = pair.prompt_ids(" ".join(words))[1]
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=180)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    args = ap.parse_args()

    paths = ensure_demo_pair(args.data_dir)
    pair = LDAModelPair.from_pretrained(
        str(paths.after), str(paths.base), LoadConfig(args.device, args.dtype)
    )
    after, before = pair.after.model, pair.before.model
    device = after.device
    prompt = long_prompt(pair, args.prompt_tokens)
    config = pair.decode_config(1, SamplingParams(temperature=1.0))
    width = pair.compatibility.shared_width

    def lda(samples: int, share: bool = True) -> list[tuple[int, ...]]:
        rows = [Row(prompt, 1.0, seed) for seed in range(samples)]
        source = ModelSource(after, before, width)
        outs = collect(decode(source, pair.after.tokenizer, rows, config, share_prefill=share), samples)
        sync(device)
        return [tuple(o.token_ids) for o in outs]

    runs: dict[str, Any] = {
        "one": lambda: lda(1),
        "shared": lambda: lda(args.samples),
        "unshared": lambda: lda(args.samples, share=False),
    }
    for fn in runs.values():
        fn()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    same = lda(args.samples) == lda(args.samples, share=False)
    assert same, "shared and per-row prefill sampled different tokens"
    result = {
        "benchmark": "shared_prefill",
        "pair": "demo",
        "parameters_per_model": sum(p.numel() for p in after.parameters()),
        "prompt_tokens": len(prompt),
        "samples": args.samples,
        "max_new_tokens": 1,
        **hardware(device, next(after.parameters()).dtype),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "one_ms": round(best["one"] * 1e3, 2),
        "shared_ms": round(best["shared"] * 1e3, 2),
        "unshared_ms": round(best["unshared"] * 1e3, 2),
        "shared_over_one": round(best["shared"] / best["one"], 2),
        "unshared_over_one": round(best["unshared"] / best["one"], 2),
        "unshared_over_shared": round(best["unshared"] / best["shared"], 2),
        "same_tokens": same,
    }
    if device.type == "cuda":
        result["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
