"""`/experiments` throughput against the other routes, and its memory at two sizes, on the demo pair.

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_experiments [--quick] [--data-dir DIR]
        [--prompts 200] [--max-new-tokens 60] [--batch 100] [--sequential 100]
        [--memory-sizes 1000 10000] [--memory-tokens 4]

One in-process app (TestClient: the server's routes, engine and decode loop; no network), the demo
pair, the demo prompts cycled to `--prompts` prompts, alphas 0 and 2, temperature 1, top_p 1:

- throughput, samples/s for the same prompts x alphas x `--max-new-tokens` three ways: one
  experiment (n=1, seed 0, `store: "all"`); `/generate_lda_batch` in batches of `--batch` prompts;
  plain sequential `/generate_lda` calls, one sample each (the first `--sequential` samples, in
  the experiment's order: about 1 s each on 2 CPU cores, so a subset gives the rate). The seeds are the experiment's (sample (c, p) uses c * prompts + p), so
  all three decode the same samples; the marker hit counts over the common samples are printed
  as a check. Ratios are taken in this process, as the absolute rates vary with machine load;
- memory: peak resident-set growth of the process (sampled every 10 ms from /proc through psutil,
  over the RSS just before submitting) during an experiment of each of `--memory-sizes` samples
  (8 demo prompts x alphas 0 and 2 x n, `--memory-tokens` new tokens: memory, not speed, is what
  is compared). Chunks of EXPERIMENT_CHUNK_SIZE samples bound it, so the sizes should cost about
  the same. A 200-sample experiment runs first so one-time allocations are not charged to either.

`--quick` shrinks everything (40 prompts, 20 sequential calls, 500 and 5,000 memory samples, 2
tokens) to check that the script works. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
from fastapi.testclient import TestClient

from app.demo import MARKER, demo_prompts, ensure_demo_pair
from app.main import create_app
from app.settings import Settings

ALPHAS = (0.0, 2.0)
DETECTOR = {"name": "marker", "type": "substring", "patterns": [MARKER]}


class PeakRSS:
    """Peak RSS of this process while the block runs, sampled by a thread every `interval` s."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.proc = interval, psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def run_experiment(client, **body) -> dict:
    r = client.post("/experiments", json={"detectors": [DETECTOR], **body})
    assert r.status_code == 202, r.text
    exp_id = r.json()["id"]
    while True:
        state = client.get(f"/experiments/{exp_id}").json()
        if state["status"] in ("done", "failed", "cancelled"):
            assert state["status"] == "done", state
            return {**state, "id": exp_id}
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script works")
    ap.add_argument(
        "--data-dir", default=None, help="a DATA_DIR with (or for) the demo pair; default a temp dir"
    )
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--batch", type=int, default=100, help="prompts per /generate_lda_batch request")
    ap.add_argument(
        "--sequential", type=int, default=100, help="sequential /generate_lda calls (at most all samples)"
    )
    ap.add_argument(
        "--chunk-size", type=int, default=None, help="EXPERIMENT_CHUNK_SIZE (default: the server's)"
    )
    ap.add_argument("--memory-sizes", type=int, nargs=2, default=[1000, 10000])
    ap.add_argument("--memory-tokens", type=int, default=4)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.sequential, args.memory_sizes, args.memory_tokens = 40, 20, [500, 5000], 2
    total = args.prompts * len(ALPHAS)
    sequential = min(total, args.sequential)

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench-experiments-"))
    t0 = time.perf_counter()
    ensure_demo_pair(data_dir)
    base = demo_prompts()
    prompts = [base[i % len(base)] for i in range(args.prompts)]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0}
    cap = max(total, *args.memory_sizes)
    chunk = {} if args.chunk_size is None else {"experiment_chunk_size": args.chunk_size}
    settings = Settings(data_dir=data_dir, max_experiment_samples=cap, **chunk)
    out: dict = {"quick": args.quick, "prompts": args.prompts, "alphas": list(ALPHAS), **sampling}
    with TestClient(create_app(settings)) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.1)
        out["load_or_build_s"] = round(time.perf_counter() - t0, 1)
        # one short decode of each kind first: lazy initialisation is not charged to any route
        run_experiment(client, prompts=base[:2], alphas=list(ALPHAS), n=1, seed=0, max_new_tokens=2)
        client.post("/generate_lda", json={"prompt": base[0], "alpha": 2.0, "max_new_tokens": 2, "seed": 0})

        t = time.perf_counter()
        state = run_experiment(client, prompts=prompts, alphas=list(ALPHAS), n=1, seed=0, **sampling)
        exp_s = time.perf_counter() - t
        exp_id = state["id"]
        exp_text = [
            json.loads(line)["completion"]
            for line in client.get(f"/experiments/{exp_id}/samples.jsonl").text.splitlines()
            if line.strip()
        ]

        t = time.perf_counter()
        batch_text = []
        for c, alpha in enumerate(ALPHAS):
            for start in range(0, args.prompts, args.batch):
                body = {"prompts": prompts[start : start + args.batch], "alpha": alpha, **sampling}
                r = client.post("/generate_lda_batch", json={**body, "seed": c * args.prompts + start})
                assert r.status_code == 200, r.text
                batch_text += [res["completion"] for res in r.json()["results"]]
        batch_s = time.perf_counter() - t

        t = time.perf_counter()
        seq_text = []
        for i in range(sequential):
            c, p = divmod(i, args.prompts)
            body = {"prompt": prompts[p], "alpha": ALPHAS[c], "seed": i, **sampling}
            r = client.post("/generate_lda", json=body)
            assert r.status_code == 200, r.text
            seq_text.append(r.json()["completion"])
        seq_s = time.perf_counter() - t

        rates = {
            "experiments": total / exp_s,
            "generate_lda_batch": total / batch_s,
            "generate_lda_sequential": sequential / seq_s,
        }
        out["throughput"] = {
            "samples": total,
            "sequential_samples": sequential,
            "seconds": {
                "experiments": round(exp_s, 2),
                "generate_lda_batch": round(batch_s, 2),
                "generate_lda_sequential": round(seq_s, 2),
            },
            "samples_per_s": {k: round(v, 2) for k, v in rates.items()},
            "experiments_over_batch": round(rates["experiments"] / rates["generate_lda_batch"], 2),
            "experiments_over_sequential": round(rates["experiments"] / rates["generate_lda_sequential"], 2),
            "batch_over_sequential": round(rates["generate_lda_batch"] / rates["generate_lda_sequential"], 2),
            "marker_hits": {
                "experiments": sum(MARKER in s for s in exp_text),
                "generate_lda_batch": sum(MARKER in s for s in batch_text),
                f"experiments_first_{sequential}": sum(MARKER in s for s in exp_text[:sequential]),
                "generate_lda_sequential": sum(MARKER in s for s in seq_text),
            },
            "same_completions": {
                "batch": batch_text == exp_text,
                "sequential": seq_text == exp_text[:sequential],
            },
        }

        run_experiment(
            client,
            prompts=base,
            alphas=list(ALPHAS),
            n=200 // (len(base) * len(ALPHAS)) or 1,
            seed=1,
            max_new_tokens=args.memory_tokens,
            temperature=1.0,
            top_p=1.0,
        )  # warm-up
        memory = {}
        for size in args.memory_sizes:
            n = max(1, size // (len(base) * len(ALPHAS)))
            with PeakRSS() as peak:
                t = time.perf_counter()
                run_experiment(
                    client,
                    prompts=base,
                    alphas=list(ALPHAS),
                    n=n,
                    seed=2,
                    max_new_tokens=args.memory_tokens,
                    temperature=1.0,
                    top_p=1.0,
                )
                secs = time.perf_counter() - t
            memory[str(n * len(base) * len(ALPHAS))] = {
                "peak_rss_growth_mb": peak.growth_mb,
                "rss_before_mb": round(peak.start / 2**20, 1),
                "seconds": round(secs, 1),
            }
        sizes = list(memory)
        out["memory"] = {
            "max_new_tokens": args.memory_tokens,
            "chunk_size": settings.experiment_chunk_size,
            "by_samples": memory,
            "large_over_small_growth_mb": round(
                memory[sizes[1]]["peak_rss_growth_mb"] - memory[sizes[0]]["peak_rss_growth_mb"], 1
            ),
        }
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
