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


def arm(row: Mapping[str, Any]) -> str:
    """The series a summary row belongs to: its condition's label without the alpha ("LDA" for
    plain alphas; "control", "adapter=x", "amp=y", "steer=... strength=s" for the others)."""
    head = str(row["condition"]).rpartition("alpha=")[0].strip()
    return head or "LDA"


def plot_series(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What the report plots: one series per arm and detector, in the summary's order, its points
    (alpha, rate, Wilson 95% interval, condition) sorted by alpha; rows without samples left out.
    A line joins the points of one series only, so a control is never drawn as the next alpha."""
    series: dict[tuple[str, str], dict[str, Any]] = {}
    for row in summary:
        name = arm(row)
        entry = series.setdefault(
            (name, row["detector"]),
            {"arm": name, "detector": row["detector"], "control": bool(row.get("control")), "points": []},
        )
        if row["rate"] is None:
            continue
        lo, hi = row["ci95"]
        entry["points"].append(
            {"alpha": float(row["alpha"]), "rate": row["rate"], "lo": lo, "hi": hi, "condition": row["condition"]}
        )
    for entry in series.values():
        entry["points"].sort(key=lambda point: point["alpha"])
    return list(series.values())


def report_figure(summary: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """The report's matplotlib Figure: hit rate against alpha (a numeric axis), one line with
    Wilson 95% error bars per `plot_series` entry, the null control dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PNG_SIZE, dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = [s for s in plot_series(summary) if s["points"]]
    alphas = sorted({p["alpha"] for s in series for p in s["points"]})
    span = (alphas[-1] - alphas[0]) if len(alphas) > 1 else 1.0
    for k, entry in enumerate(series):
        # Nudge each series sideways so error bars of equal rates at one alpha do not hide each other.
        nudge = (k - (len(series) - 1) / 2) * 0.008 * span
        points = entry["points"]
        below = [max(0.0, p["rate"] - p["lo"]) for p in points]  # max: float rounding at 0 or 1 hits
        above = [max(0.0, p["hi"] - p["rate"]) for p in points]
        ax.errorbar(
            [p["alpha"] + nudge for p in points],
            [p["rate"] for p in points],
            yerr=[below, above],
            marker="s" if entry["control"] else "o",
            linestyle="--" if entry["control"] else "-",
            capsize=4,
            clip_on=False,  # a rate of 0 sits on the axis: draw its whole marker, not half
            label=f"{entry['arm']} · {entry['detector']}",
        )
    if alphas:
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
        ax.set_xlim(alphas[0] - 0.08 * span, alphas[-1] + 0.08 * span)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("hit rate (Wilson 95% interval)")
    ax.set_xlabel("alpha")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(title="arm · detector", fontsize="small")
    fig.tight_layout()
    return fig


def report_png(summary: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """`report_figure` written to `path` as a PNG."""
    path = Path(path)
    report_figure(summary, title).savefig(path, format="png")
    return path


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
