"""The diffing jobs' passes against plain forwards, and their memory as samples grow.

    python -m tests.benchmarks.bench_diffing [--samples 256] [--n 64] [--batch 16] [--top-k 100]
        [--grow 10] [--size tiny|bench|1b] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16]

Prints JSON. Ratios compare runs made in this same process, on the same models and tokens:
- mining_over_two_forwards: a logit-diff mining pass (both forwards, then the streamed
  statistics, KL, likelihood-ratio windows and top examples) over the two teacher-forced forwards
  alone (`ModelSource.score`: both models, fp32 logits at every position). Goal: at most 1.2.
- adl_over_two_forwards: an ADL pass (both forwards with one block captured, per-position sums)
  over the same two forwards.
- rss_growth_{grow}x: the process's resident memory after a mining pass over `grow` times the
  samples, relative to after the first pass (both measured after the pass, the KL files on disk).
  Goal: under 5%: nothing the pass keeps grows with samples (NMF off).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from lda import LDAModelPair
from lda.diffing.adl import ADLConfig, ADLPass
from lda.diffing.forward import pad_right
from lda.diffing.inputs import Sample
from lda.diffing.mine import LogitDiffPass, PassConfig
from lda.pair import Side
from lda.source import ModelSource
from tests.benchmarks.bench_dit import best_of
from tests.benchmarks.bench_lda import add_model_args, bench_model, bench_tokenizer, hardware, model_placement


def rss_bytes() -> int:
    """Resident set size now (Linux), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def random_samples(count: int, n: int, vocab: int, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, n), generator=g).tolist()
    return [Sample(i, tuple(row), tuple(range(n))) for i, row in enumerate(ids)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--grow", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    add_model_args(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = model_placement(args)
    tok = bench_tokenizer(args.size)
    after, before = (bench_model(tok, seed, args.size, device, dtype).eval() for seed in (1, 2))
    pair = LDAModelPair(Side("after", after, tok), Side("before", before, tok))
    width = pair.compatibility.shared_width
    samples = random_samples(args.samples, args.n, len(tok), seed=0)
    batches = [samples[i : i + args.batch] for i in range(0, len(samples), args.batch)]
    work = Path(tempfile.mkdtemp(prefix="bench-diffing-"))
    result: dict[str, Any] = {"benchmark": "diffing", "size": args.size, "samples": args.samples, "n": args.n,
                              "batch": args.batch, "top_k": args.top_k, **hardware(device, dtype)}  # fmt: skip

    @torch.no_grad()
    def forwards() -> None:
        for batch in batches:
            ids, mask, pos = pad_right(batch, pair.after.pad_id)
            ModelSource(after, before, width).score(ids, mask, pos)

    def mining(which: list[list[Sample]] = batches) -> LogitDiffPass:
        run = LogitDiffPass(pair, PassConfig(top_k=args.top_k), work / "mine", width)
        for batch in which:
            run.add(batch)
        run.miner.kl.summary()
        return run

    def adl() -> None:
        run = ADLPass(pair, ADLConfig(layers=(after.config.num_hidden_layers // 2,), labels=tuple(range(args.n)),
                                      patchscope_labels=()), width)  # fmt: skip
        for batch in batches:
            run.add(batch)

    with torch.no_grad():
        plain = best_of(args.repeats, forwards, device)
        mined = best_of(args.repeats, mining, device)
        lens = best_of(args.repeats, adl, device)
    result |= {
        "two_forwards_s": round(plain, 4),
        "mining_s": round(mined, 4),
        "adl_s": round(lens, 4),
        "mining_over_two_forwards": round(mined / plain, 3),
        "adl_over_two_forwards": round(lens / plain, 3),
    }
    with torch.no_grad():
        mining()
        first = rss_bytes()
        many = random_samples(args.samples * args.grow, args.n, len(tok), seed=1)
        mining([many[i : i + args.batch] for i in range(0, len(many), args.batch)])
        grown = rss_bytes()
    result |= {
        "rss_after_pass_mb": round(first / 2**20, 1),
        f"rss_after_{args.grow}x_pass_mb": round(grown / 2**20, 1),
        f"rss_growth_{args.grow}x": round(grown / first - 1, 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
