"""Continuous batching: concurrent small requests against one batched request, in one app.

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_batching [--size bench] [--tokens 64]
        [--clients 8] [--repeats 2]

One in-process app (TestClient: the server's routes, engine and scheduler) on the ~30M benchmark
pair of bench_lda (random weights, greedy, `--tokens` new tokens, EOS never sampled in practice),
`--clients` prompts three ways: one `/generate_lda` request with all prompts (`prompts`: one
batch); `--clients` one-prompt requests sent at once from threads (they join one running batch at
step boundaries); the same requests one after another (what the engine did before continuous
batching: one request at a time). Prints JSON: tokens/s each way and the ratios, taken in this
process, and whether all three gave the same completions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient

from lda import LDAModelPair, Side
from tests.benchmarks.bench_lda import bench_model, bench_tokenizer, corpus

from app.main import create_app
from app.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="bench")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tokenizer = bench_tokenizer(args.size)
    after, before = bench_model(tokenizer, 0, args.size), bench_model(tokenizer, 1, args.size)
    pair = LDAModelPair(Side("bench/after", after, tokenizer), Side("bench/before", before, tokenizer))
    prompts = [" ".join(line.split()[:12]) for line in corpus()[: args.clients]]
    base = {"alpha": 1.0, "temperature": 0, "max_new_tokens": args.tokens, "apply_chat_template": False}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), queue_size=4 * args.clients, max_new_tokens_limit=4096)
        with TestClient(create_app(settings, loader=lambda s: (pair, None))) as client:
            while client.get("/ready").status_code != 200:
                time.sleep(0.1)

            def one(prompt: str) -> list[str]:
                r = client.post("/generate_lda", json={**base, "prompt": prompt})
                assert r.status_code == 200, r.text
                return [r.json()["completion"]]

            def batched() -> list[str]:
                r = client.post("/generate_lda", json={**base, "prompts": prompts})
                assert r.status_code == 200, r.text
                return [row["completion"] for row in r.json()["results"]]

            def concurrent_clients() -> list[str]:
                with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                    return [c for out in pool.map(one, prompts) for c in out]

            def sequential() -> list[str]:
                return [c for p in prompts for c in one(p)]

            one(prompts[0])  # warm-up
            results, seconds, peak_rows = {}, {}, {}
            for name, fn in (("one_request", batched), ("concurrent", concurrent_clients), ("sequential", sequential)):
                best = float("inf")
                engine = client.app.state.engine
                peak = 0
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(1) as watcher:
                        future = watcher.submit(fn)
                        while not future.done():
                            peak = max(peak, engine.batch_rows)
                            time.sleep(0.002)
                        results[name] = future.result()
                    best = min(best, time.perf_counter() - t0)
                seconds[name], peak_rows[name] = best, peak
    tokens = {name: sum(len(tokenizer(c)["input_ids"]) for c in out) for name, out in results.items()}
    rate = {name: tokens[name] / seconds[name] for name in seconds}
    print(json.dumps({
        "size": args.size, "clients": args.clients, "new_tokens": args.tokens,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "concurrent_over_one_request": round(rate["concurrent"] / rate["one_request"], 3),
        "sequential_over_one_request": round(rate["sequential"] / rate["one_request"], 3),
        "concurrent_over_sequential": round(rate["concurrent"] / rate["sequential"], 3),
        "peak_batch_rows": peak_rows,
        "same_completions": results["concurrent"] == results["one_request"] == results["sequential"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
