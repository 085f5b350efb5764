"""The benchmarks page's figures, drawn from the benchmark scripts' JSON committed under
tests/benchmarks/results/ (so the figures and the tables come from the same runs).

    python -m tests.benchmarks.plots [--results tests/benchmarks/results] [--out DIR]

The docs build runs `render` (docs/hooks/benchmarks.py). A figure whose results are not committed
yet is drawn as a note naming the command that makes them. To refresh the results (alone on the
machine, OMP_WAIT_POLICY=PASSIVE):

    R=tests/benchmarks/results
    python -m tests.benchmarks.bench_lda --rows 1 8 64 > $R/bench_lda.json
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
    series = (("lda_compiled", "LDA, static cache + compiled step (COMPILE=on)", "D-"),
              ("lda", "LDA (this service, eager)", "o-"), ("seed_loop", "seed server's loop", "s--"),
              ("generate", "after model's generate (one model)", "^:"))  # fmt: skip
    for key, label, style in series:
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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lda_rows_table(result: dict[str, Any]) -> str:
    keys = [k for k in result if k.startswith("lda_b") and k.endswith("_tokens_per_s")]
    rows = sorted(int(k[len("lda_b") : -len("_tokens_per_s")]) for k in keys)

    def get(key: str, r: int) -> Any:
        return result.get(f"{key}_b{r}_tokens_per_s", "")

    def ratio(name: str) -> str:
        value = result.get(name)
        return "" if value is None else f"{value}x"

    def fraction(r: int) -> str:
        eager = result.get(f"lda_b{r}_fraction_of_limit")
        compiled = result.get(f"lda_compiled_b{r}_fraction_of_limit")
        return " -> ".join(str(v) for v in (eager, compiled) if v is not None)

    def same(r: int) -> str:
        value = result.get(f"lda_compiled_b{r}_same_tokens")
        return "" if value is None else ("yes" if value else "no")

    body = [
        [r, get("lda", r), get("lda_compiled", r), get("seed_loop", r), get("generate", r),
         ratio(f"lda_compiled_b{r}_over_lda_b{r}"), ratio(f"lda_compiled_b{r}_over_seed_loop_b{r}"),
         ratio(f"lda_b{r}_over_seed_loop_b{r}"), fraction(r), same(r)]
        for r in rows
    ]  # fmt: skip
    header = ["rows", "LDA tokens/s (eager)", "LDA compiled tokens/s", "seed loop tokens/s",
              "generate tokens/s (one model)", "compiled / eager", "compiled / seed loop",
              "eager / seed loop", "fraction of the bandwidth limit (eager -> compiled)",
              "compiled: same tokens"]  # fmt: skip
    millions = result.get("parameters_per_model", 0) / 1e6
    where = (
        f"{result.get('device', '?')}, {result.get('dtype', '?')}, {result.get('threads', '?')} threads, "
        f"torch {result.get('torch', '?')}"
    )
    same_seed = "yes" if result.get("seed_loop_same_tokens_as_lda_b1") else "no"
    limit = ""
    if "read_gb_per_s" in result:
        limit = (
            f" Bandwidth limit: {result['read_gb_per_s']} GB/s read (a matrix-vector product, this process) "
            f"over {result['decode_bytes_per_token'] / 1e6:.1f} MB of weights per step = "
            f"{result['limit_b1_tokens_per_s']} tokens/s at 1 row, R times that at R rows."
        )
    if "compile_s" in result:
        limit += f" First step of each compiled shape (compile included), s: {result['compile_s']}."
    return (
        f"{_table(header, body)}\n\n{result.get('size', '?')} pair ({millions:.1f}M parameters a model), "
        f"{result.get('prompt_tokens', '?')}-token prompt, {result.get('new_tokens', '?')} new tokens, "
        f"{where}. LDA {result.get('lda_rows_over_lda_b1', '?')}x from 1 to {rows[-1] if rows else '?'} "
        f"rows; the seed loop gave the same tokens as LDA at 1 row: {same_seed}.{limit}"
    )


def clients_table(runs: list[dict[str, Any]]) -> str:
    runs = sorted(runs, key=lambda r: r["clients"])
    body = [
        [r["clients"], r["tokens_per_s"]["concurrent"], r["tokens_per_s"]["one_request"],
         r["tokens_per_s"]["sequential"], f"{r['concurrent_over_one_request']}x",
         f"{r['concurrent_over_sequential']}x", r["peak_batch_rows"]["concurrent"],
         "yes" if r["same_completions"] else "no"]
        for r in runs
    ]  # fmt: skip
    return _table(["clients", "concurrent tokens/s", "one request tokens/s", "one at a time tokens/s",
                   "concurrent / one request", "concurrent / one at a time", "peak batch rows",
                   "same completions"], body)  # fmt: skip


def experiments_table(result: dict[str, Any]) -> str:
    t = result["throughput"]
    rates, same = t["samples_per_s"], t["same_completions"]
    body = [
        ["`/experiments`", rates["experiments"], ""],
        ["`/generate_lda_batch`", rates["generate_lda_batch"],
         f"experiments {t['experiments_over_batch']}x of it"],
        [f"`/generate_lda`, one sample per call (first {t['sequential_samples']} samples)",
         rates["generate_lda_sequential"], f"experiments {t['experiments_over_sequential']}x of it"],
    ]  # fmt: skip
    table = _table(["route", "samples/s", "ratio"], body)
    memory = result.get("memory", {})
    sizes = memory.get("by_samples", {})
    growth = ", ".join(f"{int(n):,} samples: {m['peak_rss_growth_mb']} MB" for n, m in sizes.items())
    return (
        f"{table}\n\n{t['samples']} samples; the same completions from the batch route: "
        f"{'yes' if same['batch'] else 'no'}, from the sequential calls: "
        f"{'yes' if same['sequential'] else 'no'}. "
        f"Peak resident memory growth ({memory.get('max_new_tokens', '?')} new tokens, chunks of "
        f"{memory.get('chunk_size', '?')}): {growth or 'not measured'}."
    )


def batch_workers_table(result: dict[str, Any]) -> str:
    body = [
        [f"{r['workers']}", r["samples"], r["samples_per_s"], r["startup_s"], r["actor_peak_rss_mb"]]
        for r in (result["one_worker"], result["two_workers"], result["two_workers_grown"])
    ]
    table = _table(["workers", "samples", "samples/s", "start before the first block (s)",
                    "actor peak RSS (MB)"], body)  # fmt: skip
    return (
        f"{table}\n\n2 workers over 1: {result['speedup_2_workers']}x; an actor's peak resident memory "
        f"at 3x the samples: {result['worker_rss_growth_3x']}x."
    )


# table marker -> (results files, how to write them as Markdown)
TABLES: dict[str, tuple[str, Callable[[Any], str]]] = {
    "lda_rows": ("bench_lda.json", lda_rows_table),
    "clients": ("bench_batching_c*.json", clients_table),
    "experiments": ("bench_experiments.json", experiments_table),
    "batch_workers": ("bench_batch.json", batch_workers_table),
}


def table(name: str, results: Path = RESULTS) -> str:
    """The Markdown table `name` of TABLES from the committed results (a note when there are none)."""
    pattern, write = TABLES[name]
    found = [json.loads(p.read_text()) for p in sorted(results.glob(pattern))]
    if not found:
        return f"*No committed results yet: `tests/benchmarks/results/{pattern}`.*"
    return write(found if "*" in pattern else found[0])


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
