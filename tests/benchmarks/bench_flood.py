"""A flood of prefills against a decoding stream: how long the running rows wait (MAX_PREFILL_TOKENS).

    OMP_WAIT_POLICY=PASSIVE python -m tests.benchmarks.bench_flood [--size bench] [--flood 48]
        [--prompt-words 120] [--budgets 1000000000,8192,4096,2048]

One in-process app per budget (TestClient), on the ~30M benchmark pair of bench_lda (random
weights, greedy). A streamed `/generate_lda` request decodes 96 tokens; once it has streamed 8,
`--flood` requests with long prompts (`--prompt-words` pseudo-words each, 4 new tokens) arrive at
once. Prints JSON per `MAX_PREFILL_TOKENS` budget: the stream's longest and median gap between two
tokens while the flood is prefilled, the time until every flood request answered, and whether the
stream's text is the same as when it ran alone; plus the longest gap's ratio against the first
budget (the first is meant as "no budget"), taken in this process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient

from lda import LDAModelPair, Side
from tests.benchmarks.bench_lda import bench_model, bench_tokenizer, corpus

from app.main import create_app
from app.settings import Settings

STREAM = {"prompt": "the quick brown fox", "alpha": 1.0, "temperature": 0, "max_new_tokens": 96,
          "apply_chat_template": False, "stream": True}  # fmt: skip


def run(pair: LDAModelPair, budget: int, flood: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), queue_size=4 * len(flood), max_prefill_tokens=budget)
        with TestClient(create_app(settings, loader=lambda s: (pair, None))) as client:
            while client.get("/ready").status_code != 200:
                time.sleep(0.1)

            def one(prompt: str) -> float:
                r = client.post("/generate_lda", json={"prompt": prompt, "alpha": 1.0, "temperature": 0,
                                                        "max_new_tokens": 4, "apply_chat_template": False})  # fmt: skip
                assert r.status_code == 200, r.text
                return time.perf_counter()

            one(flood[0])  # warm-up
            stamps, text = [], []
            with concurrent.futures.ThreadPoolExecutor(len(flood)) as pool:
                futures = []
                with client.stream("POST", "/generate_lda", json=STREAM) as r:
                    event = None
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "token":
                            stamps.append(time.perf_counter())
                            text.append(json.loads(line[6:])["text"])
                            if len(stamps) == 8:
                                t_flood = time.perf_counter()
                                futures = [pool.submit(one, p) for p in flood]
                flood_done = max(f.result() for f in futures) - t_flood
    # Gaps that overlap the flood: the first ends with the step after the flood's first admission.
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b > t_flood and a < t_flood + flood_done]
    return {
        "max_prefill_tokens": budget,
        "stream_longest_gap_s": round(max(during, default=float("nan")), 3),
        "stream_median_gap_s": round(statistics.median(during), 4) if during else None,
        "flood_answered_s": round(flood_done, 2),
        "text": "".join(text),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="bench")
    ap.add_argument("--flood", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--budgets", default="1000000000,8192,4096,2048")
    args = ap.parse_args()
    tokenizer = bench_tokenizer(args.size)
    after, before = bench_model(tokenizer, 0, args.size), bench_model(tokenizer, 1, args.size)
    pair = LDAModelPair(Side("bench/after", after, tokenizer), Side("bench/before", before, tokenizer))
    words = " ".join(corpus()).split()
    flood = [" ".join(words[i * args.prompt_words : (i + 1) * args.prompt_words]) for i in range(args.flood)]
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in flood)
    results = [run(pair, int(b), flood) for b in args.budgets.split(",")]
    same = len({r.pop("text") for r in results}) == 1
    first = results[0]["stream_longest_gap_s"]
    for r in results:
        r["longest_gap_over_first"] = round(r["stream_longest_gap_s"] / first, 3)
    print(json.dumps({"size": args.size, "flood_requests": args.flood, "flood_prompt_tokens": prompt_tokens,
                      "runs": results, "same_stream_text": same}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
