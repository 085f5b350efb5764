"""The toolkit's steering-threshold search, as pure control logic.

The largest steering strength in [low, high] at which the steered model stays coherent: a binary
search where a midpoint passes if at least `pass_percent` of the samples the grader could judge
are coherent. `batch_steps` levels of the search tree are evaluated at once (the 2^k − 1 midpoints
they can reach, 7 for k = 3), then walked: the midpoints visited, and so the result, are the
sequential search's, with one round of generation and grading per k steps instead of per step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class SearchTrace:
    threshold: float
    steps: list[dict[str, float | bool | None]] = field(default_factory=list)  # each midpoint visited


def tree_midpoints(low: float, high: float, depth: int) -> list[float]:
    """Every midpoint a `depth`-step binary search in [low, high] can visit, in order."""
    return [low + (high - low) * k / 2**depth for k in range(1, 2**depth)]


def passes(labels: Sequence[bool | None], pass_percent: float) -> tuple[bool, float | None]:
    """(pass, percent coherent among graded samples); nothing graded never passes."""
    graded = [label for label in labels if label is not None]
    if not graded:
        return False, None
    percent = 100.0 * sum(graded) / len(graded)
    return percent >= pass_percent, percent


async def search_threshold(
    grade: Callable[[list[float]], Awaitable[list[Sequence[bool | None]]]],
    low: float = 0.0,
    high: float = 100.0,
    steps: int = 12,
    batch_steps: int = 3,
    pass_percent: float = 75.0,
) -> SearchTrace:
    """`grade(strengths)` returns each strength's sample labels (True coherent, None ungradable)."""
    if not high > low:
        raise ValueError(f"the bracket must have high > low, got [{low}, {high}]")
    trace = SearchTrace(threshold=low)
    done = 0
    while done < steps:
        depth = min(batch_steps, steps - done)
        points = tree_midpoints(low, high, depth)
        verdicts = await grade(points)
        # Walk the tree by index (k / 2^depth of the bracket), so each visited midpoint is exactly
        # one of the points graded.
        lo_k, hi_k = 0, 2**depth
        for _ in range(depth):
            mid_k = (lo_k + hi_k) // 2
            ok, percent = passes(verdicts[mid_k - 1], pass_percent)
            trace.steps.append({"strength": points[mid_k - 1], "coherent_percent": percent, "pass": ok})
            lo_k, hi_k = (mid_k, hi_k) if ok else (lo_k, mid_k)
        low, high = (points[lo_k - 1] if lo_k else low), (points[hi_k - 1] if hi_k < 2**depth else high)
        done += depth
    trace.threshold = low
    return trace
