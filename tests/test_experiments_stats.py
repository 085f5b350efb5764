"""Wilson intervals, rate ratios, summaries, the control flag, and the CSV / PNG reports."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from PIL import Image

from lda.experiments import (
    ExperimentSpec,
    chi2_sf,
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


@pytest.mark.parametrize(
    ("x", "df", "expected"),
    # chi-square quantiles from tables: each x is the 95th (or 99.9th) percentile for its df
    [(3.841459, 1, 0.05), (5.991465, 2, 0.05), (7.814728, 3, 0.05), (9.487729, 4, 0.05),
     (11.0705, 5, 0.05), (10.827566, 1, 0.001), (29.5883, 10, 0.001), (0.0, 3, 1.0)],
)  # fmt: skip
def test_chi2_sf_matches_tabulated_quantiles(x, df, expected):
    assert chi2_sf(x, df) == pytest.approx(expected, rel=1e-4)


def test_chi2_sf_agrees_with_numerical_integration():
    # Independent of the closed forms: integrate the density x^(k/2-1) e^(-x/2) / (2^(k/2) G(k/2))
    # from 0 to x by Simpson's rule (the substitution x = t^2 removes the k=1 singularity).
    def cdf(x: float, k: int, steps: int = 4000) -> float:
        top = math.sqrt(x)
        dens = lambda t: 2 * t ** (k - 1) * math.exp(-t * t / 2) / (2 ** (k / 2) * math.gamma(k / 2))  # noqa: E731
        h = top / steps
        s = dens(0) + dens(top) + sum((4 if i % 2 else 2) * dens(i * h) for i in range(1, steps))
        return s * h / 3

    for k in (1, 2, 3, 6, 7):
        for x in (0.3, 2.0, 9.0):
            assert chi2_sf(x, k) == pytest.approx(1 - cdf(x, k), abs=1e-9)


def test_extrapolation_flags_a_curve_that_is_not_a_line_and_widens_its_interval():
    # The demo pair's shape: logit(rate) saturates with alpha (rates 9.7%, 19.8%, 37.6% at 1, 2, 4
    # of 2,400 each), so a line through them overshoots alpha 0.
    s = extrapolation_spec()
    n = 2400
    counts = {f"alpha={a}": {"m": round(r * n)} for a, r in ((1, 0.097), (2, 0.198), (4, 0.376))}
    totals = dict.fromkeys(counts, n)
    (result,) = extrapolate_alpha0(summarize(counts, totals, s))
    assert result["df"] == 1 and result["misfit"] is True
    assert result["chi2"] > 10 and result["fit_p"] == pytest.approx(chi2_sf(result["chi2"], 1))
    assert result["ci_scale"] == pytest.approx(math.sqrt(result["chi2"]))
    # Independently: numpy's weighted polyfit, its unscaled covariance times the Birge ratio^2.
    xs = np.array([1.0, 2.0, 4.0])
    hits = np.array([counts[f"alpha={a}"]["m"] for a in (1, 2, 4)], dtype=float)
    y = np.log((hits + 0.5) / (n - hits + 0.5))
    var = 1 / (hits + 0.5) + 1 / (n - hits + 0.5)
    (slope, intercept), cov = np.polyfit(xs, y, 1, w=1 / np.sqrt(var), cov="unscaled")
    chi2 = float(np.sum((y - intercept - slope * xs) ** 2 / var))
    assert result["chi2"] == pytest.approx(chi2, rel=1e-9)
    half = 1.959963984540054 * math.sqrt(cov[1, 1] * chi2)  # df = 1
    expit = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert result["rate"] == pytest.approx(expit(intercept), rel=1e-9)
    assert result["ci95"] == pytest.approx([expit(intercept - half), expit(intercept + half)], rel=1e-9)


def test_extrapolation_through_a_line_is_not_widened():
    s = extrapolation_spec()
    n = 100_000
    counts = {f"alpha={a}": {"m": round(n / (1 + math.exp(4 - 0.8 * a)))} for a in (1, 2, 4)}
    (result,) = extrapolate_alpha0(summarize(counts, dict.fromkeys(counts, n), s))
    assert result["misfit"] is False and result["fit_p"] > 0.5 and result["ci_scale"] == 1.0
    two = {k: v for k, v in counts.items() if k != "alpha=4"}
    (result,) = extrapolate_alpha0(summarize(two, dict.fromkeys(two, n), s))
    assert result["df"] == 0 and result["fit_p"] is None and result["misfit"] is None


def test_extrapolation_needs_two_positive_alphas():
    s = extrapolation_spec()
    counts, totals = {"alpha=0": {"m": 1}, "alpha=1": {"m": 20}}, {"alpha=0": 400, "alpha=1": 400}
    assert extrapolate_alpha0(summarize(counts, totals, s)) == []
    counts["alpha=2"], totals["alpha=2"] = {"m": 0}, 400  # zero hits: corrected, still finite
    (result,) = extrapolate_alpha0(summarize(counts, totals, s))
    assert 0 < result["ci95"][0] < result["rate"] < result["ci95"][1] < 1
