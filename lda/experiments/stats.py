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


def clopper_pearson(hits: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a binomial proportion: `(0.0, 1.0)` when total is 0.

    Each end is the proportion at which the observed count sits in a tail of mass (1 - confidence)
    / 2, so coverage is at least `confidence` for every true proportion and every total.
    """
    if total < 0 or not 0 <= hits <= total:
        raise ValueError(f"hits must be in [0, total], got hits={hits} total={total}")
    tail = _tail(confidence)
    lo = 0.0 if hits == 0 else _expit(_lower_logit(hits, total, tail))
    hi = 1.0 if hits == total else _expit(-_lower_logit(total - hits, total, tail))
    return lo, hi


def rate_ratio(h1: int, n1: int, h0: int, n0: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Ratio of rates (h1/n1) / (h0/n0) with an exact interval conditional on the hits h1 + h0.

    For rare hits the counts are Poisson, and given m = h1 + h0 hits in all, h1 is Binomial(m, s)
    with share s = n1 RR / (n1 RR + n0), so RR = s / (1 - s) * n0 / n1 is monotone in s. The
    Clopper-Pearson interval for s maps to an interval for RR that holds at every count, zeros
    included (the Katz log interval needs both counts positive, and the 0.5 correction this
    replaced read 0 hits in 3 against 5 in 100,000 as 149x the base). Where rates are not small,
    binomial counts vary less than Poisson ones (variance n p (1 - p) < n p), so the interval is
    wider than needed there but still holds, and all-hit groups keep an interval (3 of 3 against
    100 of 100 gives [0.20, 3.0], not the point 1). Exact coverage (every outcome summed) is at
    least 0.978 for totals 1 to 100 and rates 0.001 to 1, and 0.958 at totals 300 to 1,000. Katz is
    not kept for high rates: its variance term 1/h - 1/n is 0 for an all-hit group, so 3 samples
    at rate 0.7 against 100 at 0.7 (3 of 3 with probability 0.34) cover the ratio 1 only 66% of
    the time.

    Returns:
        (ratio, lo, hi), with lo <= ratio <= hi. h1 = 0 gives ratio 0 and lo 0; h0 = 0 gives ratio
        and hi `math.inf`; no hits in either gives ratio `math.nan` and (0, inf): no information.
    """
    if n1 <= 0 or n0 <= 0:
        raise ValueError(f"rate_ratio needs both totals > 0, got n1={n1} n0={n0}")
    for hits, total in ((h1, n1), (h0, n0)):
        if not 0 <= hits <= total:
            raise ValueError(f"hits must be in [0, total], got hits={hits} total={total}")
    m = h1 + h0
    if m == 0:
        return math.nan, 0.0, math.inf
    tail, scale = _tail(confidence), n0 / n1
    # The share's odds s / (1 - s) times n0 / n1, from log-odds so no end rounds through 1 - s.
    lo = 0.0 if h1 == 0 else math.exp(_lower_logit(h1, m, tail)) * scale
    hi = math.inf if h0 == 0 else math.exp(-_lower_logit(h0, m, tail)) * scale
    ratio = math.inf if h0 == 0 else h1 * n0 / (h0 * n1)
    return ratio, lo, hi


def _tail(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return (1 - confidence) / 2


def _expit(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _log_expit(x: float) -> float:
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))


def _lower_logit(hits: int, total: int, tail: float) -> float:
    """logit p where P(X >= hits) = tail for X ~ Binomial(total, p), 1 <= hits <= total.

    P(X >= k) = I_p(k, n - k + 1) rises with p, and its derivative in x = logit p is
    p^k q^(n-k+1) / B(k, n-k+1): Newton steps on the logit (relative precision for bounds near 0
    or 1) inside a bisection bracket, so a step that leaves the bracket is replaced by halving.
    At logit +-100, p is 4e-44 from 0 or 1, so the tail there is below / above any tail over
    1e-13 for totals up to 1e30: the root is inside. The loop ends at a step of float spacing,
    or after 200 steps (64 halvings already reach it).
    """
    a, b = float(hits), float(total - hits + 1)
    lo, hi = -100.0, 100.0
    x = math.log((hits - 0.5) / (total - hits + 0.5))
    for _ in range(200):
        log_p, log_q = _log_expit(x), _log_expit(-x)
        value, slope = _beta_inc(a, b, log_p, log_q)
        if value < tail:
            lo = x
        else:
            hi = x
        step = (value - tail) / slope if slope > 0 else math.inf
        nxt = x - step
        if not lo < nxt < hi:
            nxt = (lo + hi) / 2
        if abs(nxt - x) <= 4e-16 * max(1.0, abs(x)) or hi - lo <= 4e-16 * max(1.0, abs(x)):
            return nxt
        x = nxt
    return x


def _beta_inc(a: float, b: float, log_p: float, log_q: float) -> tuple[float, float]:
    """Regularized incomplete beta I_p(a, b) and p^a q^b / B(a, b), given log p and log q = log(1 - p).

    The continued fraction of Numerical Recipes (6.4), evaluated where it converges fast: at p
    when p < (a + 1) / (a + b + 2), else through I_p(a, b) = 1 - I_q(b, a). The second value is
    the density p^(a-1) q^(b-1) / B(a, b) times p q, the slope Newton needs.
    """
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * log_p + b * log_q)
    p, q = math.exp(log_p), math.exp(log_q)
    if p < (a + 1) / (a + b + 2):
        return front * _beta_cf(a, b, p) / a, front
    return 1.0 - front * _beta_cf(b, a, q) / b, front


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) by the modified Lentz method; converges in O(sqrt(max(a, b)))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000 + int(10 * math.sqrt(max(a, b)))):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge at a={a} b={b} x={x}")


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

    Each row: condition, condition_index, alpha, control, plain, strength (steered conditions), detector, hits, total, rate, ci95 [lo, hi],
    and ratio / ratio_ci95 against the first condition for the same detector (`rate_ratio`; None
    for the first condition itself and while either side has no samples yet). JSON has no
    Infinity, so an unbounded upper end is None (null), and so is a ratio that is infinite (no
    base hits) or undefined (no hits on either side, where ratio_ci95 is [0, None]).
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
                # plain LDA: no adapter, amplification or steering, not a control (what extrapolation fits)
                "plain": not condition.control
                and condition.adapter is None
                and condition.amplification is None
                and condition.steer is None,
                "strength": None if condition.steer is None else float(condition.steer.get("strength", 1.0)),
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
                row["ratio"] = ratio if math.isfinite(ratio) else None
                row["ratio_ci95"] = [rlo, rhi if math.isfinite(rhi) else None]
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
