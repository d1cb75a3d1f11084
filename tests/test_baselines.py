"""Baselines at the same rank: plain SVD, ASVD, SVD-LLM, each against an independent computation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from swiftsvd_cli.core.baselines import asvd_factors, svd_factors, svd_llm_factors
from swiftsvd_cli.core.linalg import eigenbasis, factorize

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def anisotropic_inputs(n: int, N: int, seed: int) -> Tensor:
    """(n, N) correlated inputs whose scales span 3 decades: where activation-awareness matters."""
    g = gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    X: Tensor = Q @ torch.diag(torch.logspace(0, -3, n, dtype=F64)) @ torch.randn(n, N, generator=g, dtype=F64)
    return X


def output_loss(W: Tensor, W_prime: Tensor, X: Tensor) -> float:
    return float((((W - W_prime) @ X) ** 2).sum())


def swift_loss(W: Tensor, X: Tensor, k: int) -> float:
    basis = eigenbasis(W, X @ X.T, k=k)
    A, B = factorize(W, basis.vectors, k)
    return output_loss(W, A @ B, X)


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24)])
def test_svd_llm_matches_swift_svd_on_well_conditioned_gram(m: int, n: int) -> None:
    X = torch.randn(n, 400, generator=gen(0), dtype=F64)
    W = torch.randn(m, n, generator=gen(1), dtype=F64)
    for k in (2, 7, 11):
        result = svd_llm_factors(W, X @ X.T, k)
        assert not result.shifted
        assert result.A.shape == (m, k) and result.B.shape == (k, n)
        ours = swift_loss(W, X, k)
        assert abs(output_loss(W, result.A @ result.B, X) - ours) < 1e-9 * ours


def test_svd_llm_shifts_a_rank_deficient_gram() -> None:
    n = 24
    X = torch.randn(n, 10, generator=gen(2), dtype=F64)  # 10 tokens < 24 features
    X[3] = 0.0
    W = torch.randn(16, n, generator=gen(3), dtype=F64)
    result = svd_llm_factors(W, X @ X.T, 6)
    assert result.shifted
    assert bool(torch.isfinite(result.A).all()) and bool(torch.isfinite(result.B).all())
    assert output_loss(W, result.A @ result.B, X) >= swift_loss(W, X, 6) * (1 - 1e-9)


def test_svd_llm_cholesky_precision_option() -> None:
    X = torch.randn(24, 200, generator=gen(4), dtype=F64)
    W = torch.randn(16, 24, generator=gen(5), dtype=F64)
    mixed = svd_llm_factors(W, X @ X.T, 5, precision=torch.float32, cholesky_precision=F64)
    assert mixed.A.dtype == torch.float32 and mixed.B.dtype == torch.float32
    ours = swift_loss(W, X, 5)
    assert abs(output_loss(W, (mixed.A @ mixed.B).double(), X) - ours) < 1e-4 * ours


def test_asvd_equals_scaled_svd_folded_back() -> None:
    m, n, k, alpha = 20, 30, 6, 0.5
    X = anisotropic_inputs(n, 300, seed=6)
    W = torch.randn(m, n, generator=gen(7), dtype=F64)
    mean_abs_x = X.abs().mean(dim=1)  # (n,)
    A, B = asvd_factors(W, mean_abs_x, k, alpha=alpha)
    s = mean_abs_x**alpha + 1e-6
    U, sigma, Vh = torch.linalg.svd(W @ torch.diag(s))
    W_ref = U[:, :k] @ torch.diag(sigma[:k]) @ Vh[:k] @ torch.diag(1 / s)
    torch.testing.assert_close(A @ B, W_ref, rtol=0, atol=1e-12)
    # alpha = 0 scales every channel alike: ASVD degenerates to plain SVD
    A0, B0 = asvd_factors(W, mean_abs_x, k, alpha=0.0)
    A1, B1 = svd_factors(W, k)
    torch.testing.assert_close(A0 @ B0, A1 @ B1, rtol=0, atol=1e-12)
    # and it is a heuristic: never better than the optimum in output space
    assert output_loss(W, A @ B, X) >= swift_loss(W, X, k) * (1 - 1e-12)


def test_plain_svd_minimises_weight_error_but_not_output_error() -> None:
    m, n, k = 24, 40, 8
    X = anisotropic_inputs(n, 300, seed=8)
    W = torch.randn(m, n, generator=gen(9), dtype=F64)
    A, B = svd_factors(W, k)
    sigma = torch.linalg.svdvals(W)
    assert abs(float(((W - A @ B) ** 2).sum()) - float((sigma[k:] ** 2).sum())) < 1e-10
    # balanced split: A = U √Σ, B = √Σ Vᵀ
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1), rtol=1e-12, atol=0)
    assert output_loss(W, A @ B, X) > 1.5 * swift_loss(W, X, k)


def test_rank_out_of_range_is_rejected() -> None:
    W = torch.randn(4, 6, dtype=F64)
    with pytest.raises(ValueError):
        svd_factors(W, 5)
