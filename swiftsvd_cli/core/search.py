"""Searches over the kept ratio ρ: bisection of a monotone predicate over a grid of ratios.

`--bytes-ratio` wants the largest ρ whose plan fits a byte budget, `--target-ppl` the smallest whose validation
perplexity meets a target: both are `boundary` over grid indices. Pure control flow: the caller's functions
allocate, count bytes or evaluate; this module only decides which ρ to try.
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


def boundary(holds: Callable[[int], bool], fails: int, holding: int) -> int:
    """The grid index next to where a monotone predicate switches, on the side where it holds.

    `holds(holding)` is known true and `holds(fails)` false (neither is asked); `holding` may lie above or below
    `fails`. Bisection asks `holds` at most ⌈log2 |holding − fails|⌉ times; if `holds` is not monotone, the
    answer still holds and its neighbour towards `fails` does not.
    """
    while abs(holding - fails) > 1:
        mid = (holding + fails) // 2
        if holds(mid):
            holding = mid
        else:
            fails = mid
    return holding


def max_steps(step: float) -> int:
    """Evaluations `smallest_ratio` makes at most: ρ = 1.0, then a bisection over the 1/step grid points."""
    return 1 + math.ceil(math.log2(round(1 / step)))


def smallest_ratio(metric: Callable[[float], float], target: float, step: float = 0.01) -> RatioSearch:
    """Smallest ρ on the grid {step, 2·step, …, 1} with metric(ρ) ≤ target, in at most `max_steps(step)` calls.

    ρ = 1.0 keeps every matrix dense (the original model): if it misses the target nothing can meet it, and
    the search stops there. Otherwise `boundary` bisects between ρ = 1 and ρ = 0 (counted as missing the
    target), so the answer always meets the target; if the metric is not monotone in ρ it is a ρ that meets it
    whose lower neighbour on the grid does not, rather than the global smallest.
    """
    points = round(1 / step)
    if points < 1 or not math.isclose(points * step, 1.0):
        raise ValueError(f"step {step} must divide 1")
    values: dict[int, float] = {}  # grid index -> metric, in the order evaluated

    def evaluate(index: int) -> float:
        values[index] = metric(round(index * step, 10))
        return values[index]

    def steps() -> list[tuple[float, float]]:
        return [(round(index * step, 10), value) for index, value in values.items()]

    if not evaluate(points) <= target:  # also catches NaN
        return RatioSearch(target, None, values[points], steps())
    found = boundary(lambda index: evaluate(index) <= target, fails=0, holding=points)
    return RatioSearch(target, round(found * step, 10), values[found], steps())
