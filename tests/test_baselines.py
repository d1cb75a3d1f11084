"""Baselines at the same rank: plain SVD, ASVD, SVD-LLM, each against an independent computation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from swiftsvd_cli.core.baselines import FLOAT64, RELEASED, asvd_factors, svd_factors, svd_llm_factors
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
def test_svd_llm_fp64_matches_swift_svd_on_well_conditioned_gram(m: int, n: int) -> None:
    X = torch.randn(n, 400, generator=gen(0), dtype=F64)
    W = torch.randn(m, n, generator=gen(1), dtype=F64)
    for k in (2, 7, 11):
        result = svd_llm_factors(W, X @ X.T, k, FLOAT64)
        assert not result.shifted
        assert result.A.shape == (m, k) and result.B.shape == (k, n)
        ours = swift_loss(W, X, k)
        assert abs(output_loss(W, result.A @ result.B, X) - ours) < 1e-9 * ours


def test_svd_llm_shifts_a_rank_deficient_gram() -> None:
    n = 24
    X = torch.randn(n, 10, generator=gen(2), dtype=F64)  # 10 tokens < 24 features
    X[3] = 0.0
    W = torch.randn(16, n, generator=gen(3), dtype=F64)
    result = svd_llm_factors(W, X @ X.T, 6, FLOAT64)
    assert result.shifted
    assert bool(torch.isfinite(result.A).all()) and bool(torch.isfinite(result.B).all())
    assert output_loss(W, result.A @ result.B, X) >= swift_loss(W, X, 6) * (1 - 1e-9)


def svd_llm_released_code(W: Tensor, G32: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """SVDLLM.py's profle_svdllm + whitening, transcribed line by line (no shift path: G is positive definite)."""
    raw_scaling_diag_matrix = G32.double()
    scaling_diag_matrix = torch.linalg.cholesky(raw_scaling_diag_matrix)
    scaling_matrix_inv = torch.linalg.inv(scaling_diag_matrix)
    scaling_diag_matrix = scaling_diag_matrix.float()
    scaling_matrix_inv = scaling_matrix_inv.float()
    W_scale = torch.matmul(W.float(), scaling_diag_matrix)
    U, S, VT = torch.linalg.svd(W_scale, full_matrices=False)
    truc_s, truc_u = S[:k], U[:, :k]
    truc_v = torch.matmul(VT[:k, :], scaling_matrix_inv)
    sqrtSigma = torch.sqrt(torch.diag(truc_s))
    return torch.matmul(truc_u, sqrtSigma), torch.matmul(sqrtSigma, truc_v)


def test_svd_llm_default_is_their_released_precisions() -> None:
    X = anisotropic_inputs(24, 200, seed=4)
    W = torch.randn(16, 24, generator=gen(5), dtype=F64)
    G = X @ X.T  # our float64 Gram; theirs is a float32 sum, emulated by rounding it to float32
    released = svd_llm_factors(W, G, 5)
    assert torch.equal(released.B, svd_llm_factors(W, G, 5, RELEASED).B)
    A_ref, B_ref = svd_llm_released_code(W, G.float(), 5)
    assert released.A.dtype == torch.float32 and released.B.dtype == torch.float32
    torch.testing.assert_close(released.A @ released.B, A_ref @ B_ref, rtol=0, atol=0)
    # float32 costs it accuracy that float64 whitening (and Swift-SVD) does not lose, on inputs spanning 3 decades
    optimum = swift_loss(W, X, 5)
    fp64 = svd_llm_factors(W, G, 5, FLOAT64)
    assert abs(output_loss(W, fp64.A @ fp64.B, X) - optimum) < 1e-12 * optimum
    assert output_loss(W, (released.A @ released.B).double(), X) - optimum > 1e-9 * optimum


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
