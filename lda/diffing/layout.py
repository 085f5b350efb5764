"""The toolkit's `diff_mining` run folder, written from our orderings.

    run_dir/
      run_metadata.json
      {dataset}_global_token_stats.json
      {dataset}_sequence_likelihood_ratios.json      (when given)
      {type_dir}/metadata.json
      {type_dir}/{dataset}/orderings.json, {ordering_id}.json, {ordering_id}_scatter.png, _bar.png

Keeping its names and keys lets its viewer, agents and analysis notebooks read our runs as theirs.
Plots draw on `matplotlib.figure.Figure` (Agg, no pyplot state), so threads can write runs at once.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import font_manager
from matplotlib.figure import Figure

from lda.diffing.orderings import Ordering, OrderingResult
from lda.diffing.stats import TokenStats

SCATTER_LABELS = 20  # top tokens named on the scatter plot, as the toolkit
BAR_TOKENS = 30  # bars on the bar chart
# DejaVu ships with matplotlib; CJK and other fonts join as glyph fallbacks where installed (naming a
# missing family would log a findfont line per label).
_INSTALLED = {f.name for f in font_manager.fontManager.ttflist}
FONTS = ["DejaVu Sans"] + [
    f for f in ("Noto Sans", "Noto Sans CJK JP", "Arial Unicode MS") if f in _INSTALLED
]
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same run zips to the same bytes


def nmf_dir_name(
    num_topics: int,
    top_n: int,
    mode: str,
    beta: float,
    orthogonal: bool = False,
    orthogonal_weight: float = 1000.0,
) -> str:
    """The toolkit's NMF folder name (`_ordering_dir_name`).

    With its default config: `nmf_topics3_topn200_mode_logit_diff_magnitude_beta2p0_orthfalse_w1000p0`.
    It names the configured orthogonal weight even when orthogonality is off (its default 1000.0).
    """
    beta_str = str(float(beta)).replace(".", "p")
    w_str = str(float(orthogonal_weight)).replace(".", "p")
    orth = "true" if orthogonal else "false"
    return f"nmf_topics{num_topics}_topn{top_n}_mode_{mode}_beta{beta_str}_orth{orth}_w{w_str}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def global_token_stats(dataset: str, stats: TokenStats, tokenizer: Any) -> dict[str, Any]:
    """Every token's sum of diffs and positive count (`{dataset}_global_token_stats.json`)."""
    ids = list(range(stats.vocab_size))
    names = tokenizer.convert_ids_to_tokens(ids)
    sums, positives = stats.sum_logit_diff.tolist(), stats.count_positive.tolist()
    return {
        "dataset_name": dataset,
        "num_samples": stats.num_samples,
        "total_positions_analyzed": stats.total_positions,
        "num_unique_tokens": stats.vocab_size,
        "global_token_stats": [
            {"token": name, "token_id": i, "sum_logit_diff": s, "count_positive": c}
            for i, name, s, c in zip(ids, names, sums, positives, strict=True)
        ],
    }


def _check_name(name: str, what: str) -> None:
    """A name becomes a path component; one with a separator could write outside the run."""
    if not name or name in {".", ".."} or "/" in name or (os.altsep and os.altsep in name) or os.sep in name:
        raise ValueError(f"{what} must be a plain file name, got {name!r}")


def write_run(
    run_dir: Path | str,
    dataset: str,
    stats: TokenStats,
    tokenizer: Any,
    results: Sequence[OrderingResult],
    metadata: dict[str, Any],
    nmf_dirname: str | None = None,
    llr: dict[str, Any] | None = None,
    *,
    dpi: int = 100,
) -> Path:
    """Write one dataset's results into `run_dir` (created if missing); returns `run_dir`.

    Args:
        run_dir: the run folder.
        dataset: the dataset's name, used in file and folder names.
        stats: the dataset's statistics (the global token stats file).
        tokenizer: names every token id (`convert_ids_to_tokens`).
        results: ordering types' results; one without orderings is skipped, as the toolkit does.
        metadata: written as `run_metadata.json`.
        nmf_dirname: folder for the `nmf` result (see `nmf_dir_name`); unset, it is `nmf`.
        llr: the sequence likelihood ratios, when computed.
        dpi: plot resolution.
    """
    _check_name(dataset, "dataset")
    run_dir = Path(run_dir)
    write_json(run_dir / "run_metadata.json", metadata)
    write_json(run_dir / f"{dataset}_global_token_stats.json", global_token_stats(dataset, stats, tokenizer))
    if llr is not None:
        write_json(run_dir / f"{dataset}_sequence_likelihood_ratios.json", llr)
    for result in results:
        if not result.orderings:
            continue
        type_dir = result.ordering_type_id
        if result.ordering_type_id == "nmf" and nmf_dirname:
            type_dir = nmf_dirname
        _check_name(type_dir, "ordering type folder")
        write_ordering_type(run_dir / type_dir, dataset, result, dpi)
    return run_dir


def write_ordering_type(type_dir: Path, dataset: str, result: OrderingResult, dpi: int = 100) -> None:
    """metadata.json, then the dataset's index, one JSON per ordering and its two plots."""
    write_json(
        type_dir / "metadata.json",
        {
            "ordering_type_id": result.ordering_type_id,
            "display_name": result.display_name,
            "x_axis_label": result.x_axis_label,
            "y_axis_label": result.y_axis_label,
            **result.type_metadata,
        },
    )
    dataset_dir = type_dir / dataset
    index = [
        {
            "ordering_id": o.ordering_id,
            "display_label": o.display_label,
            "path": f"{o.ordering_id}.json",
            "num_tokens": len(o.tokens),
        }
        for o in result.orderings
    ]
    write_json(dataset_dir / "orderings.json", {"dataset_name": dataset, "orderings": index})
    for ordering in result.orderings:
        _check_name(ordering.ordering_id, "ordering_id")
        write_json(dataset_dir / f"{ordering.ordering_id}.json", ordering_json(ordering))
        if ordering.tokens:  # the toolkit draws nothing for an empty ordering
            plot_scatter(
                ordering,
                result.x_axis_label,
                result.y_axis_label,
                dataset_dir / f"{ordering.ordering_id}_scatter.png",
                dpi,
            )
            plot_bar(ordering, result.x_axis_label, dataset_dir / f"{ordering.ordering_id}_bar.png", dpi)


def ordering_json(ordering: Ordering) -> dict[str, Any]:
    tokens = [
        {
            "token_id": t.token_id,
            "token_str": t.token_str,
            "ordering_value": t.ordering_value,
            "avg_logit_diff": t.avg_logit_diff,
            "count_positive": t.count_positive,
            "count_negative": t.count_negative,
            **t.extra,
        }
        for t in ordering.tokens
    ]
    return {
        "ordering_id": ordering.ordering_id,
        "display_label": ordering.display_label,
        "tokens": tokens,
        **ordering.metadata,
    }


def _label(token: str, width: int) -> str:
    """Printable, short, and with `$` escaped (matplotlib would parse `$...$` as mathtext and can fail)."""
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    if len(token) > width:
        token = token[: width - 3] + "..."
    return token.replace("$", r"\$")


def plot_scatter(ordering: Ordering, x_label: str, y_label: str, path: Path, dpi: int = 100) -> None:
    """Ordering value (x) against average logit diff (y), the top tokens named."""
    fig = Figure(figsize=(12, 9), dpi=dpi)
    ax = fig.add_subplot()
    ax.scatter(
        [t.ordering_value for t in ordering.tokens],
        [t.avg_logit_diff for t in ordering.tokens],
        alpha=0.6,
        s=30,
        c="steelblue",
        edgecolors="none",
    )
    for t in ordering.tokens[:SCATTER_LABELS]:
        ax.annotate(
            _label(t.token_str, 15),
            (t.ordering_value, t.avg_logit_diff),
            xytext=(5, 5),
            textcoords="offset points",
            fontsize=7,
            family=FONTS,
            alpha=0.8,
        )
    ax.set_xlabel(x_label, fontsize=10)
    ax.set_ylabel(y_label, fontsize=10)
    ax.set_title(ordering.display_label, fontsize=12)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


def plot_bar(ordering: Ordering, x_label: str, path: Path, dpi: int = 100) -> None:
    """The top tokens' ordering values as horizontal bars, green where the average diff is positive."""
    top = ordering.tokens[:BAR_TOKENS][::-1]  # reversed so the first token is drawn at the top
    fig = Figure(figsize=(14, 10), dpi=dpi)
    ax = fig.add_subplot()
    positions = list(range(len(top)))
    colors = ["forestgreen" if t.avg_logit_diff > 0 else "crimson" for t in top]
    ax.barh(positions, [t.ordering_value for t in top], color=colors, alpha=0.8, height=0.7)
    ax.set_yticks(positions, labels=[_label(t.token_str, 20) for t in top], fontsize=9, family=FONTS)
    ax.set_xlabel(x_label, fontsize=10)
    ax.set_title(f"{ordering.display_label} - Top {len(top)} Tokens", fontsize=12)
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


def zip_dir(run_dir: Path | str, zip_path: Path | str) -> Path:
    """Zip every file under `run_dir` (paths relative to it, sorted, fixed times); returns `zip_path`.

    Written beside the target and renamed into place, so a reader never sees half a zip.
    """
    run_dir, zip_path = Path(run_dir).resolve(), Path(zip_path).resolve()
    if zip_path.is_relative_to(run_dir):
        raise ValueError(f"zip_path must lie outside the folder it zips, got {zip_path} inside {run_dir}")
    files = sorted((p.relative_to(run_dir).as_posix(), p) for p in run_dir.rglob("*") if p.is_file())
    partial = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(path, "rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(partial, zip_path)
    return zip_path
