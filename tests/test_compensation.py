"""Error-compensated factors (core/compensation.py) against independent computations.

The reference minimum of min_{rank W' ≤ k} ‖W X − W' X̂‖²_F is computed from the data matrices themselves:
with X̂ᵀ = Q R (thin QR, R invertible), W' X̂ = Z Qᵀ for Z = W' Rᵀ of rank ≤ k, and
‖Y − Z Qᵀ‖² = ‖Y Q − Z‖² + ‖Y (I − Q Qᵀ)‖², so the minimum is the second term plus the squared singular
values of Y Q beyond the k-th (Eckart–Young). No Gram, no inverse, no eigendecomposition of C.
"""

from __future__ import annotations

import pytest
import torch

from swiftsvd_cli.core.compensation import (
    accumulate_compensation,
    accumulate_cross,
    accumulate_output_cross,
    compensated_factors,
    damped_cholesky,
    noise_floor,
)
from swiftsvd_cli.core.grams import accumulate_gram, make_empty_gram, symmetric_from_upper
from swiftsvd_cli.core.linalg import eigenbasis, factorize

D = torch.float64


def reference_minimum(Y: torch.Tensor, X_hat: torch.Tensor, k: int) -> float:
    """min over rank-k W' of ‖Y − W' X̂‖²_F, from a QR of X̂ᵀ and an SVD of Y Q. Y (m, N), X̂ (n, N)."""
    Q, _ = torch.linalg.qr(X_hat.T)  # (N, n)
    YQ = Y @ Q  # (m, n)
    outside = float(((Y - YQ @ Q.T) ** 2).sum())
    sigma = torch.linalg.svdvals(YQ)
    return outside + float((sigma[k:] ** 2).sum())


def loss(W: torch.Tensor, X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, X_hat: torch.Tensor) -> float:
    return float(((W @ X - A @ B @ X_hat) ** 2).sum())


def sums(W: torch.Tensor, X: torch.Tensor, X_hat: torch.Tensor, chunks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(T = W X X̂ᵀ, Ĝ = X̂ X̂ᵀ) accumulated over token chunks in (N, n) row layout, as the engine does."""
    n = X.shape[0]
    H, G_hat = torch.zeros(n, n, dtype=D), make_empty_gram(n)
    for x, x_hat in zip(X.T.chunk(chunks), X_hat.T.chunk(chunks), strict=True):
        accumulate_cross(H, x, x_hat)
        accumulate_gram(G_hat, x_hat)
    return W.to(D) @ H, symmetric_from_upper(G_hat)  # the engine's Ĝ (accumulated as its upper triangle)


def problem(m: int, n: int, N: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (m, n), inputs X (n, N) with feature scales over 1.5 decades (cond(X Xᵀ) ≈ 1e3), and a compressed-path
    copy X̂ = (I + noise · M) X + noise / 10 · E: a systematic distortion plus a little unexplained noise."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=D)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    scales = torch.logspace(0, -1.5, n, dtype=D)
    X = Q @ (scales[:, None] * torch.randn(n, N, generator=gen, dtype=D))
    M = torch.randn(n, n, generator=gen, dtype=D) / n**0.5
    X_hat = X + noise * (M @ X) + noise / 10 * torch.randn(n, N, generator=gen, dtype=D)
    return W, X, X_hat


@pytest.mark.parametrize(("m", "n"), [(12, 20), (30, 16)])  # both branches of eigenbasis (m <= n, m > n)
def test_identical_inputs_give_swift_svd(m: int, n: int) -> None:
    W, X, _ = problem(m, n, 400, 0.0)
    T, G = sums(W, X, X)
    k = 7
    A, B = compensated_factors({"w": T}, G, {"w": k}).factors["w"]
    A_ref, B_ref = factorize(W, eigenbasis(W, X @ X.T, k).vectors, k)
    W_c, W_ref = A @ B, A_ref @ B_ref
    assert float(torch.linalg.norm(W_c - W_ref) / torch.linalg.norm(W_ref)) < 1e-10


@pytest.mark.parametrize(("m", "n", "noise"), [(12, 20, 0.3), (30, 16, 0.5), (16, 16, 1.0)])
def test_perturbed_inputs_reach_the_reduced_rank_regression_minimum(m: int, n: int, noise: float) -> None:
    W, X, X_hat = problem(m, n, 300, noise, seed=m + n)
    T, G_hat = sums(W, X, X_hat)
    Y = W @ X
    for k in (1, 5, min(m, n) - 1):
        result = compensated_factors({"w": T}, G_hat, {"w": k})
        assert result.damping == 0.0
        A, B = result.factors["w"]
        compensated = loss(W, X, A, B, X_hat)
        minimum = reference_minimum(Y, X_hat, k)
        assert compensated == pytest.approx(minimum, rel=1e-9)
        swift = factorize(W, eigenbasis(W, X @ X.T, k).vectors, k)  # optimal for X, applied to X̂
        assert compensated <= loss(W, X, *swift, X_hat) * (1 + 1e-12)
        assert compensated < 0.99 * loss(W, X, *swift, X_hat)  # a real gain, not a tie


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0])
def test_weighted_original_inputs_reach_the_stacked_minimum(gamma: float) -> None:
    """min ‖W X − W' X̂‖² + γ ‖W X − W' X‖² from the accumulated sums equals the brute-force minimum of the
    stacked problem (inputs [X̂, √γ X], targets [W X, √γ W X]); the shared and the output-side cross terms agree."""
    m, n = 12, 20
    W, X, X_hat = problem(m, n, 300, 0.5, seed=7)
    G_hat, H, T_out = make_empty_gram(n), torch.zeros(n, n, dtype=D), torch.zeros(m, n, dtype=D)
    for x, x_hat in zip(X.T.chunk(3), X_hat.T.chunk(3), strict=True):
        accumulate_compensation(G_hat, {"shared": H}, {}, x, x_hat, gamma)
        accumulate_compensation(make_empty_gram(n), {"w": T_out}, {"w": W}, x, x_hat, gamma)
    T = W @ H
    assert float(torch.linalg.norm(T_out - T) / torch.linalg.norm(T)) < 1e-12
    root = gamma**0.5
    inputs, targets = torch.cat([X_hat, root * X], dim=1), torch.cat([W @ X, root * (W @ X)], dim=1)
    for k in (1, 5, m - 1):
        A, B = compensated_factors({"w": T}, symmetric_from_upper(G_hat), {"w": k}).factors["w"]
        mixed = loss(W, X, A, B, X_hat) + gamma * loss(W, X, A, B, X)
        assert mixed == pytest.approx(reference_minimum(targets, inputs, k), rel=1e-9)
        swift = factorize(W, eigenbasis(W, X @ X.T, k).vectors, k)
        assert mixed <= (loss(W, X, *swift, X_hat) + gamma * loss(W, X, *swift, X)) * (1 + 1e-12)


def test_output_side_sum_equals_input_side() -> None:
    W, X, X_hat = problem(10, 24, 200, 0.4)
    T_in, G_hat = sums(W, X, X_hat)
    T_out = torch.zeros(10, 24, dtype=D)
    for x, x_hat in zip(X.T.chunk(4), X_hat.T.chunk(4), strict=True):
        accumulate_output_cross(T_out, W, x.to(torch.float32), x_hat.to(torch.float32))
    reference = W @ X.to(torch.float32).to(D) @ X_hat.to(torch.float32).to(D).T
    assert float(torch.linalg.norm(T_out - reference) / torch.linalg.norm(reference)) < 1e-12
    assert float(torch.linalg.norm(T_out - T_in) / torch.linalg.norm(T_in)) < 1e-6  # float32 inputs


def test_group_shares_one_gram_and_matches_each_alone() -> None:
    _, X, X_hat = problem(8, 16, 200, 0.3)
    gen = torch.Generator().manual_seed(5)
    weights = {"q": torch.randn(8, 16, generator=gen, dtype=D), "up": torch.randn(24, 16, generator=gen, dtype=D)}
    ranks = {"q": 3, "up": 6}
    Ts = {name: sums(W, X, X_hat)[0] for name, W in weights.items()}
    G_hat = sums(weights["q"], X, X_hat)[1]
    together = compensated_factors(Ts, G_hat, ranks).factors
    for name, W in weights.items():
        A, B = together[name]
        assert loss(W, X, A, B, X_hat) == pytest.approx(reference_minimum(W @ X, X_hat, ranks[name]), rel=1e-9)


def test_singular_gram_is_damped_and_recorded() -> None:
    """Fewer tokens than features: Ĝ is singular, damping makes the factors finite and is reported."""
    W, X, X_hat = problem(6, 20, 8, 0.2)
    T, G_hat = sums(W, X, X_hat, chunks=2)
    result = compensated_factors({"w": T}, G_hat, {"w": 3})
    assert result.damping > 0
    A, B = result.factors["w"]
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    # The ridge problem's optimum still beats Swift-SVD's factors on X̂ on the calibration tokens.
    swift = factorize(W, eigenbasis(W, X @ X.T, 3).vectors, 3)
    assert loss(W, X, A, B, X_hat) <= loss(W, X, *swift, X_hat)


def test_damping_ladder_and_failure() -> None:
    G = torch.eye(4, dtype=D)
    assert damped_cholesky(G)[2] == 0.0
    assert damped_cholesky(G, noise_floor(torch.float32))[2] == 0.0  # well conditioned: never damped
    below_noise = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-9], dtype=D))  # factorable, but a noise direction
    assert damped_cholesky(below_noise)[2] == 0.0
    assert damped_cholesky(below_noise, noise_floor(torch.float32))[2] == noise_floor(torch.float32)
    singular = torch.zeros(4, 4, dtype=D)
    singular[0, 0] = 1.0
    assert damped_cholesky(singular)[2] == 1e-12  # no factor at all: the first rung of the ladder
    with pytest.raises(ValueError, match="non-finite"):
        damped_cholesky(torch.full((3, 3), float("nan"), dtype=D))
    with pytest.raises(ValueError, match="features"):
        accumulate_cross(torch.zeros(3, 3, dtype=D), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="differ"):
        accumulate_cross(torch.zeros(3, 3, dtype=D), torch.zeros(2, 3), torch.zeros(5, 3))
