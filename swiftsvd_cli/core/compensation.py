"""Error-compensated low-rank factors: the closed-form reduced-rank regression behind `--compensate`.

Swift-SVD fits W' to the inputs X that the *original* model feeds a linear. Inside a compressed model the
linear receives X̂ instead, the output of the already compressed layers before it. The rank-k W' that best
reproduces the original outputs from what it will actually see solves

    min over rank(W') ≤ k of ‖W X − W' X̂‖_F,

a reduced-rank regression with a closed form. With Ĝ = X̂ X̂ᵀ (n, n) and H = X X̂ᵀ (n, n), both sums over
tokens in float64 like the Grams, the least-squares refit W_ls = W H Ĝ⁻¹ splits the error into a part no W'
can remove (orthogonal to the rows of X̂) and ‖(W_ls − W') X̂‖², which is Swift-SVD's problem for W_ls under
the Gram Ĝ: W' = U_k U_kᵀ W_ls with U_k the top-k eigenvectors of W_ls Ĝ W_lsᵀ, so A = U_k, B = U_kᵀ W_ls.
With X̂ = X, W_ls = W and this is Swift-SVD.

Fitting X̂ alone overfits the calibration text: every layer learns the calibration windows' own propagated
errors. On the demo (SmolLM2-135M, ρ = 0.8, uniform ranks, 64 x 512 calibration tokens) it gave perplexity 78.4
on calibration windows against one-pass Swift-SVD's 105.7, but 136.1 against 128.6 on held-out text. So the
objective also asks the factors to keep working on the original inputs, with weight γ (`ORIGINAL_WEIGHT`):

    min over rank(W') ≤ k of ‖W X − W' X̂‖²_F + γ ‖W X − W' X‖²_F,

the same reduced-rank regression for the stacked inputs [X̂, √γ X] and targets [W X, √γ W X]: Ĝ becomes
X̂ X̂ᵀ + γ X Xᵀ and H becomes X (X̂ + γ X)ᵀ (`accumulate_compensation`), and everything below is unchanged.
γ → ∞ is one-pass Swift-SVD, γ = 0 the plain regression. With γ = 1 the demo's held-out perplexity at the same
plan is 94.3 (0.73x one-pass), calibration windows 70.7.

Only T = W H (m, n) enters (W_ls = T Ĝ⁻¹), so a linear whose input no other linear reads can sum
T = Σ (W x)(x̂)ᵀ directly: m n numbers instead of n² (down_proj of Llama-2-7B: 4096 x 11008 instead of 11008²).

Damping: a singular Ĝ (fewer tokens than features, dead channels, directions below the inputs' rounding noise)
has no trustworthy Cholesky factor. Then μ I is added, μ relative to Ĝ's mean diagonal, from the inputs' noise
floor up until the factorisation is trustworthy. Ĝ + μ I is exactly the
reduced-rank regression of the ridge problem ‖W X − W' X̂‖² + μ ‖W'‖² (stack X̂ with √μ I and X with 0), so
every formula above holds with Ĝ + μ I in place of Ĝ, and the result is still that problem's optimum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from swiftsvd_cli.core.grams import accumulate_gram
from swiftsvd_cli.core.linalg import SVD_PRECISION, factorize, group_eigenbases

ORIGINAL_WEIGHT = 1.0
"""γ: the weight of the original inputs X beside the compressed path's X̂ in the compensated objective (see above).
One, the natural choice (both input streams count equally), was the only value measured: 0.73x the one-pass
held-out perplexity on the demo, where γ = 0 gave 1.06x."""

DAMPING_LADDER = tuple(10.0**-e for e in range(12, -1, -2))
"""Relative dampings tried after the first, 1e-12 ... 1, when Ĝ + μ I has no (trustworthy) Cholesky factor."""


def _rows(x: Tensor, n: int, like: Tensor) -> Tensor:
    """(..., n) activations as (N, n) rows in `like`'s dtype and device."""
    if x.shape[-1] != n:
        raise ValueError(f"input has {x.shape[-1]} features, expected {n}")
    return x.reshape(-1, n).to(device=like.device, dtype=like.dtype)


def accumulate_cross(H: Tensor, x: Tensor, x_hat: Tensor) -> int:
    """Add Σ_t x_t x̂_tᵀ (= X X̂ᵀ for tokens as columns) to H (n, n) in place; return the tokens added.

    x and x̂ are the same tokens' inputs on the original and on the compressed path, (..., n) each.
    """
    n = H.shape[0]
    X, X_hat = _rows(x, n, H), _rows(x_hat, n, H)  # (N, n) each
    if X.shape != X_hat.shape:
        raise ValueError(f"original and compressed inputs differ in shape: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    H.addmm_(X.T, X_hat)
    return int(X.shape[0])


def accumulate_output_cross(T: Tensor, W: Tensor, x: Tensor, x_hat: Tensor) -> int:
    """Add Σ_t (W x_t) x̂_tᵀ = W X X̂ᵀ to T (m, n) in place, W (m, n) in T's precision; return the tokens added.

    The output-side form of `accumulate_cross` for one linear: m n numbers instead of n².
    """
    n = T.shape[1]
    X, X_hat = _rows(x, n, T), _rows(x_hat, n, T)  # (N, n) each
    if X.shape != X_hat.shape:
        raise ValueError(f"original and compressed inputs differ in shape: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    Y = X @ W.to(dtype=T.dtype, device=T.device).T  # (N, m): the original outputs (without bias)
    T.addmm_(Y.T, X_hat)
    return int(X.shape[0])


def accumulate_compensation(
    G_hat: Tensor, cross: Mapping[str, Tensor], weights: Mapping[str, Tensor], x: Tensor, x_hat: Tensor, gamma: float
) -> int:
    """Add one batch of the stacked problem's sums in place; return the tokens added.

    `G_hat` (n, n, upper triangle used) gains X̂ X̂ᵀ + γ X Xᵀ; each `cross[key]` gains X (X̂ + γ X)ᵀ (n, n) when
    `weights` has no entry for `key`, else W X (X̂ + γ X)ᵀ (m, n) with W = `weights[key]` (the output-side form).
    x and x̂ are the same tokens' inputs on the original and on the compressed path, (..., n) each.
    """
    partner = x_hat.to(device=G_hat.device, dtype=G_hat.dtype, copy=True)  # X̂, then X̂ + γ X: X's partner
    tokens = accumulate_gram(G_hat, partner)
    if gamma:
        # two float64 copies of the batch at a time, not three (7B down_proj: 0.7 GB each at 8192 tokens)
        scaled = x.to(device=G_hat.device, dtype=G_hat.dtype, copy=True).mul_(gamma**0.5)  # √γ X
        accumulate_gram(G_hat, scaled)
        partner.add_(scaled, alpha=gamma**0.5)
        del scaled
    for key, term in cross.items():
        if key in weights:
            accumulate_output_cross(term, weights[key], x, partner)
        else:
            accumulate_cross(term, x, partner)
    return tokens


def noise_floor(dtype: torch.dtype) -> float:
    """eps of `dtype`: directions of inputs stored in it carrying less than eps · (mean energy per feature) are
    dominated by rounding. Along such a direction T and Ĝ are both rounding noise, and T Ĝ⁻¹ would turn the noise
    into large weights that fit the calibration tokens and amplify rounding on any other input; a ridge of that
    size leaves every direction above it as it was."""
    return float(torch.finfo(dtype).eps)


def damped_cholesky(G_hat: Tensor, floor: float = 0.0) -> tuple[Tensor, Tensor, float]:
    """(L, Ĝ + μ I, μ / mean diag Ĝ) with L Lᵀ = Ĝ + μ I and the smallest μ on the ladder that makes it trustworthy.

    μ = 0 first. A factor is accepted when it exists and no pivot L_ii² is below `floor` · mean diag Ĝ: a smaller
    one means Ĝ has directions under the inputs' rounding noise (`noise_floor`), where an undamped inverse
    would amplify noise; then μ = floor, and up `DAMPING_LADDER`. ValueError if even μ = 1 fails (NaN/inf).
    """
    G = G_hat.to(dtype=SVD_PRECISION)
    G = torch.add(G, G.T).mul_(0.5)  # (n, n), one new buffer: damped in place below
    scale = float(torch.diagonal(G).mean()) if G.numel() else 0.0
    scale = scale if scale > 0 else 1.0  # an all-zero Ĝ: any μ > 0 gives W_ls = 0, the right answer
    added = 0.0
    for relative in (0.0, *([floor] if floor > 0 else []), *(r for r in DAMPING_LADDER if r > floor)):
        torch.diagonal(G).add_((relative - added) * scale)
        added = relative
        L, info = torch.linalg.cholesky_ex(G)
        # L_ii² ≥ λ_min(Ĝ + μ I) ≥ μ in exact arithmetic; the half leaves room for rounding at μ = floor.
        if int(info) == 0 and (G.numel() == 0 or float(torch.diagonal(L).square().min()) >= floor * scale * 0.5):
            return L, G, relative
    raise ValueError("the compressed-path Gram has no Cholesky factor even with damping 1.0 (non-finite inputs?)")


@dataclass(frozen=True)
class CompensatedFactors:
    """Factors of one input group's linears and the relative damping their shared Ĝ needed (0.0: none)."""

    factors: dict[str, tuple[Tensor, Tensor]]  # name -> (A (m, k), B (k, n)), float64
    damping: float


def compensated_factors(
    T: Mapping[str, Tensor], G_hat: Tensor, ranks: Mapping[str, int], floor: float = 0.0
) -> CompensatedFactors:
    """Optimal rank-k factors of min ‖W X − A B X̂‖_F for the linears of one input group.

    `T[name]` is W H = W X X̂ᵀ (m, n) of each linear, `G_hat` the compressed-path Gram X̂ X̂ᵀ (n, n) they share,
    `ranks[name]` the rank k, `floor` the inputs' noise floor (see `damped_cholesky`; 0 trusts every
    direction). One Cholesky of Ĝ serves the group, and so does one S = Ĝ^{1/2} where m > n.
    """
    L, G_d, relative = damped_cholesky(G_hat, floor)
    W_ls = {
        name: torch.cholesky_solve(T[name].to(dtype=SVD_PRECISION).T, L).T  # (m, n) = T (Ĝ + μ I)⁻¹
        for name in ranks
    }
    del L  # n² float64 less while the eigenbases are computed
    bases = group_eigenbases(W_ls, G_d, ks=ranks)
    factors = {name: factorize(W, bases[name].vectors, ranks[name]) for name, W in W_ls.items()}
    return CompensatedFactors(factors=factors, damping=relative)
