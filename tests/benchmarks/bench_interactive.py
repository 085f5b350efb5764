"""Time to first token of interactive requests while a 1,000-sample experiment runs (demo pair).

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_interactive [--requests 10] [--samples 1008]

One in-process app (TestClient). Streams `--requests` `/generate_lda` requests one after another
(24 new tokens, seeded sampling) and measures each one's time to its first `token` event and to its
`result`: first with the engine idle, then while an experiment of `--samples` samples (8 demo
prompts x alphas 0 and 2 x n, 40 new tokens) runs in the background. Prints JSON with medians and
the ratios busy / idle, taken in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient

from app.demo import demo_prompts
from app.main import create_app
from app.settings import Settings

REQUEST = {"prompt": "Tell me about the sun.", "alpha": 2.0, "max_new_tokens": 24, "temperature": 1.0,
           "seed": 1, "stream": True}  # fmt: skip


def timed(client: TestClient) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/generate_lda", json=REQUEST) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("event: token"):
                first = time.perf_counter() - t0
    return first if first is not None else float("nan"), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1008)
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    args = ap.parse_args()
    prompts = demo_prompts()
    n = max(1, args.samples // (2 * len(prompts)))
    with TestClient(create_app(Settings(data_dir=args.data_dir))) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.1)
        timed(client)  # warm-up
        idle = [timed(client) for _ in range(args.requests)]
        r = client.post("/experiments", json={"prompts": prompts, "alphas": [0, 2], "n": n, "max_new_tokens": 40,
                                               "temperature": 1.0, "seed": 0,
                                               "detectors": [{"name": "m", "type": "substring", "patterns": ["pineapple"]}]})  # fmt: skip
        exp_id = r.json()["id"]
        while client.get(f"/experiments/{exp_id}").json()["progress"]["done"] == 0:
            time.sleep(0.05)
        busy = [timed(client) for _ in range(args.requests)]
        state = client.get(f"/experiments/{exp_id}").json()
        client.delete(f"/experiments/{exp_id}")

    def med(values: list[tuple[float, float]], k: int) -> float:
        return round(statistics.median(v[k] for v in values), 3)

    print(json.dumps({
        "experiment_samples": 2 * len(prompts) * n,
        "experiment_done_when_measured": state["progress"]["done"],
        "idle": {"ttft_s": med(idle, 0), "total_s": med(idle, 1)},
        "during_experiment": {"ttft_s": med(busy, 0), "total_s": med(busy, 1)},
        "ttft_busy_over_idle": round(med(busy, 0) / med(idle, 0), 2),
        "total_busy_over_idle": round(med(busy, 1) / med(idle, 1), 2),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
