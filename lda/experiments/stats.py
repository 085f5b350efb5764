"""Rates, intervals and ratios for rare events.

Wilson intervals rather than the normal (Wald) interval: a rare behaviour often has 0 or a few
hits, where Wald collapses to [0, 0] and claims a certainty the data do not have.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lda.experiments.spec import ExperimentSpec

Z95 = 1.959963984540054  # two-sided 95% normal quantile
CONTROL_P = 0.01


def wilson(hits: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for hits / total (`(0.0, 1.0)` when total is 0: nothing is known)."""
    if total < 0 or not 0 <= hits <= total:
        raise ValueError(f"hits must be in [0, total], got hits={hits} total={total}")
    if total == 0:
        return 0.0, 1.0
    p = hits / total
    z2 = z * z
    denom = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denom
    # At 0 or total hits the bound is 0 or 1 exactly, but center -/+ half rounds to ~1e-17 off it.
    lo = 0.0 if hits == 0 else max(0.0, center - half)
    hi = 1.0 if hits == total else min(1.0, center + half)
    return lo, hi


def rate_ratio(h1: int, n1: int, h0: int, n0: int, z: float = Z95) -> tuple[float, float, float]:
    """Ratio of rates (h1/n1) / (h0/n0) with a Katz log-scale interval.

    When either hit count is 0 the ratio or its log variance is infinite, so then 0.5 is added to
    every cell of the 2x2 table (hits and misses of both groups; each total grows by 1), the
    Haldane-Anscombe correction. The returned ratio is then the corrected one, finite and biased
    towards 1, which is the honest reading of "no hits in one group".

    Returns:
        (ratio, lo, hi).
    """
    if n1 <= 0 or n0 <= 0:
        raise ValueError(f"rate_ratio needs both totals > 0, got n1={n1} n0={n0}")
    for hits, total in ((h1, n1), (h0, n0)):
        if not 0 <= hits <= total:
            raise ValueError(f"hits must be in [0, total], got hits={hits} total={total}")
    a, b, c, d = float(h1), float(n1), float(h0), float(n0)
    if h1 == 0 or h0 == 0:
        a, b, c, d = a + 0.5, b + 1.0, c + 0.5, d + 1.0
    ratio = (a / b) / (c / d)
    se = math.sqrt(1 / a - 1 / b + 1 / c - 1 / d)
    return ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with integer `df` >= 1 degrees of freedom.

    Closed forms of the regularized upper incomplete gamma at half-integer shapes (no scipy here):
    even df is a Poisson tail sum, odd df adds terms to the df=1 case erfc(sqrt(x/2)).
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if x <= 0:
        return 1.0
    h = x / 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= h / i
            total += term
        return min(1.0, math.exp(-h) * total)
    total = math.erfc(math.sqrt(h))
    for i in range(1, (df - 1) // 2 + 1):
        total += math.exp((i - 0.5) * math.log(h) - h - math.lgamma(i + 0.5))
    return min(1.0, total)


def two_proportion_p(h1: int, n1: int, h0: int, n0: int) -> float:
    """Two-sided p of the pooled two-proportion z test (= chi-square, 1 df, no continuity correction)."""
    if n1 == 0 or n0 == 0:
        return 1.0
    pooled = (h1 + h0) / (n1 + n0)
    if pooled in (0.0, 1.0):
        return 1.0  # identical (all or no hits in both): no evidence of a difference
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    return math.erfc(abs(h1 / n1 - h0 / n0) / se / math.sqrt(2))


def tally(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """`(counts[condition][detector], totals[condition])` from sample records (store="all" files)."""
    counts: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for record in records:
        condition = record["condition"]
        totals[condition] = totals.get(condition, 0) + 1
        row = counts.setdefault(condition, {})
        for name in record["hits"]:
            row[name] = row.get(name, 0) + 1
    return counts, totals


def summarize(
    counts: Mapping[str, Mapping[str, int]], totals: Mapping[str, int], spec: ExperimentSpec
) -> list[dict[str, Any]]:
    """One row per condition x detector, in spec order.

    Each row: condition, condition_index, alpha, control, plain, detector, hits, total, rate, ci95 [lo, hi],
    and ratio / ratio_ci95 against the first condition for the same detector (None for the first
    condition itself and while either side has no samples yet).
    """
    rows = []
    base = spec.conditions[0].label
    for ci, condition in enumerate(spec.conditions):
        label = condition.label
        total = totals.get(label, 0)
        for detector in spec.detectors:
            hits = counts.get(label, {}).get(detector.name, 0)
            lo, hi = wilson(hits, total)
            row = {
                "condition": label,
                "condition_index": ci,
                "alpha": condition.alpha,
                "control": condition.control,
                # plain LDA: no adapter, no amplification, not a control (what extrapolation fits)
                "plain": not condition.control
                and condition.adapter is None
                and condition.amplification is None,
                "detector": detector.name,
                "hits": hits,
                "total": total,
                "rate": hits / total if total else None,
                "ci95": [lo, hi],
                "ratio": None,
                "ratio_ci95": None,
            }
            base_total = totals.get(base, 0)
            if ci > 0 and total and base_total:
                base_hits = counts.get(base, {}).get(detector.name, 0)
                ratio, rlo, rhi = rate_ratio(hits, total, base_hits, base_total)
                row["ratio"], row["ratio_ci95"] = ratio, [rlo, rhi]
            rows.append(row)
    return rows


def control_flag(
    summary: Sequence[Mapping[str, Any]], p_threshold: float = CONTROL_P
) -> list[dict[str, Any]]:
    """Flag null controls whose rate moves with alpha more than chance allows.

    Rule: a control decodes before vs before, so alpha changes nothing and its rate should be the
    same at every alpha. Per detector, take the control rows at the lowest and the highest alpha
    and run a pooled two-proportion z test; flag when p < `p_threshold` (0.01). A flag means the
    pipeline, not the fine-tune, moves the rate (e.g. the detector or the decode depends on alpha
    where it should not). Needs controls at two or more alphas; returns one entry per detector.
    """
    by_detector: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary:
        if row["control"] and row["total"]:
            by_detector.setdefault(row["detector"], []).append(row)
    flags = []
    for detector, rows in by_detector.items():
        if len(rows) < 2:
            continue
        low, high = min(rows, key=lambda r: r["alpha"]), max(rows, key=lambda r: r["alpha"])
        p = two_proportion_p(high["hits"], high["total"], low["hits"], low["total"])
        flags.append(
            {
                "detector": detector,
                "alphas": [low["alpha"], high["alpha"]],
                "rates": [low["rate"], high["rate"]],
                "p_value": p,
                "flagged": p < p_threshold,
            }
        )
    return flags
