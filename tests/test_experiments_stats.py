"""Wilson intervals, rate ratios, summaries, the control flag, and the CSV / PNG reports."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from lda.experiments import (
    ExperimentSpec,
    chi2_sf,
    control_flag,
    extrapolate_alpha0,
    plot_series,
    rate_ratio,
    report_csv,
    report_figure,
    report_png,
    summarize,
    tally,
    two_proportion_p,
    wilson,
)
from lda.experiments.report import PNG_DPI, PNG_SIZE
from lda.experiments.stats import clopper_pearson


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


# Exact Clopper-Pearson bounds from scipy.stats.beta.ppf(0.025, x, m - x + 1) and
# beta.ppf(0.975, x + 1, m - x), computed outside the project (scipy is not a dependency).
@pytest.mark.parametrize(
    ("hits", "total", "expected"),
    [(5, 10, (0.18708602844739855, 0.8129139715526015)), (1, 10, (0.0025285785444617848, 0.4450161170281954)),
     (3, 7, (0.09898827844250786, 0.8159484323599169)), (40, 200, (0.1468944882157588, 0.26222636458960025)),
     (199, 200, (0.9724581015427943, 0.999873418972133))],
)  # fmt: skip
def test_clopper_pearson_matches_scipy(hits, total, expected):
    assert clopper_pearson(hits, total) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("total", [1, 2, 7, 100, 10_000])
def test_clopper_pearson_closed_forms(total):
    # 0 or all hits: P(X = total) = p^total; one hit: P(X >= 1) = 1 - (1 - p)^total.
    assert clopper_pearson(0, total) == pytest.approx((0.0, 1 - 0.025 ** (1 / total)), rel=1e-10)
    assert clopper_pearson(total, total) == pytest.approx((0.025 ** (1 / total), 1.0), rel=1e-10)
    assert clopper_pearson(1, total)[0] == pytest.approx(1 - 0.975 ** (1 / total), rel=1e-10)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="hits=4 total=3"):
        clopper_pearson(4, 3)


@pytest.mark.parametrize(
    ("counts", "expected"),
    # the same scipy bounds on the share h1 / (h1 + h0), mapped to the ratio by share / (1 - share) * n0 / n1
    [((63, 400, 3, 400), (21.0, 6.865190266876661, 104.55494995724116)),
     ((20, 100, 10, 100), (2.0, 0.8935088903846907, 4.784552440338102)),
     ((3, 3, 100, 100), (1.0, 0.2028023533488256, 3.007769271503934)),
     ((2, 30, 7, 1000), (9.523809523809524, 0.9653351137709745, 50.01949908573646)),
     ((500, 1000, 400, 1000), (1.25, 1.0937976472753324, 1.4292328606718516))],
)  # fmt: skip
def test_rate_ratio_is_the_exact_conditional_interval(counts, expected):
    assert rate_ratio(*counts) == pytest.approx(expected, rel=1e-9)


def test_rate_ratio_zero_hits_do_not_point_the_wrong_way():
    # The issue: 0 hits in 5 against 5 in 100,000 read as "at least 149x the base".
    ratio, lo, hi = rate_ratio(0, 5, 5, 100_000)
    assert ratio == 0.0 and lo == 0.0 and math.isfinite(hi)
    # Closed form: with h1 = 0 of m = h1 + h0 hits, the share's upper bound is 1 - 0.025^(1/m).
    share = 1 - 0.025 ** (1 / 5)
    assert hi == pytest.approx(share / (1 - share) * 100_000 / 5, rel=1e-9)
    # Mirrored: no hits in the base, so the ratio and its upper end are unbounded.
    ratio, lo, hi = rate_ratio(5, 100_000, 0, 5)
    share = 0.025 ** (1 / 5)
    assert ratio == math.inf and hi == math.inf
    assert lo == pytest.approx(share / (1 - share) * 5 / 100_000, rel=1e-9)
    # No hits anywhere: no information about the ratio.
    ratio, lo, hi = rate_ratio(0, 10, 0, 10)
    assert math.isnan(ratio) and (lo, hi) == (0.0, math.inf)
    with pytest.raises(ValueError, match="n1=0"):
        rate_ratio(0, 0, 1, 10)
    with pytest.raises(ValueError, match="hits=11 total=10"):
        rate_ratio(11, 10, 1, 10)


def test_rate_ratio_all_hits_keep_an_interval():
    # The issue: both groups all-hit collapsed to the point (1, 1, 1).
    for n1, n0 in ((3, 100), (100, 100), (3, 3), (1, 1)):
        ratio, lo, hi = rate_ratio(n1, n1, n0, n0)
        assert ratio == 1.0 and lo < 1.0 < hi


def test_rate_ratio_contains_its_point_and_zero_hits_stay_at_or_below_one():
    for n1, n0 in ((1, 1), (3, 3), (3, 100), (10, 30), (100, 3)):
        for h1 in range(n1 + 1):
            for h0 in range(n0 + 1):
                ratio, lo, hi = rate_ratio(h1, n1, h0, n0)
                assert 0.0 <= lo < hi
                if h1 + h0:
                    assert lo <= ratio <= hi, (h1, n1, h0, n0)
                if h1 == 0 and h0:
                    assert ratio == 0.0 and lo == 0.0
                if h0 == 0:
                    assert hi == math.inf and (ratio == math.inf if h1 else math.isnan(ratio))


def test_rate_ratio_coverage_by_simulation():
    # Coverage of the true ratio p1 / p0 at small counts, both groups binomial. With SIMS draws a
    # coverage of exactly 0.95 is estimated with standard error sqrt(0.95 * 0.05 / SIMS) = 0.0049;
    # each cell must reach 0.95 less 3 of those. p = 0 makes the ratio 0 or inf (0 / 0 is skipped).
    sims = 2000
    floor = 0.95 - 3 * math.sqrt(0.95 * 0.05 / sims)
    rates = (0.0, 0.001, 0.01, 0.05, 0.3, 1.0)
    rng = np.random.default_rng(0)
    worst = 1.0
    for n1 in (3, 10, 30, 100):
        for n0 in (3, 10, 30, 100):
            cache: dict[tuple[int, int], tuple[float, float]] = {}
            for p1 in rates:
                for p0 in rates:
                    if p1 == p0 == 0.0:
                        continue
                    truth = math.inf if p0 == 0.0 else p1 / p0
                    covered = 0
                    for h1, h0 in zip(rng.binomial(n1, p1, sims), rng.binomial(n0, p0, sims), strict=True):
                        key = (int(h1), int(h0))
                        if key not in cache:
                            cache[key] = rate_ratio(key[0], n1, key[1], n0)[1:]
                        lo, hi = cache[key]
                        covered += lo <= truth <= hi
                    worst = min(worst, covered / sims)
                    assert covered / sims >= floor, (n1, n0, p1, p0, covered / sims)
    assert worst >= floor


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


def test_summarize_zero_hit_chunk_against_a_full_base():
    # Conditions run one after another, so the live summary compares a full first condition with
    # the first chunk of the next: 0 hits in 3 must not read as "at least Nx the base".
    s = spec()
    counts = {"alpha=0": {"m": 5}, "alpha=2": {}, "control alpha=0": {"m": 2}, "control alpha=4": {}}
    totals = {"alpha=0": 100_000, "alpha=2": 3, "control alpha=0": 3, "control alpha=4": 3}
    rows = {(r["condition"], r["detector"]): r for r in summarize(counts, totals, s)}
    chunk = rows["alpha=2", "m"]
    assert chunk["ratio"] == 0.0 and chunk["ratio_ci95"][0] == 0.0 and chunk["ratio_ci95"][1] > 1
    # No base hits: the upper end is unbounded, written null (JSON has no Infinity), the point too.
    control = rows["control alpha=0", "x"], rows["control alpha=0", "m"]
    assert control[0]["ratio"] is None and control[0]["ratio_ci95"] == [0.0, None]  # 0 vs 0: anything
    assert control[1]["ratio"] == pytest.approx(2 / 3 / (5 / 100_000))
    zero_base = summarize({"alpha=0": {}, "alpha=2": {"m": 2}}, {"alpha=0": 3, "alpha=2": 3}, s)[2]
    assert zero_base["ratio"] is None and zero_base["ratio_ci95"][0] > 0
    assert zero_base["ratio_ci95"][1] is None
    rows = summarize(counts, totals, s)
    json.dumps(rows, allow_nan=False)  # what the HTTP layer does; raises on inf or nan
    table = list(csv.DictReader(io.StringIO(report_csv(rows))))
    assert (table[3]["ratio"], table[3]["ratio_lo"], table[3]["ratio_hi"]) == ("", "0", "")


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


def test_report_plots_alpha_on_a_numeric_axis_one_line_per_arm():
    """alphas [0, 1, 2, 4] with a control and an adapter arm: the LDA line runs 0 -> 1 -> 2 -> 4 at
    x = alpha and stops there; the control is its own dashed series, never the next point."""
    s = ExperimentSpec.from_dict({
        "prompts": ["p"], "n": 100,
        "conditions": [0, 1, 2, 4, {"alpha": 0, "control": True}, {"alpha": 4, "control": True},
                       {"alpha": 1, "adapter": "a"}, {"alpha": 3, "adapter": "a"}],
        "detectors": [{"name": "m", "type": "substring", "patterns": ["M"]}],
    })  # fmt: skip
    hits = {"alpha=0": 2, "alpha=1": 5, "alpha=2": 11, "alpha=4": 30, "control alpha=0": 3, "control alpha=4": 2,
            "adapter=a alpha=1": 7, "adapter=a alpha=3": 20}  # fmt: skip
    rows = summarize({k: {"m": v} for k, v in hits.items()}, dict.fromkeys(hits, 100), s)
    series = {(e["arm"], e["detector"]): e for e in plot_series(rows)}
    assert list(series) == [("LDA", "m"), ("control", "m"), ("adapter=a", "m")]
    assert [(p["alpha"], p["rate"]) for p in series["LDA", "m"]["points"]] == [(0, .02), (1, .05), (2, .11), (4, .30)]
    assert [(p["alpha"], p["rate"]) for p in series["control", "m"]["points"]] == [(0, .03), (4, .02)]
    assert series["control", "m"]["control"] and not series["LDA", "m"]["control"]
    assert [p["condition"] for p in series["adapter=a", "m"]["points"]] == ["adapter=a alpha=1", "adapter=a alpha=3"]

    ax = report_figure(rows, "hunt").axes[0]
    lines = {bars.get_label(): bars.lines[0] for bars in ax.containers}  # each errorbar's data line
    assert list(lines) == ["LDA · m", "control · m", "adapter=a · m"]
    lda = lines["LDA · m"]
    # x is alpha (each series nudged sideways by less than 1% of the alpha span), in alpha order.
    assert np.allclose(lda.get_xdata(), [0, 1, 2, 4], atol=0.01 * 4)
    assert list(lda.get_ydata()) == [0.02, 0.05, 0.11, 0.30] and lda.get_linestyle() == "-"
    assert np.allclose(lines["control · m"].get_xdata(), [0, 4], atol=0.04)
    assert lines["control · m"].get_linestyle() == "--" and list(lines["control · m"].get_ydata()) == [0.03, 0.02]
    assert list(ax.get_xticks()) == [0, 1, 2, 3, 4] and ax.get_xlabel() == "alpha"


def test_report_series_leave_out_conditions_without_samples():
    s = spec()
    rows = summarize(*tally(records("alpha=0", 5, 100)), s)
    series = plot_series(rows)
    assert [len(e["points"]) for e in series if e["arm"] == "LDA"] == [1] * len({r["detector"] for r in rows})
    report_figure(rows)  # one point per series, others empty: still draws


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
