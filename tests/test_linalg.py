"""Known-answer and optimality tests of the Swift-SVD math core, checked against independent computations.

The reference for optimality is Eckart–Young on Y = W X itself (torch.linalg.svdvals(W @ X)), which never
forms a Gram, so it shares no code path (and no squaring of the condition number) with the method.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from swiftsvd_cli.core.grams import accumulate_gram, make_empty_gram, symmetric_from_upper
from swiftsvd_cli.core.linalg import (
    SVD_PRECISION,
    break_even_rank,
    effective_rank,
    eigenbasis,
    expand_basis,
    factorize,
    gram_sqrt,
    group_eigenbases,
    normalized_effective_rank,
    output_gram_eigenbasis,
    predicted_loss,
    uniform_rank,
)

F64 = torch.float64
SHAPES = [(24, 40), (40, 24)]  # m <= n (eigh of C) and m > n (the n x n route)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ill_conditioned_inputs(n: int, N: int, seed: int, decades: float = 8.0) -> Tensor:
    """X = Q1 diag(logspace(0, -decades)) Q2ᵀ, (n, N) with N ≥ n: condition number 10**decades."""
    g = gen(seed)
    Q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(N, n, generator=g, dtype=F64))
    X: Tensor = Q1 @ torch.diag(torch.logspace(0, -decades, n, dtype=F64)) @ Q2.T
    return X


def gram_of(X: Tensor) -> Tensor:
    """G = X Xᵀ accumulated batch by batch as the calibration stage would (tokens are columns of X)."""
    G = make_empty_gram(X.shape[0])
    for start in range(0, X.shape[1], 37):  # uneven batches
        accumulate_gram(G, X[:, start : start + 37].T)
    return symmetric_from_upper(G)


def output_loss(W: Tensor, A: Tensor, B: Tensor, X: Tensor) -> float:
    return float(((W @ X - A @ (B @ X)) ** 2).sum())


def eckart_young(W: Tensor, X: Tensor, k: int) -> float:
    s = torch.linalg.svdvals(W @ X)
    return float((s[k:] ** 2).sum())


def test_accumulate_gram_matches_direct_product_and_counts_tokens() -> None:
    x = torch.randn(3, 5, 8, generator=gen(0))  # (batch, seq, n) float32, as a hook sees it
    G = make_empty_gram(8)
    assert accumulate_gram(G, x[:2]) == 10
    assert accumulate_gram(G, x[2:].to(torch.bfloat16)) == 5
    flat = torch.cat([x[:2].reshape(-1, 8).double(), x[2:].to(torch.bfloat16).reshape(-1, 8).double()])
    assert G.dtype == F64
    torch.testing.assert_close(G, flat.T @ flat, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        accumulate_gram(G, torch.randn(4, 7))


def test_rank_formulas() -> None:
    assert break_even_rank(4096, 4096) == 2048
    assert break_even_rank(11008, 4096) == 11008 * 4096 // 15104
    assert uniform_rank(4096, 4096, 0.6) == 1228
    assert uniform_rank(100, 100, 0.29) == 14  # 50 * 0.29 = 14.499..., no off-by-one from decimal ratios
    assert uniform_rank(50, 50, 0.58) == 14  # 25 * 0.58 = 14.499999999999998 in floating point
    assert uniform_rank(200, 200, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 must not floor to 28


@pytest.mark.parametrize("m,n", SHAPES)
def test_optimal_on_ill_conditioned_inputs(m: int, n: int) -> None:
    X = ill_conditioned_inputs(n, 200, seed=1)
    assert torch.linalg.cond(X) >= 1e8 * (1 - 1e-6)
    W = torch.randn(m, n, generator=gen(2), dtype=F64)
    basis = eigenbasis(W, gram_of(X), k=min(m, n))
    curve = predicted_loss(basis.eigenvalues)
    total = float(curve[0])
    for k in (1, 3, 5, 8):  # tails well above the rounding floor of the Gram (~dim · eps · λ₁)
        A, B = factorize(W, basis.vectors, k)
        best = eckart_young(W, X, k)
        assert abs(output_loss(W, A, B, X) - best) < 1e-8 * best
        assert abs(float(curve[k]) - best) < 1e-8 * best
    for k in range(min(m, n) + 1):  # every rank: optimal to rounding relative to the total energy
        A, B = factorize(W, basis.vectors, k)
        best = eckart_young(W, X, k)
        assert abs(output_loss(W, A, B, X) - best) < 1e-12 * total
        assert abs(float(curve[k]) - best) < 1e-12 * total


@pytest.mark.parametrize("m,n", SHAPES)
def test_eigenbasis_contract(m: int, n: int) -> None:
    X = ill_conditioned_inputs(n, 100, seed=3)
    W = torch.randn(m, n, generator=gen(4), dtype=F64)
    basis = eigenbasis(W, gram_of(X))
    k = break_even_rank(m, n)
    assert basis.eigenvalues.shape == (min(m, n),) and basis.vectors.shape == (m, k)
    assert basis.eigenvalues.dtype == F64 and basis.vectors.dtype == F64
    assert bool((basis.eigenvalues[:-1] >= basis.eigenvalues[1:]).all())
    assert bool((basis.eigenvalues >= 0).all())
    torch.testing.assert_close(basis.vectors.T @ basis.vectors, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        eigenbasis(W, gram_of(X), k=min(m, n) + 1)


def test_n_by_n_route_equals_output_gram_route() -> None:
    """m > n: eigh(Mᵀ M) with M = W S gives the eigenvalues and top subspaces of C = W G Wᵀ."""
    m, n = 40, 24
    X = torch.randn(n, 300, generator=gen(5), dtype=F64)
    W = torch.randn(m, n, generator=gen(6), dtype=F64)
    G = gram_of(X)
    lam_C, U_C = torch.linalg.eigh(W @ G @ W.T)  # (m,), (m, m) ascending; the paper's route, output Gram
    lam_C, U_C = lam_C.flip(0), U_C.flip(1)
    basis = eigenbasis(W, G, k=n)
    torch.testing.assert_close(basis.eigenvalues, lam_C[:n], rtol=1e-10, atol=1e-10 * float(lam_C[0]))
    assert float(lam_C[n:].abs().max()) < 1e-10 * float(lam_C[0])  # C has rank n: nothing lost
    for k in (1, 5, 12):
        P_ref = U_C[:, :k] @ U_C[:, :k].T
        P = basis.vectors[:, :k] @ basis.vectors[:, :k].T
        torch.testing.assert_close(P, P_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("tokens", [300, 10])  # full-rank G, and fewer tokens than k (zero-energy completion)
def test_compact_basis_rebuilds_the_eigenvectors(tokens: int) -> None:
    """m > n: vectors[:, :p] = W @ coefficients exactly; a float32 copy of the n-row coefficients (what the eigen
    shard stores instead of the m-row vectors) rebuilds them to float32 accuracy and keeps them orthonormal."""
    m, n = 40, 24
    X = torch.randn(n, tokens, generator=gen(25), dtype=F64)
    W = torch.randn(m, n, generator=gen(26), dtype=F64)
    basis = eigenbasis(W, gram_of(X))
    assert basis.coefficients is not None
    p = basis.coefficients.shape[1]
    k = basis.vectors.shape[1]
    assert p == min(k, tokens)
    torch.testing.assert_close(W @ basis.coefficients, basis.vectors[:, :p], rtol=0, atol=1e-12)
    U = expand_basis(W, basis.coefficients.float(), basis.vectors[:, p:].float())
    assert U.shape == (m, k) and U.dtype == F64
    assert float((U - basis.vectors).abs().max()) < 1e-5
    assert float((U.T @ U - torch.eye(k, dtype=F64)).abs().max()) < 1e-5
    assert eigenbasis(torch.randn(24, 40, dtype=F64), gram_of(torch.randn(40, 99, dtype=F64))).coefficients is None


def test_output_gram_eigenbasis_equals_the_input_gram_route() -> None:
    """m ≤ n: decomposing an accumulated C = W G Wᵀ is the same computation as forming it from G."""
    m, n = 24, 40
    X = torch.randn(n, 300, generator=gen(27), dtype=F64)
    W = torch.randn(m, n, generator=gen(28), dtype=F64)
    G = gram_of(X)
    direct = eigenbasis(W, G)
    from_C = output_gram_eigenbasis(W @ G @ W.T, n)
    torch.testing.assert_close(from_C.eigenvalues, direct.eigenvalues, rtol=0, atol=0)
    torch.testing.assert_close(from_C.vectors, direct.vectors, rtol=0, atol=0)


@pytest.mark.parametrize("m,n", SHAPES)
def test_rank_deficient_gram(m: int, n: int) -> None:
    """Fewer tokens than features plus a dead input channel: Cholesky fails, the eigenbasis does not."""
    N = 10
    X = torch.randn(n, N, generator=gen(7), dtype=F64)
    X[0] = 0.0  # a channel that is never active: G has an exact zero row
    G = gram_of(X)
    with pytest.raises(RuntimeError, match="positive-definite"):
        torch.linalg.cholesky(G)
    W = torch.randn(m, n, generator=gen(8), dtype=F64)
    basis = eigenbasis(W, G)
    k_max = break_even_rank(m, n)
    assert k_max > N  # so zero-eigenvalue directions are requested
    assert bool(torch.isfinite(basis.vectors).all()) and bool(torch.isfinite(basis.eigenvalues).all())
    assert int((basis.eigenvalues > 0).sum()) == N
    torch.testing.assert_close(basis.vectors.T @ basis.vectors, torch.eye(k_max, dtype=F64), rtol=0, atol=1e-12)
    total = float(predicted_loss(basis.eigenvalues)[0])
    for k in (1, 4, N - 1, N, k_max):
        A, B = factorize(W, basis.vectors, k)
        assert abs(output_loss(W, A, B, X) - eckart_young(W, X, k)) < 1e-12 * total


@pytest.mark.parametrize("m,n", SHAPES)
def test_low_rank_weight_recovered_exactly(m: int, n: int) -> None:
    r = 5
    g = gen(9)
    W = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    X = torch.randn(n, 200, generator=g, dtype=F64)  # full-rank inputs: W' X = W X forces W' = W
    basis = eigenbasis(W, gram_of(X))
    A, B = factorize(W, basis.vectors, r)
    torch.testing.assert_close(A @ B, W, rtol=0, atol=1e-10)
    assert float(basis.eigenvalues[r:].abs().max()) == 0.0  # noise-level eigenvalues are exactly zero
    assert float(predicted_loss(basis.eigenvalues)[r]) == 0.0


def test_gram_sqrt_is_symmetric_psd_root_even_when_singular() -> None:
    X = torch.randn(12, 5, generator=gen(10), dtype=F64)  # rank 5 of 12
    G = gram_of(X)
    S = gram_sqrt(G)
    torch.testing.assert_close(S, S.T, rtol=0, atol=0)
    torch.testing.assert_close(S @ S, G, rtol=0, atol=1e-12 * float(G.abs().max()))
    assert float(torch.linalg.eigvalsh(S).min()) > -1e-7


def test_group_shares_one_root_and_matches_single_modules() -> None:
    n = 16
    G = gram_of(torch.randn(n, 64, generator=gen(11), dtype=F64))
    weights = {
        "gate": torch.randn(30, n, generator=gen(12)),
        "up": torch.randn(30, n, generator=gen(13)),
        "q": torch.randn(8, n, generator=gen(14)),
    }
    group = group_eigenbases(weights, G, ks={"q": 2})
    assert group["q"].vectors.shape == (8, 2) and group["gate"].vectors.shape == (30, break_even_rank(30, n))
    for name, W in weights.items():
        single = eigenbasis(W, G, k=group[name].vectors.shape[1])
        torch.testing.assert_close(group[name].eigenvalues, single.eigenvalues, rtol=0, atol=0)


def test_float32_precision_runs_the_same_algorithm() -> None:
    m, n = 40, 24
    X = torch.randn(n, 200, generator=gen(15), dtype=F64)
    W = torch.randn(m, n, generator=gen(16), dtype=F64)
    basis = eigenbasis(W, gram_of(X), precision=torch.float32)
    assert basis.vectors.dtype == torch.float32 and SVD_PRECISION == F64
    A, B = factorize(W, basis.vectors, 6)
    best = eckart_young(W, X, 6)
    assert abs(output_loss(W, A.double(), B.double(), X) - best) < 1e-4 * best


def test_predicted_loss_curve() -> None:
    lam = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=F64)
    torch.testing.assert_close(predicted_loss(lam), torch.tensor([7.0, 3.0, 1.0, 0.0, 0.0], dtype=F64))


def test_effective_rank_known_answers() -> None:
    assert effective_rank(torch.full((7,), 3.0, dtype=F64)) == pytest.approx(7.0, rel=1e-12)
    assert normalized_effective_rank(torch.full((7,), 3.0, dtype=F64), 7) == pytest.approx(1.0, rel=1e-12)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0], dtype=F64)) == pytest.approx(1.0, rel=1e-12)
    assert effective_rank(torch.zeros(3, dtype=F64)) == 0.0
    # σ = √λ = (2, 1, 1): p = (1/2, 1/4, 1/4), H = 1.5 ln 2 (a σ² weighting would give a different value)
    assert effective_rank(torch.tensor([4.0, 1.0, 1.0], dtype=F64)) == pytest.approx(math.exp(1.5 * math.log(2)))


def test_ner_divides_by_d_out_also_when_the_spectrum_is_shorter() -> None:
    """NER = erank(σ(Y)) / d_out, σ(Y) all d_out singular values of Y = W X: measured from an SVD of Y itself."""
    for m, n in ((6, 10), (12, 5)):  # m > n: the eigen shard holds n eigenvalues, Y has m singular values
        W = torch.randn(m, n, generator=torch.Generator().manual_seed(m), dtype=F64)
        X = torch.randn(n, 50, generator=torch.Generator().manual_seed(n), dtype=F64)
        sigma = torch.linalg.svdvals(W @ X)  # (m,), zeros beyond rank n
        p = sigma / sigma.sum()
        p = p[p > 0]
        expected = math.exp(float(-(p * p.log()).sum())) / m
        basis = eigenbasis(W, X @ X.T)
        assert basis.eigenvalues.numel() == min(m, n)
        assert normalized_effective_rank(basis.eigenvalues, m) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        normalized_effective_rank(torch.ones(4, dtype=F64), 3)
