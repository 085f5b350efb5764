"""The benchmarks page's figures, drawn from the benchmark scripts' JSON committed under
tests/benchmarks/results/ (so the figures and the tables come from the same runs).

    python -m tests.benchmarks.plots [--results tests/benchmarks/results] [--out DIR]

The docs build runs `render` (docs/hooks/benchmarks.py). A figure whose results are not committed
yet is drawn as a note naming the command that makes them. To refresh the results (alone on the
machine, OMP_WAIT_POLICY=PASSIVE):

    R=tests/benchmarks/results
    python -m tests.benchmarks.bench_lda --rows 1 2 4 8 16 32 > $R/bench_lda.json
    for c in 1 2 4 8 16; do
        python -m tests.benchmarks.bench_batching --clients $c > $R/bench_batching_c$c.json
    done
    python -m tests.benchmarks.bench_experiments > $R/bench_experiments.json
    python -m tests.benchmarks.bench_batch > $R/bench_batch.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = (7.0, 4.0)
DPI = 100


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def lda_rows(result: dict[str, Any]) -> Any:
    """bench_lda: tokens/s against batch rows for LDA, the after model's `generate` and the seed
    server's one-row-at-a-time loop."""
    fig, ax = _figure()
    keys = [k for k in result if k.startswith("lda_b") and k.endswith("_tokens_per_s")]
    rows = sorted(int(k[len("lda_b") : -len("_tokens_per_s")]) for k in keys)
    for key, label, style in (("lda", "LDA (this service)", "o-"), ("seed_loop", "seed server's loop", "s--"),
                              ("generate", "after model's generate (one model)", "^:")):  # fmt: skip
        found = {r: result.get(f"{key}_b{r}_tokens_per_s") for r in rows}
        points = [(r, v) for r, v in found.items() if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(rows, [str(r) for r in rows])
    ax.set_xlabel("rows decoded together")
    ax.set_ylabel("new tokens/s (all rows)")
    where = f"{result.get('device', '?')} {result.get('dtype', '')}".strip()
    ax.set_title(f"Decode speed, {result.get('size', '?')} pair, {where}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def clients(runs: list[dict[str, Any]]) -> Any:
    """bench_batching, one run per client count: aggregate tokens/s of concurrent one-prompt
    clients, the same prompts as one request, and one after another."""
    fig, ax = _figure()
    runs = sorted(runs, key=lambda r: r["clients"])
    xs = [r["clients"] for r in runs]
    for key, label, style in (("concurrent", "concurrent clients (continuous batching)", "o-"),
                              ("one_request", "one request with every prompt", "s--"),
                              ("sequential", "one request at a time", "^:")):  # fmt: skip
        ax.plot(xs, [r["tokens_per_s"][key] for r in runs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("clients (one prompt each)")
    ax.set_ylabel("new tokens/s (all clients)")
    ax.set_title("Concurrent clients")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def experiments(result: dict[str, Any]) -> Any:
    """bench_experiments: samples/s of /experiments, /generate_lda_batch and sequential requests."""
    fig, ax = _figure()
    rates = result["throughput"]["samples_per_s"]
    labels = {"experiments": "/experiments", "generate_lda_batch": "/generate_lda_batch",
              "generate_lda_sequential": "/generate_lda, one sample per call"}  # fmt: skip
    names = [k for k in labels if k in rates]
    colours = ["#1f5fa8", "#c2410c", "#475569"][: len(names)]
    ax.bar([labels[k] for k in names], [rates[k] for k in names], color=colours)
    ax.set_ylabel("samples/s")
    ax.set_title("Experiment throughput")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def batch_workers(result: dict[str, Any]) -> Any:
    """bench_batch: samples/s of `python -m app.batch experiment` on 1 and 2 workers."""
    fig, ax = _figure()
    runs = [result["one_worker"], result["two_workers"]]
    names = [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in runs]
    ax.bar(names, [r["samples_per_s"] for r in runs], color=["#475569", "#1f5fa8"])
    ax.set_ylabel("samples/s")
    ax.set_title(f"Ray Data pipeline: {result['speedup_2_workers']}x with 2 workers")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# figure file -> (results files, a glob, how to draw them: one JSON object, or a list where the
# glob matches several runs)
FIGURES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "lda_rows.png": ("bench_lda.json", lda_rows),
    "clients.png": ("bench_batching_c*.json", clients),
    "experiments.png": ("bench_experiments.json", experiments),
    "batch_workers.png": ("bench_batch.json", batch_workers),
}


def missing(name: str) -> Any:
    fig, ax = _figure()
    ax.axis("off")
    text = f"no committed results yet:\ntests/benchmarks/results/{name}\n(see tests/benchmarks/plots.py)"
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def render(results: Path, out: Path) -> list[Path]:
    """Every figure of FIGURES as a PNG under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for figure, (pattern, draw) in FIGURES.items():
        found = [json.loads(p.read_text()) for p in sorted(results.glob(pattern))]
        if not found:
            fig = missing(pattern)
        else:
            fig = draw(found if "*" in pattern else found[0])
        path = out / figure
        fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp in the file
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=Path("benchmark-plots"))
    args = ap.parse_args()
    for path in render(args.results, args.out):
        print(path)


if __name__ == "__main__":
    main()
