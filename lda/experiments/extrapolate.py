"""Extrapolate a behaviour's rate at alpha 0 from the amplified conditions, and measure the error.

A rare behaviour needs many samples at alpha 0 to be seen at all; under amplification it is
frequent and cheap to measure. Fitting rate against alpha where it is frequent and reading the fit
at alpha 0 estimates the unamplified rate; when alpha 0 was sampled too, the difference between
the two is the measured error of that estimate (SPEC section 7).

The fit: weighted least squares of logit(rate) on alpha, over the plain LDA conditions (no adapter,
no amplification, not a control) with alpha > 0. Logit because rates live in (0, 1) and grow
roughly geometrically while rare; weights are the inverse delta-method variance of the logit,
1 / (h + 0.5) + 1 / (n - h + 0.5), whose 0.5 corrections keep 0 and n hits finite.

The line is an assumption, and on real pairs it can be wrong (on the demo pair logit(rate)
saturates with alpha and the line overshoots alpha 0 several-fold). With three or more alphas the
residual chi-square tests it: `fit_p` below MISFIT_P marks the estimate `misfit`, and the interval
is widened by the Birge ratio sqrt(chi2 / df) (the quasi-likelihood scale: residual scatter the
sampling noise does not explain is counted as noise). Widening cannot repair a wrong shape, so a
misfit estimate stays a rough guess; with two alphas (df 0) the shape is untested and `misfit` is
None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lda.experiments.stats import Z95, chi2_sf

MISFIT_P = 0.05


def _logit_point(hits: int, total: int) -> tuple[float, float]:
    """(logit of the corrected rate, its variance)."""
    a, b = hits + 0.5, total - hits + 0.5
    return math.log(a / b), 1 / a + 1 / b


def _expit(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def extrapolate_alpha0(summary: Sequence[Mapping[str, Any]], z: float = Z95) -> list[dict[str, Any]]:
    """Per detector: the fitted rate at alpha 0 with a 95% interval, and the measured one if any.

    Needs plain conditions at two or more distinct alphas > 0 with samples; detectors without them
    are left out. Each entry: detector, alphas (used in the fit), rate, ci95, slope (logit per unit
    alpha), chi2 / df / fit_p (the line's residual chi-square, its degrees of freedom and p-value;
    p None when df is 0), misfit (fit_p < MISFIT_P; None when df is 0), ci_scale (the factor the
    interval's half-width on the logit scale was widened by, >= 1), measured (the plain alpha-0
    rate or None), measured_ci95, error (rate - measured) and within_ci (whether the measured rate
    lies inside the extrapolation's interval).
    """
    plain: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary:
        if row["total"] and row["plain"]:
            plain.setdefault(row["detector"], []).append(row)
    results = []
    for detector, rows in plain.items():
        fit_rows = [r for r in rows if r["alpha"] > 0]
        if len({r["alpha"] for r in fit_rows}) < 2:
            continue
        points = [(r["alpha"], *_logit_point(r["hits"], r["total"])) for r in fit_rows]
        weight = sum(1 / v for _, _, v in points)
        x_mean = sum(x / v for x, _, v in points) / weight
        y_mean = sum(y / v for _, y, v in points) / weight
        sxx = sum((x - x_mean) ** 2 / v for x, _, v in points)
        slope = sum((x - x_mean) * (y - y_mean) / v for x, y, v in points) / sxx
        intercept = y_mean - slope * x_mean
        chi2 = sum((y - intercept - slope * x) ** 2 / v for x, y, v in points)
        df = len(points) - 2
        fit_p = chi2_sf(chi2, df) if df > 0 else None
        ci_scale = max(1.0, math.sqrt(chi2 / df)) if df > 0 else 1.0
        se = ci_scale * math.sqrt(1 / weight + x_mean**2 / sxx)  # standard error of the fit at alpha 0
        lo, hi = _expit(intercept - z * se), _expit(intercept + z * se)
        rate = _expit(intercept)
        zero = next((r for r in rows if r["alpha"] == 0), None)
        measured = zero["rate"] if zero else None
        results.append(
            {
                "detector": detector,
                "alphas": sorted({r["alpha"] for r in fit_rows}),
                "rate": rate,
                "ci95": [lo, hi],
                "slope": slope,
                "chi2": chi2,
                "df": df,
                "fit_p": fit_p,
                "misfit": fit_p < MISFIT_P if fit_p is not None else None,
                "ci_scale": ci_scale,
                "measured": measured,
                "measured_ci95": zero["ci95"] if zero else None,
                "error": rate - measured if measured is not None else None,
                "within_ci": lo <= measured <= hi if measured is not None else None,
            }
        )
    return results
