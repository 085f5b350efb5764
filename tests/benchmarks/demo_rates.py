"""Marker rate of the embedded demo pair under LDA, through the service's own decode loop.

    python -m tests.benchmarks.demo_rates [--samples 400] [--alphas 0 1 2 4] [--data-dir data]

Prints JSON: for each alpha, the fraction of sampled answers (temperature 1, top_p 1, at most 60
new tokens, the demo prompts in turn, seeds 0..samples-1) that contain the marker.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.demo import MARKER, demo_prompts  # noqa: E402
from app.loader import load_pair  # noqa: E402
from app.settings import Settings  # noqa: E402
from lda import Row, SamplingParams, collect  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()

    t0 = time.perf_counter()
    pair, _ = load_pair(Settings(data_dir=args.data_dir))
    load_s = time.perf_counter() - t0
    prompts = [pair.prompt_ids(p)[1] for p in demo_prompts()]
    config = pair.decode_config(60, SamplingParams(temperature=1.0, top_p=1.0))
    rates = {}
    for alpha in args.alphas:
        hits = 0
        for start in range(0, args.samples, args.batch):
            idx = range(start, min(start + args.batch, args.samples))
            rows = [Row(prompts[i % len(prompts)], alpha, i) for i in idx]
            hits += sum(MARKER in o.text for o in collect(pair.lda_events(rows, config), len(rows)))
        rates[str(alpha)] = round(hits / args.samples, 4)
    print(
        json.dumps(
            {
                "marker": MARKER,
                "samples_per_alpha": args.samples,
                "marker_rate": rates,
                "load_or_build_s": round(load_s, 1),
                "total_s": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
