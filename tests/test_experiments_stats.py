"""Wilson intervals, rate ratios, summaries, the control flag, and the CSV / PNG reports."""

from __future__ import annotations

import csv
import io
import math

import pytest
from PIL import Image

from lda.experiments import (
    ExperimentSpec,
    control_flag,
    extrapolate_alpha0,
    rate_ratio,
    report_csv,
    report_png,
    summarize,
    tally,
    two_proportion_p,
    wilson,
)
from lda.experiments.report import PNG_DPI, PNG_SIZE


@pytest.mark.parametrize(
    ("hits", "total", "expected"),
    [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)), (1, 100, (0.0018, 0.0545))],
)
def test_wilson_known_values(hits, total, expected):
    lo, hi = wilson(hits, total, z=1.96)
    assert lo == pytest.approx(expected[0], abs=1e-4) and hi == pytest.approx(expected[1], abs=1e-4)
    assert 0.0 <= lo <= hits / total <= hi <= 1.0


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 37)[0] == 0.0 and wilson(37, 37)[1] == 1.0  # exactly, not 1e-17 off
    with pytest.raises(ValueError, match="hits=11 total=10"):
        wilson(11, 10)


def test_rate_ratio_katz():
    ratio, lo, hi = rate_ratio(20, 100, 10, 100)
    se = math.sqrt(1 / 20 - 1 / 100 + 1 / 10 - 1 / 100)
    assert ratio == pytest.approx(2.0)
    assert lo == pytest.approx(2.0 * math.exp(-1.959964 * se), rel=1e-6)
    assert hi == pytest.approx(2.0 * math.exp(1.959964 * se), rel=1e-6)
    assert (lo, hi) == pytest.approx((0.9865, 4.0547), abs=1e-3)


def test_rate_ratio_zero_counts_use_the_half_correction():
    ratio, lo, hi = rate_ratio(0, 10, 5, 10)
    assert ratio == pytest.approx((0.5 / 11) / (5.5 / 11))
    assert 0 < lo < ratio < hi and math.isfinite(hi)
    assert rate_ratio(0, 10, 0, 10)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n1=0"):
        rate_ratio(0, 0, 1, 10)


def test_two_proportion_p():
    assert two_proportion_p(5, 100, 5, 100) == pytest.approx(1.0)
    assert two_proportion_p(0, 50, 0, 50) == 1.0
    # 30/100 vs 10/100: z = 0.2 / sqrt(0.2 * 0.8 * 0.02) = 3.536, p = 0.000407
    assert two_proportion_p(30, 100, 10, 100) == pytest.approx(4.07e-4, rel=1e-2)


def spec():
    return ExperimentSpec.from_dict(
        {
            "prompts": ["p"],
            "conditions": [0, 2, {"alpha": 0, "control": True}, {"alpha": 4, "control": True}],
            "n": 100,
            "detectors": [
                {"name": "m", "type": "substring", "patterns": ["M"]},
                {"name": "x", "type": "regex", "pattern": "x"},
            ],
        }
    )


def records(condition, hits_m, total):
    return [{"condition": condition, "hits": ["m"] if i < hits_m else []} for i in range(total)]


def test_tally_and_summarize():
    s = spec()
    counts, totals = tally(
        records("alpha=0", 5, 100) + records("alpha=2", 20, 100) + records("control alpha=0", 3, 50)
    )
    rows = summarize(counts, totals, s)
    assert [(r["condition"], r["detector"]) for r in rows][:4] == [
        ("alpha=0", "m"),
        ("alpha=0", "x"),
        ("alpha=2", "m"),
        ("alpha=2", "x"),
    ]
    first, second = rows[0], rows[2]
    assert (first["hits"], first["total"], first["rate"]) == (5, 100, 0.05)
    assert first["ci95"] == list(wilson(5, 100)) and first["ratio"] is None
    assert second["ratio"] == pytest.approx(4.0)
    assert second["ratio_ci95"] == pytest.approx(list(rate_ratio(20, 100, 5, 100)[1:]))
    control4 = next(r for r in rows if r["condition"] == "control alpha=4")
    assert control4["total"] == 0 and control4["rate"] is None and control4["ratio"] is None


def test_control_flag_rule():
    s = spec()
    calm = summarize(*tally(records("control alpha=0", 5, 200) + records("control alpha=4", 7, 200)), s)
    moved = summarize(*tally(records("control alpha=0", 5, 200) + records("control alpha=4", 30, 200)), s)
    (flag,) = [f for f in control_flag(calm) if f["detector"] == "m"]
    assert flag["alphas"] == [0.0, 4.0] and not flag["flagged"] and flag["p_value"] > 0.01
    (flag,) = [f for f in control_flag(moved) if f["detector"] == "m"]
    assert flag["flagged"] and flag["p_value"] < 0.01
    assert control_flag(summarize(*tally(records("alpha=0", 1, 10)), s)) == []  # no controls


def test_report_csv():
    s = spec()
    rows = summarize(*tally(records("alpha=0", 5, 100) + records("alpha=2", 20, 100)), s)
    table = list(csv.DictReader(io.StringIO(report_csv(rows))))
    assert len(table) == 8
    assert table[2]["condition"] == "alpha=2" and table[2]["detector"] == "m"
    assert (table[2]["hits"], table[2]["total"], float(table[2]["rate"])) == ("20", "100", 0.2)
    assert float(table[2]["ratio"]) == pytest.approx(4.0)
    assert float(table[2]["ci95_lo"]) == pytest.approx(wilson(20, 100)[0], rel=1e-5)
    assert table[0]["ratio"] == "" and table[4]["rate"] == ""  # undefined values stay empty


def test_report_png(tmp_path):
    s = spec()
    rows = summarize(
        *tally(records("alpha=0", 5, 100) + records("alpha=2", 20, 100) + records("control alpha=0", 4, 100)),
        s,
    )
    path = report_png(rows, tmp_path / "report.png", title="hunt")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(PNG_SIZE[0] * PNG_DPI), int(PNG_SIZE[1] * PNG_DPI))


def extrapolation_spec():
    return ExperimentSpec.from_dict(
        {
            "prompts": ["p"],
            "conditions": [0, 1, 2, 4, {"alpha": 3, "adapter": "a"}, {"alpha": 2, "control": True}],
            "n": 400,
            "detectors": [{"name": "m", "type": "substring", "patterns": ["M"]}],
        }
    )


def test_extrapolation_recovers_a_logistic_rate_at_alpha_0():
    # Exact logistic rates: logit p = -4 + 0.8 alpha, so p(0) = expit(-4) = 0.018.
    s = extrapolation_spec()
    n = 100_000
    counts = {}
    totals = {}
    for alpha in (0, 1, 2, 4):
        p = 1 / (1 + math.exp(4 - 0.8 * alpha))
        counts[f"alpha={alpha}"] = {"m": round(p * n)}
        totals[f"alpha={alpha}"] = n
    counts["adapter=a alpha=3"], totals["adapter=a alpha=3"] = {"m": n // 2}, n  # not plain: ignored
    (result,) = extrapolate_alpha0(summarize(counts, totals, s))
    assert result["alphas"] == [1.0, 2.0, 4.0]
    assert result["rate"] == pytest.approx(1 / (1 + math.exp(4)), rel=0.02)
    assert result["slope"] == pytest.approx(0.8, rel=0.02)
    assert result["ci95"][0] < result["rate"] < result["ci95"][1]
    assert result["measured"] == pytest.approx(counts["alpha=0"]["m"] / n)
    assert abs(result["error"]) < 0.001 and result["within_ci"]


def test_extrapolation_needs_two_positive_alphas():
    s = extrapolation_spec()
    counts, totals = {"alpha=0": {"m": 1}, "alpha=1": {"m": 20}}, {"alpha=0": 400, "alpha=1": 400}
    assert extrapolate_alpha0(summarize(counts, totals, s)) == []
    counts["alpha=2"], totals["alpha=2"] = {"m": 0}, 400  # zero hits: corrected, still finite
    (result,) = extrapolate_alpha0(summarize(counts, totals, s))
    assert 0 < result["ci95"][0] < result["rate"] < result["ci95"][1] < 1
