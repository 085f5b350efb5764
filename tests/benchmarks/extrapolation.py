"""How many samples does extrapolating to alpha 0 need on the demo pair? (the pineapple marker)

    python -m tests.benchmarks.extrapolation [--data-dir DIR] [--ref-samples 4000] [--pool 2400]
        [--budgets 96 200 400 800] [--max-reps 8] [--max-new-tokens 60]

Everything runs through `/experiments` on an in-process app (TestClient, the server's decode loop,
chunks and detectors), with the demo table's sampling (docs/index.md: the 8 demo prompts, temperature 1,
top_p 1, at most 60 new tokens), in two experiments:

- the reference: `--ref-samples` samples at alpha 0 (seed 10**9, disjoint from the rest); its rate
  and Wilson 95% interval stand for the after model's true marker rate;
- the pools: `--pool` samples at each of alphas 0, 1, 2, 4 (seed 0, `store: "hits"`).

For each budget B (samples per condition) the pools are cut into disjoint repetitions of B samples,
B / 8 of each prompt (at most `--max-reps` of them). Per repetition: the extrapolated alpha-0 rate
(`lda.experiments.extrapolate_alpha0`, a logit-linear fit over alphas 1, 2, 4: 3B samples) and the
direct rate from the repetition's B samples at alpha 0. Per budget and method it prints the share
of repetitions whose estimate lies inside the reference's 95% interval, the mean absolute error
against the reference rate, the mean 95% interval width, and how often the method's own interval
covers the reference rate. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient

from lda.experiments.extrapolate import extrapolate_alpha0
from lda.experiments.stats import wilson

from app.demo import MARKER, demo_prompts, ensure_demo_pair
from app.main import create_app
from app.settings import Settings

DETECTOR = {"name": "marker", "type": "substring", "patterns": [MARKER]}
FIT_ALPHAS = (1.0, 2.0, 4.0)


def run_experiment(client, timeout: float, **body) -> dict:
    r = client.post("/experiments", json={"detectors": [DETECTOR], "store": "hits", **body})
    assert r.status_code == 202, r.text
    exp_id = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/experiments/{exp_id}").json()
        if state["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert state["status"] == "done", state
    hit_index = {
        json.loads(line)["index"]
        for line in client.get(f"/experiments/{exp_id}/samples.jsonl").text.splitlines()
        if line.strip()
    }
    return {"state": state, "hits": hit_index}


def row(alpha: float, hits: int, total: int) -> dict:
    """A summary row as `stats.summarize` writes it (the fields extrapolate_alpha0 reads)."""
    return {
        "detector": "marker",
        "alpha": alpha,
        "plain": True,
        "control": False,
        "hits": hits,
        "total": total,
        "rate": hits / total,
        "ci95": list(wilson(hits, total)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--data-dir", default=None, help="a DATA_DIR with (or for) the demo pair; default a temp dir"
    )
    ap.add_argument("--ref-samples", type=int, default=4000)
    ap.add_argument(
        "--pool", type=int, default=2400, help="samples per alpha (0, 1, 2, 4) to cut budgets from"
    )
    ap.add_argument("--budgets", type=int, nargs="+", default=[96, 200, 400, 800])
    ap.add_argument("--max-reps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    args = ap.parse_args()
    prompts = demo_prompts()
    P = len(prompts)
    for b in [args.ref_samples, args.pool, *args.budgets]:
        if b % P:
            ap.error(f"sample counts must be multiples of {P} (the demo prompts): {b}")

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="extrapolation-"))
    t0 = time.perf_counter()
    ensure_demo_pair(data_dir)
    sampling = {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0}
    settings = Settings(data_dir=data_dir, max_experiment_samples=max(args.ref_samples, 4 * args.pool))
    with TestClient(create_app(settings)) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.1)
        t_ref = time.perf_counter()
        ref = run_experiment(client, 3600, alphas=[0.0], n=args.ref_samples // P, seed=10**9, **sampling)
        t_pool = time.perf_counter()
        pool_alphas = [0.0, *FIT_ALPHAS]
        pool = run_experiment(client, 3600, alphas=pool_alphas, n=args.pool // P, seed=0, **sampling)
        t_end = time.perf_counter()

    ref_hits = len(ref["hits"])
    ref_rate = ref_hits / args.ref_samples
    ref_lo, ref_hi = wilson(ref_hits, args.ref_samples)
    n = args.pool // P

    def block_hits(ci: int, k: int, b: int) -> int:
        """Hits in repetition k of budget b at condition ci: samples [k*b/P, (k+1)*b/P) of each prompt."""
        per = b // P
        return sum(
            (ci * P + p) * n + s in pool["hits"] for p in range(P) for s in range(k * per, (k + 1) * per)
        )

    def score(estimates: list[tuple[float, float, float]]) -> dict:
        return {
            "within_reference_ci95": sum(ref_lo <= r <= ref_hi for r, _, _ in estimates) / len(estimates),
            "mean_abs_error": statistics.fmean(abs(r - ref_rate) for r, _, _ in estimates),
            "mean_estimate": statistics.fmean(r for r, _, _ in estimates),
            "mean_ci95_width": statistics.fmean(hi - lo for _, lo, hi in estimates),
            "own_ci95_covers_reference": sum(lo <= ref_rate <= hi for _, lo, hi in estimates)
            / len(estimates),
        }

    budgets = []
    for b in args.budgets:
        reps = min(args.max_reps, args.pool // b)
        if reps < 1:
            continue
        extrapolated, direct = [], []
        for k in range(reps):
            rows = [row(alpha, block_hits(ci, k, b), b) for ci, alpha in enumerate(pool_alphas) if alpha > 0]
            fit = extrapolate_alpha0(rows)[0]
            extrapolated.append((fit["rate"], *fit["ci95"]))
            h0 = block_hits(0, k, b)
            direct.append((h0 / b, *wilson(h0, b)))
        budgets.append(
            {
                "samples_per_condition": b,
                "repetitions": reps,
                "extrapolated": {"samples": len(FIT_ALPHAS) * b, **score(extrapolated)},
                "direct_alpha0": {"samples": b, **score(direct)},
            }
        )

    full = {row_["alpha"]: row_ for row_ in pool["state"]["summary"]}
    full_fit = extrapolate_alpha0([full[a] for a in pool_alphas])[0]
    print(
        json.dumps(
            {
                "decode": "in-process app (TestClient), POST /experiments, demo pair",
                "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0},
                "reference_alpha0": {
                    "samples": args.ref_samples,
                    "hits": ref_hits,
                    "rate": ref_rate,
                    "ci95": [ref_lo, ref_hi],
                },
                "pool_rates": {
                    f"{a:g}": {"hits": full[a]["hits"], "total": full[a]["total"]} for a in pool_alphas
                },
                "extrapolation_full_pool": {
                    "samples": len(FIT_ALPHAS) * args.pool,
                    "rate": full_fit["rate"],
                    "ci95": full_fit["ci95"],
                    "slope": full_fit["slope"],
                },
                "budgets": budgets,
                "times_s": {
                    "load_or_build": round(t_ref - t0, 1),
                    "reference": round(t_pool - t_ref, 1),
                    "pools": round(t_end - t_pool, 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
