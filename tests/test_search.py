"""The ratio searches (core/search.py): `--target-ppl`'s and `--bytes-ratio`'s bisection, one `boundary` for both:
right answer against brute force, bounded number of evaluations, clear failure."""

from __future__ import annotations

import math

import pytest

from swiftsvd_cli.core.allocation import RATIO_GRID, largest_fitting_ratio
from swiftsvd_cli.core.search import boundary, max_steps, smallest_ratio


def counting(metric):  # noqa: ANN001, ANN201
    calls: list[float] = []

    def wrapped(ratio: float) -> float:
        calls.append(ratio)
        return float(metric(ratio))

    return wrapped, calls


@pytest.mark.parametrize("target", [10.5, 12.0, 30.0, 1000.0, 10.0])
def test_finds_the_smallest_grid_ratio_of_a_decreasing_metric(target: float) -> None:
    def ppl(ratio: float) -> float:
        return 10.0 / ratio**2  # 10 at the original, growing as ρ falls

    metric, calls = counting(ppl)
    result = smallest_ratio(metric, target, step=0.01)
    grid = [i / 100 for i in range(1, 101)]
    expected = min(r for r in grid if ppl(r) <= target)
    assert result.ratio == pytest.approx(expected)
    assert result.value <= target and result.value == pytest.approx(ppl(expected))
    assert len(calls) <= max_steps(0.01) == 8
    assert calls[0] == 1.0 and [r for r, _ in result.steps] == calls


def test_unreachable_target_stops_after_one_evaluation() -> None:
    metric, calls = counting(lambda ratio: 36.5 / ratio)
    result = smallest_ratio(metric, 30.0)
    assert result.ratio is None and result.value == 36.5 and calls == [1.0]
    nan, _ = counting(lambda ratio: float("nan"))
    assert smallest_ratio(nan, 30.0).ratio is None


def test_non_monotone_metric_still_meets_the_target_in_bounded_steps() -> None:
    def bumpy(ratio: float) -> float:
        return 5.0 if ratio in (0.5, 0.25, 0.13, 0.07, 0.04, 0.02) else 100.0 - 90 * ratio

    metric, calls = counting(bumpy)
    result = smallest_ratio(metric, 20.0)
    assert result.ratio is not None and bumpy(result.ratio) <= 20.0
    assert len(calls) <= max_steps(0.01)


def test_step_must_divide_one() -> None:
    with pytest.raises(ValueError, match="divide"):
        smallest_ratio(lambda ratio: 1.0, 2.0, step=0.3)


@pytest.mark.parametrize("switch", [1, 2, 37, 63, 64])
def test_boundary_either_direction_against_brute_force(switch: int) -> None:
    asked: list[int] = []

    def at_least(index: int) -> bool:  # holds from `switch` up
        asked.append(index)
        return index >= switch

    assert boundary(at_least, fails=0, holding=64) == min(i for i in range(1, 65) if i >= switch)
    assert len(asked) <= 6 and 0 not in asked and 64 not in asked
    below = boundary(lambda index: index < switch, fails=64, holding=0)  # holds below `switch`
    assert below == max(i for i in range(64) if i < switch)


@pytest.mark.parametrize("budget", [0, 9, 4567, 9990, 10_000])
def test_largest_fitting_ratio_finds_the_last_step_that_fits(budget: int) -> None:
    calls: list[float] = []

    def bytes_at(ratio: float) -> int:  # a plan's bytes: a step function growing with ρ
        calls.append(ratio)
        return 10 * math.floor(1000 * ratio)

    found = largest_fitting_ratio(bytes_at, budget)
    assert found is not None and bytes_at(found) <= budget
    if found < 1.0:
        assert bytes_at(found + 1 / RATIO_GRID) > budget  # the next grid point does not fit
        assert found == pytest.approx((budget // 10 + 1) / 1000, abs=2 / RATIO_GRID)
    assert len(calls) <= 2 + 53 + 2
    assert largest_fitting_ratio(lambda ratio: 5 + int(ratio), 4) is None  # not even ρ = 0 fits
