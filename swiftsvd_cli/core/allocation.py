"""Rank allocation, pure arithmetic: uniform ranks, the paper's dynamic allocation (Algorithm 2) and a global one.

Ratio convention (paper): ρ is the fraction of the compressed linears' parameters that is *kept*. A rank-k
factorisation of an (m, n) weight costs k (m + n) parameters; at k ≥ break_even_rank(m, n) it saves nothing,
so such a module stays dense and costs m n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from swiftsvd_cli.core.linalg import RANK_FLOOR_SLACK, break_even_rank, loss_at_rank, uniform_rank
from swiftsvd_cli.core.search import boundary


def matrix_kind(module: str) -> str:
    """The matrix type of a module path ("self_attn.q_proj" -> "q_proj"): Algorithm 2 allocates within one."""
    return module.rpartition(".")[2]


def is_dense(m: int, n: int, k: int) -> bool:
    """A module whose rank reaches the break-even rank stays dense: factoring it would save nothing."""
    return k >= break_even_rank(m, n)


def parameter_count(m: int, n: int, k: int) -> int:
    """Parameters of an (m, n) weight at rank k: m n if dense, else k (m + n) for A (m, k) and B (k, n)."""
    return m * n if is_dense(m, n, k) else k * (m + n)


def kv_rank_cap(m: int, kv_ratio: float) -> int:
    """The largest k/v rank whose latent keeps at most `kv_ratio` of the dense cache: floor(kv_ratio · m).

    m = num_kv_heads · head_dim, the k/v projection's output width, is what a dense cache stores per token;
    a rank-r latent stores r. (A factored k/v always saves some: r < m n / (m + n) < m.)
    """
    return max(0, math.floor(m * kv_ratio + RANK_FLOOR_SLACK))


def achieved_ratio(shapes_and_ranks: Iterable[tuple[int, int, int]]) -> float:
    """Kept-parameter ratio Σ params(m, n, k) / Σ m n over (m, n, k) triples (dense modules count as m n)."""
    kept = total = 0
    for m, n, k in shapes_and_ranks:
        kept += parameter_count(m, n, k)
        total += m * n
    return kept / total if total else 1.0


def uniform_ranks(m: int, n: int, ratio: float, num_layers: int) -> list[int]:
    """The same rank floor(m n / (m + n) · ρ) for every layer."""
    return [uniform_rank(m, n, ratio)] * num_layers


def minimal_loss_at_uniform(eigenvalues: Tensor, m: int, n: int, ratio: float) -> float:
    """ε*_{k̄} = (Σ_{j>k̄} σ_j²)^{1/2} = √loss_at_rank(floor(k̄)): one layer's input to `dynamic_ranks`."""
    return math.sqrt(loss_at_rank(eigenvalues, uniform_rank(m, n, ratio)))


def normalized_importance(importance: Sequence[float]) -> list[float]:
    """β ← (β − min β) / (max β − min β) + 1, into [1, 2]; all ones when every layer is equally important."""
    lo, hi = min(importance), max(importance)
    if hi - lo <= 0:
        return [1.0] * len(importance)
    return [(b - lo) / (hi - lo) + 1.0 for b in importance]


def allocation_scores(losses_at_uniform: Sequence[float], importance: Sequence[float], alpha: float) -> list[float]:
    """s_i = β_i^α · ln(e + ε*_i)^{1−α}: α = 1 uses importance only, α = 0 loss only."""
    beta = normalized_importance(importance)
    return [b**alpha * math.log(math.e + eps) ** (1.0 - alpha) for b, eps in zip(beta, losses_at_uniform, strict=True)]


def dynamic_ranks(
    m: int,
    n: int,
    losses_at_uniform: Sequence[float],
    importance: Sequence[float],
    ratio: float,
    alpha: float,
    delta: float = 0.5,
) -> list[int]:
    """Paper Algorithm 2 for one matrix type (e.g. all L q_proj): per-layer ranks for a kept ratio ρ.

    `losses_at_uniform[i]` is ε*_{k̄,i}, layer i's *square-rooted* loss tail at the uniform rank
    (see `minimal_loss_at_uniform`); `importance[i]` its block influence. Every layer keeps k̄ δ (the
    guaranteed minimum, k̄ = m n / (m + n) ρ real) and the pool k̄ L − L k̄ δ is shared in proportion to s_i.
    Integer ranks: floor, then the leftover one by one in descending score, so Σ k_i = floor(k̄ L).
    A rank is capped at the break-even rank (the module then stays dense) and the excess goes to the others
    in score order. Because a dense module costs m n > k_be (m + n), capped modules are finally lowered to
    k_be − 1 (lowest score first) while the parameter count exceeds ρ L m n, so the achieved ratio never
    exceeds ρ when ρ < 1. Guarantees: Σ k_i ≤ floor(k̄ L); k_i ≥ floor(k̄ δ) (unless that minimum itself is
    the cap and the budget forbids dense modules); a higher score never gets a lower rank.
    """
    L = len(losses_at_uniform)
    if L == 0 or len(importance) != L:
        raise ValueError(f"need one loss and one importance per layer, got {L} and {len(importance)}")
    if not 0.0 <= alpha <= 1.0 or not 0.0 <= delta <= 1.0 or ratio < 0:
        raise ValueError(f"need 0 <= alpha, delta <= 1 and ratio >= 0, got {alpha}, {delta}, {ratio}")
    if any(not math.isfinite(e) or e < 0 for e in losses_at_uniform):
        raise ValueError("losses_at_uniform must be finite and non-negative")
    scores = allocation_scores(losses_at_uniform, importance, alpha)
    order = sorted(range(L), key=lambda i: (-scores[i], i))  # descending score, ties by layer
    k_bar = m * n / (m + n) * ratio
    base = k_bar * delta
    pool = k_bar * L - base * L
    total_score = sum(scores)
    ranks = [math.floor(base + pool * s / total_score + RANK_FLOOR_SLACK) for s in scores]
    floor_min = math.floor(base + RANK_FLOOR_SLACK)
    target = math.floor(k_bar * L + RANK_FLOOR_SLACK)
    leftover = target - sum(ranks)
    while leftover > 0:  # < L after flooring: at most one more per layer, best scores first
        for i in order[:leftover]:
            ranks[i] += 1
        leftover = target - sum(ranks)
    for i in reversed(order):  # rounding could overshoot by a hair: take back from the lowest scores
        while leftover < 0 and ranks[i] > floor_min:
            ranks[i] -= 1
            leftover += 1

    cap = break_even_rank(m, n)
    excess = sum(max(0, k - cap) for k in ranks)
    ranks = [min(k, cap) for k in ranks]
    for i in order:
        give = min(excess, cap - ranks[i])
        ranks[i] += give
        excess -= give

    if cap > 0:
        budget = ratio * L * m * n
        for i in reversed(order):
            if sum(parameter_count(m, n, k) for k in ranks) <= budget:
                break
            if ranks[i] == cap:
                ranks[i] = cap - 1
    return ranks


REFERENCE_BITS = 16
"""`--bytes-ratio` is relative to the target linears stored at 16 bits (a bf16 / fp16 checkpoint)."""

INT8_SCALE_BYTES = 4
"""int8 weights carry one float32 scale per row of every stored matrix (torchao's int8 weight-only scheme)."""


def weight_bytes(m: int, n: int, k: int, factor_dtype: str | None) -> int:
    """Stored bytes of an (m, n) target linear's weights at rank k (biases excluded: they never change).

    `factor_dtype` None: 16-bit values, A (m, k) and B (k, n), or W if dense. "int8": one byte per value
    plus a float32 scale per row: A has m rows, B has k, a dense W has m.
    """
    dense = is_dense(m, n, k)
    if factor_dtype is None:
        return REFERENCE_BITS // 8 * parameter_count(m, n, k)
    if factor_dtype != "int8":
        raise ValueError(f"unknown factor dtype {factor_dtype!r}")
    rows = m if dense else m + k
    return parameter_count(m, n, k) + INT8_SCALE_BYTES * rows


def reference_bytes(shapes: Iterable[tuple[int, int]]) -> int:
    """Bytes of the original target linears at 16 bits: the denominator of `--bytes-ratio`."""
    return sum(REFERENCE_BITS // 8 * m * n for m, n in shapes)


RATIO_GRID = 2**53
"""`--bytes-ratio` bisects ρ over {i / 2^53}: every point exact in float64, far finer than any plan's steps."""


def largest_fitting_ratio(bytes_at: Callable[[float], int], budget: float) -> float | None:
    """The largest kept ratio ρ in [0, 1] whose plan's bytes `bytes_at(ρ)` stay within `budget`.

    Plans are step functions of ρ whose bytes grow with ρ (ranks only grow, and a module turns dense only
    when its factors would cost as much), so bisection finds the last step that fits, to 2^-53 (53 calls).
    None if even ρ = 0 does not fit.
    """
    if bytes_at(1.0) <= budget:
        return 1.0
    if bytes_at(0.0) > budget:
        return None
    return boundary(lambda index: bytes_at(index / RATIO_GRID) <= budget, fails=RATIO_GRID, holding=0) / RATIO_GRID


@dataclass(frozen=True)
class WeightedSpectrum:
    """One matrix as the global allocation sees it: shape, C's eigenvalues (descending), loss weight, minimum rank."""

    m: int
    n: int
    eigenvalues: Tensor
    weight: float
    floor: int


def _segments(matrix: WeightedSpectrum) -> tuple[list[float], list[int], int]:
    """(gains, costs, floor) of one matrix's steps above its floor, the last step going dense.

    Step i adds eigen-direction i (gain w λ_i, cost m + n); the dense step keeps every remaining direction
    (gain w Σ_{i≥r} λ_i, cost m n − r (m + n)). Steps whose gain per parameter would not exceed the dense
    step's are merged into it (upper concave hull), so each matrix's gains per parameter only decrease.
    """
    m, n, w = matrix.m, matrix.n, matrix.weight
    cap = break_even_rank(m, n)
    lam = [w * float(v) for v in matrix.eigenvalues.to(dtype=torch.float64).clamp_min(0)]
    first = min(matrix.floor, cap)
    if first == cap:  # a floor at the break-even rank: dense from the start
        return [], [], cap
    r = cap - 1  # the dense step starts at rank r
    gain, cost = sum(lam[r:]), m * n - r * (m + n)
    while r > first and lam[r - 1] * cost <= gain * (m + n):
        r -= 1
        gain, cost = gain + lam[r], cost + m + n
    return [*lam[first:r], gain], [m + n] * (r - first) + [cost], first


def global_ranks(matrices: Sequence[WeightedSpectrum], ratio: float) -> list[int]:
    """Ranks for all matrices at once: eigen-directions in descending order of weighted loss per parameter.

    Minimises Σ_j w_j · tail_j(k_j) subject to k_j ≥ floor_j and Σ_j params_j ≤ ρ Σ_j m_j n_j, where a rank
    reaching the break-even rank means dense (loss 0, m n parameters). Steps of every matrix (see `_segments`)
    are taken greedily by gain per parameter until the first that does not fit. Because each matrix's steps
    only lose value, this is the optimum of the problem's concave relaxation, and it is integral: no plan
    with at most as many parameters has a lower weighted loss. What stays unused is less than that step.
    """
    cuts = [_segments(matrix) for matrix in matrices]
    ranks = [first for _, _, first in cuts]
    budget = math.floor(ratio * sum(x.m * x.n for x in matrices) + RANK_FLOOR_SLACK) - sum(
        parameter_count(x.m, x.n, k) for k, x in zip(ranks, matrices, strict=True)
    )
    value = torch.cat(  # gain per parameter; the running minimum only irons out rounding at the hull's merge
        [torch.tensor(gain, dtype=torch.float64) / torch.tensor(cost, dtype=torch.float64) for gain, cost, _ in cuts]
        or [torch.zeros(0, dtype=torch.float64)]
    )
    costs = torch.tensor([c for _, cost, _ in cuts for c in cost], dtype=torch.int64)
    owner = torch.tensor([j for j, (gain, _, _) in enumerate(cuts) for _ in gain], dtype=torch.int64)
    start = 0
    for gain, _, _ in cuts:
        if gain:
            value[start : start + len(gain)] = value[start : start + len(gain)].cummin(0).values
        start += len(gain)
    order = torch.sort(value, descending=True, stable=True).indices  # ties keep each matrix's own order
    taken = order[: int((costs[order].cumsum(0) <= budget).sum())]
    steps = torch.bincount(owner[taken], minlength=len(matrices)).tolist()
    for j, (gain, _, first) in enumerate(cuts):
        if steps[j] == len(gain):  # the dense step too
            ranks[j] = break_even_rank(matrices[j].m, matrices[j].n)
        else:
            ranks[j] = first + steps[j]
    return ranks


def global_plan(
    spectra: Mapping[tuple[int, str], Tensor],
    shapes: Mapping[str, tuple[int, int]],
    importance: Sequence[float],
    ratio: float,
    delta: float,
) -> dict[tuple[int, str], int]:
    """`global_ranks` for every (layer, module): w λ / (m + n) across all matrices, each keeping ⌊δ k̄⌋.

    w = β / ‖W X‖²: a direction's share of its matrix's output energy (λ / Σλ, so that matrices whose outputs
    differ in scale by orders of magnitude compete on the same footing), times the layer's importance β
    normalised into [1, 2] as Algorithm 2 does.
    """
    beta = normalized_importance(importance)
    keys = [(i, module) for i in range(len(importance)) for module in shapes]
    matrices = []
    for i, module in keys:
        m, n = shapes[module]
        lam = spectra[(i, module)]
        energy = float(lam.clamp_min(0).sum())
        weight = beta[i] / energy if energy > 0 else 0.0
        matrices.append(WeightedSpectrum(m, n, lam, weight, uniform_rank(m, n, ratio * delta)))
    return dict(zip(keys, global_ranks(matrices, ratio), strict=True))
