"""Global rank allocation (`--strategy global`) against brute force over every plan of a tiny problem."""

from __future__ import annotations

import itertools

import pytest
import torch

from swiftsvd_cli.core.allocation import WeightedSpectrum, global_ranks, parameter_count
from swiftsvd_cli.core.linalg import break_even_rank, loss_at_rank

SHAPES = [(3, 5), (4, 4), (6, 3), (2, 7)]  # break-even ranks 1, 2, 2, 1: dense is a real option


def weighted_loss(matrices: list[WeightedSpectrum], ranks: list[int]) -> float:
    """Σ w tail(k), dense (rank ≥ break-even) losing nothing: computed from the definition, not the allocator."""
    total = 0.0
    for x, k in zip(matrices, ranks, strict=True):
        if k < break_even_rank(x.m, x.n):
            total += x.weight * loss_at_rank(x.eigenvalues, k)
    return total


def params(matrices: list[WeightedSpectrum], ranks: list[int]) -> int:
    return sum(parameter_count(x.m, x.n, k) for x, k in zip(matrices, ranks, strict=True))


def problem(seed: int, floors: bool) -> list[WeightedSpectrum]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m, n in SHAPES + [(5, 6), (7, 8)]:
        lam = (torch.rand(min(m, n), generator=gen, dtype=torch.float64) * 10).sort(descending=True).values
        if seed % 2:  # flat tails: the dense step beats the last single directions (the hull merges them)
            lam[1:] = lam[1]
        floor = int(torch.randint(0, break_even_rank(m, n), (1,), generator=gen)) if floors else 0
        out.append(WeightedSpectrum(m, n, lam, float(torch.rand(1, generator=gen)) + 0.1, floor))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("floors", [False, True])
def test_optimal_for_the_parameters_it_uses(seed: int, floors: bool) -> None:
    matrices = problem(seed, floors)
    choices = [range(x.floor, break_even_rank(x.m, x.n) + 1) for x in matrices]
    plans = [(params(matrices, list(ks)), weighted_loss(matrices, list(ks))) for ks in itertools.product(*choices)]
    total = sum(x.m * x.n for x in matrices)
    for ratio in (0.3, 0.45, 0.6, 0.75, 0.9):
        ranks = global_ranks(matrices, ratio)
        used = params(matrices, ranks)
        assert used <= ratio * total
        assert all(k >= x.floor for x, k in zip(matrices, ranks, strict=True))
        best = min(loss for cost, loss in plans if cost <= used)
        assert weighted_loss(matrices, ranks) == pytest.approx(best, rel=1e-12, abs=1e-12)
        # What stays unused is less than one step: no cheaper plan within the budget is much better.
        biggest_step = max(x.m * x.n for x in matrices)
        assert ratio * total - used < biggest_step


def test_extremes() -> None:
    matrices = problem(0, floors=False)
    assert global_ranks(matrices, 1.0) == [break_even_rank(x.m, x.n) for x in matrices]  # the original model
    assert global_ranks(matrices, 0.0) == [0] * len(matrices)
    floored = [WeightedSpectrum(x.m, x.n, x.eigenvalues, x.weight, 1) for x in matrices]
    assert global_ranks(floored, 0.0) == [1] * len(matrices)  # the floor holds even past the budget


def test_moves_ranks_to_where_the_loss_is() -> None:
    """Two identical shapes, one with ten times the weight: it gets the directions first."""
    lam = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    heavy, light = WeightedSpectrum(12, 6, lam, 10.0, 0), WeightedSpectrum(12, 6, lam, 1.0, 0)
    ranks = global_ranks([heavy, light], 0.5)
    assert ranks[0] > ranks[1]
