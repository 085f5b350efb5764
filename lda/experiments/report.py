"""Reports from a summary (`stats.summarize`): CSV text and a PNG plot.

The plot uses matplotlib's object API on an Agg canvas, never pyplot: pyplot keeps global figure
state that is not thread-safe, and the server renders on worker threads.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "condition",
    "detector",
    "hits",
    "total",
    "rate",
    "ci95_lo",
    "ci95_hi",
    "ratio",
    "ratio_lo",
    "ratio_hi",
)
PNG_SIZE = (10.0, 5.0)  # inches; at PNG_DPI this is 1000 x 500 pixels
PNG_DPI = 100


def report_csv(summary: Sequence[Mapping[str, Any]]) -> str:
    """One CSV row per condition x detector; empty cells where a value is undefined."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in summary:
        ci = row["ci95"]
        ratio_ci = row["ratio_ci95"] or (None, None)
        writer.writerow(
            [
                row["condition"],
                row["detector"],
                row["hits"],
                row["total"],
                _num(row["rate"]),
                _num(ci[0]),
                _num(ci[1]),
                _num(row["ratio"]),
                _num(ratio_ci[0]),
                _num(ratio_ci[1]),
            ]
        )
    return out.getvalue()


def report_png(summary: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Rate per condition with Wilson 95% error bars, one line per detector; writes `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conditions = list(dict.fromkeys(row["condition"] for row in summary))
    detectors = list(dict.fromkeys(row["detector"] for row in summary))
    fig = Figure(figsize=PNG_SIZE, dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.3 / max(len(detectors), 1)
    for k, detector in enumerate(detectors):
        rows = {r["condition"]: r for r in summary if r["detector"] == detector}
        # Nudge each detector sideways so error bars of equal rates do not hide each other.
        xs, ys, lo, hi = [], [], [], []
        for i, condition in enumerate(conditions):
            row = rows.get(condition)
            if row is None or row["rate"] is None:
                continue
            xs.append(i + (k - (len(detectors) - 1) / 2) * width)
            ys.append(row["rate"])
            lo.append(max(0.0, row["rate"] - row["ci95"][0]))  # float rounding at 0 or 1 hits
            hi.append(max(0.0, row["ci95"][1] - row["rate"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=detector)
    ax.set_xticks(
        range(len(conditions)),
        conditions,
        rotation=20 if len(conditions) > 4 else 0,
        ha="right" if len(conditions) > 4 else "center",
    )
    ax.set_xlim(-0.5, len(conditions) - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("hit rate (Wilson 95% interval)")
    ax.set_xlabel("condition")
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="detector")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
