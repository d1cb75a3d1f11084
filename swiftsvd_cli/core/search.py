"""`--target-ppl`: the smallest kept ratio whose validation perplexity meets a target, by bounded bisection.

Pure control flow: the caller's `metric(ρ)` allocates and evaluates; this module only decides which ρ to try.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RatioSearch:
    """The outcome: `ratio` None when even ρ = 1.0 (the original model) misses the target."""

    target: float
    ratio: float | None
    value: float  # metric at `ratio` (at 1.0 when unreachable)
    steps: list[tuple[float, float]] = field(default_factory=list)  # (ρ, metric) in the order evaluated


def max_steps(step: float) -> int:
    """Evaluations `smallest_ratio` makes at most: ρ = 1.0, then a bisection over the 1/step grid points."""
    return 1 + math.ceil(math.log2(round(1 / step)))


def smallest_ratio(metric: Callable[[float], float], target: float, step: float = 0.01) -> RatioSearch:
    """Smallest ρ on the grid {step, 2·step, …, 1} with metric(ρ) ≤ target, in at most `max_steps(step)` calls.

    ρ = 1.0 keeps every matrix dense (the original model): if it misses the target nothing can meet it, and
    the search stops there. Otherwise bisection keeps `hi` feasible and `lo` infeasible (ρ = 0 counts as
    infeasible), so the answer always meets the target; if the metric is not monotone in ρ it is a feasible ρ
    whose lower neighbour on the grid is not, rather than the global smallest.
    """
    points = round(1 / step)
    if points < 1 or not math.isclose(points * step, 1.0):
        raise ValueError(f"step {step} must divide 1")
    steps: list[tuple[float, float]] = []

    def evaluate(index: int) -> float:
        ratio = round(index * step, 10)
        value = metric(ratio)
        steps.append((ratio, value))
        return value

    best = evaluate(points)
    if not best <= target:  # also catches NaN
        return RatioSearch(target, None, best, steps)
    lo, hi = 0, points
    while hi - lo > 1:
        mid = (lo + hi) // 2
        value = evaluate(mid)
        if value <= target:
            hi, best = mid, value
        else:
            lo = mid
    return RatioSearch(target, round(hi * step, 10), best, steps)
