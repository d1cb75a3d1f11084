"""Pure math of Swift-SVD: the optimal eigenbasis of C = W G Wᵀ, factors and loss curves (Grams: core.grams).

Tensors in, tensors out: no files, no logging, no device choice (everything runs where its inputs live).
Notation follows the paper: W (m, n) a linear layer's weight (m = out, n = in features), G = Σ x xᵀ (n, n)
the Gram of its inputs, S = G^{1/2}, C = W G Wᵀ (m, m) the Gram of its outputs, U its eigenvectors.
For every rank k the optimum of min ‖W X − W' X‖_F over rank(W') ≤ k is W' = U_k U_kᵀ W and its error
is the eigenvalue tail Σ_{i>k} λ_i, so one eigendecomposition serves every rank and every ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

SVD_PRECISION = torch.float64
"""Precision of every decomposition. float64 because C = W G Wᵀ squares the condition number of W X."""

RANK_FLOOR_SLACK = 1e-9
"""Added before flooring a rank so that decimal ratios (0.29 · 100 = 28.999999999999996) floor as meant."""


def break_even_rank(m: int, n: int) -> int:
    """floor(m n / (m + n)): a factorisation of this rank or more has at least as many parameters as W."""
    return (m * n) // (m + n)


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """The paper's uniform rank floor(m n / (m + n) · ratio) for a kept-parameter ratio."""
    return max(0, math.floor(m * n / (m + n) * ratio + RANK_FLOOR_SLACK))


def check_rank(m: int, n: int, k: int) -> None:
    """A rank-k factorisation of an (m, n) weight needs 0 <= k <= min(m, n)."""
    if not 0 <= k <= min(m, n):
        raise ValueError(f"rank {k} outside [0, {min(m, n)}] for a {m} x {n} weight")


def _symmetric(A: Tensor) -> Tensor:
    """(A + Aᵀ)/2: eigh reads one triangle only, so make rounding asymmetry harmless and explicit."""
    return (A + A.T) * 0.5


def gram_sqrt(G: Tensor, precision: torch.dtype = SVD_PRECISION) -> Tensor:
    """The symmetric PSD square root S = Q diag(√max(g, 0)) Qᵀ of G, (n, n).

    Unlike a Cholesky factor it exists for every PSD G, including rank-deficient ones (fewer tokens than
    features) and ones that rounding made slightly indefinite. Compute it once per input group.
    """
    g, Q = torch.linalg.eigh(_symmetric(G.to(dtype=precision)))  # (n,), (n, n)
    return _symmetric((Q * g.clamp_min(0).sqrt()) @ Q.T)  # exactly symmetric, for downstream eigh


@dataclass(frozen=True)
class Eigenbasis:
    """Spectrum of C = W G Wᵀ: all eigenvalues and the top-k eigenvectors, enough for every rank ≤ k.

    For m > n, `coefficients` (n, p) give the first p eigenvectors as vectors[:, :p] = W @ coefficients (the
    energy-carrying directions lie in W's column space): a cache can store these n-row coefficients and the
    k − p zero-energy columns instead of the m-row vectors, and rebuild them with `expand_basis`.
    """

    eigenvalues: Tensor  # (min(m, n),) descending, ≥ 0, noise-level ones set to 0
    vectors: Tensor  # (m, k) orthonormal columns, the top-k eigenvectors of C
    coefficients: Tensor | None = None  # (n, p), p ≤ k: vectors[:, :p] = W @ coefficients (m > n only)


def _zero_noise(lam: Tensor, dim: int) -> Tensor:
    """Set eigenvalues below dim · eps · λ₁ (rounding noise of forming C) and negative ones to exactly 0."""
    if lam.numel() == 0:
        return lam
    tol = dim * torch.finfo(lam.dtype).eps * lam[0].clamp_min(0)
    return torch.where(lam > tol, lam, torch.zeros_like(lam))


def _orthonormal_columns(U: Tensor) -> tuple[Tensor, Tensor]:
    """U = Q T with diag(T) ≥ 0: Q keeps every leading span of U (so every prefix U_k stays optimal) and
    restores exact orthonormality that dividing by small √λ erodes; T (k, k) upper triangular."""
    Q, R = torch.linalg.qr(U)
    d = torch.sign(torch.diagonal(R))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d, d[:, None] * R  # (m, k), (k, k)


def _top_eigenpairs(C: Tensor, k: int, dim: int) -> Eigenbasis:
    """All eigenvalues (descending, noise zeroed at dim · eps · λ₁) and the top-k eigenvectors of symmetric C."""
    lam, Q = torch.linalg.eigh(_symmetric(C))  # ascending
    lam = _zero_noise(lam.flip(0), dim)
    return Eigenbasis(eigenvalues=lam, vectors=Q.flip(1)[:, :k].contiguous())


def output_gram_eigenbasis(
    C: Tensor, n: int, k: int | None = None, precision: torch.dtype = SVD_PRECISION
) -> Eigenbasis:
    """`eigenbasis` of an (m, n) module whose output Gram C = W G Wᵀ (m, m) was accumulated directly (m ≤ n)."""
    m = C.shape[0]
    k = break_even_rank(m, n) if k is None else k
    check_rank(m, n, k)
    return _top_eigenpairs(C.to(dtype=precision), k, max(m, n))


def expand_basis(W: Tensor, coefficients: Tensor, completion: Tensor) -> Tensor:
    """The (m, k) eigenvectors [W @ coefficients, completion] of a compact m > n eigenbasis, in W's dtype."""
    return torch.cat([W @ coefficients.to(dtype=W.dtype, device=W.device), completion.to(W)], dim=1)


def eigenbasis(
    W: Tensor,
    G: Tensor,
    k: int | None = None,
    S: Tensor | None = None,
    precision: torch.dtype = SVD_PRECISION,
) -> Eigenbasis:
    """Eigenvalues and top-k eigenvectors of C = W G Wᵀ, the optimal rank-k subspaces for W under inputs G.

    k defaults to break_even_rank(m, n), the largest rank ever worth factoring. If m ≤ n, C (m, m) is
    decomposed directly. If m > n the work stays n × n: M = W S with S = G^{1/2} (pass S to share it
    across the modules of one input group), eigh(Mᵀ M) = V Λ Vᵀ has C's nonzero eigenvalues and
    U_k = M V_k Λ_k^{-1/2}.
    Directions with zero eigenvalue (rank-deficient W or G) carry no output energy; they get an orthonormal
    completion, so the factors are always finite and A = U_k orthonormal.
    """
    m, n = W.shape
    k = break_even_rank(m, n) if k is None else k
    check_rank(m, n, k)
    W_ = W.to(dtype=precision)  # (m, n)
    if m <= n:
        return _top_eigenpairs(W_ @ G.to(dtype=precision) @ W_.T, k, max(m, n))  # C is (m, m)
    S_ = gram_sqrt(G, precision) if S is None else S.to(dtype=precision)  # (n, n)
    M = W_ @ S_  # (m, n), M Mᵀ = C
    lam, V = torch.linalg.eigh(_symmetric(M.T @ M))  # (n,), (n, n)
    del M
    lam = _zero_noise(lam.flip(0), max(m, n))
    lam_k = lam[:k]
    p = int((lam_k > 0).sum())  # a prefix: eigenvalues are descending
    R = (S_ @ V.flip(1)[:, :p]) / lam_k[:p].sqrt()  # (n, p): U_p = M V_p Λ_p^{-1/2} = W R
    # Zero-energy directions: any orthonormal completion is optimal; a fixed seed keeps runs reproducible.
    fill = torch.randn(m, k - p, generator=torch.Generator().manual_seed(0), dtype=precision).to(W_.device)
    U, T = _orthonormal_columns(torch.cat([W_ @ R, fill], dim=1))  # (m, k), (k, k)
    # U[:, :p] = (W R) T_pp⁻¹ since T is upper triangular: the coefficients of the orthonormalised vectors.
    coefficients = torch.linalg.solve_triangular(T[:p, :p], R, upper=True, left=False)  # (n, p)
    return Eigenbasis(eigenvalues=lam, vectors=U, coefficients=coefficients)


def group_eigenbases(
    weights: Mapping[str, Tensor],
    G: Tensor,
    ks: Mapping[str, int] | None = None,
    precision: torch.dtype = SVD_PRECISION,
) -> dict[str, Eigenbasis]:
    """Eigenbases of all modules reading one input (q/k/v or gate/up), sharing one S = G^{1/2}.

    S is computed only if some module has m > n, and then only once for the whole group.
    """
    S: Tensor | None = None
    out: dict[str, Eigenbasis] = {}
    for name, W in weights.items():
        if W.shape[0] > W.shape[1] and S is None:
            S = gram_sqrt(G, precision)
        k = None if ks is None else ks.get(name)
        out[name] = eigenbasis(W, G, k=k, S=S, precision=precision)
    return out


def factorize(W: Tensor, U: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A = U_k (m, k), B = U_kᵀ W (k, n), in U's precision: W' = A B = U_k U_kᵀ W. The caller casts."""
    if not 0 <= k <= U.shape[1]:
        raise ValueError(f"rank {k} outside [0, {U.shape[1]}] available eigenvectors")
    A = U[:, :k]  # (m, k)
    B = A.T @ W.to(dtype=U.dtype, device=U.device)  # (k, n)
    return A.contiguous(), B


def predicted_loss(eigenvalues: Tensor) -> Tensor:
    """(len + 1,) loss curve: entry k = Σ_{i>k} λ_i = min ‖W X − W_k X‖²_F; entry 0 is the total energy.

    Summed from the small end (reverse cumsum) so that small tails keep their relative accuracy.
    """
    lam = eigenvalues.to(dtype=torch.float64).clamp_min(0)
    tail = lam.flip(0).cumsum(0).flip(0)  # (len,)
    return torch.cat([tail, tail.new_zeros(1)])


def loss_at_rank(eigenvalues: Tensor, k: int) -> float:
    """Σ_{i>k} λ_i, the minimal ‖W X − W_k X‖²_F at rank k (0 once k covers the whole spectrum)."""
    curve = predicted_loss(eigenvalues)  # (len + 1,)
    return float(curve[min(k, curve.numel() - 1)])


def effective_rank(eigenvalues: Tensor) -> float:
    """Roy & Vetterli effective rank exp(H(p)) with p_i = σ_i / Σ σ, σ = √λ (singular values of Y = W X).

    Lies in [1, len] for a nonzero spectrum; 0.0 for an all-zero one.
    """
    sigma = eigenvalues.to(dtype=torch.float64).clamp_min(0).sqrt()
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]  # 0 · ln 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def normalized_effective_rank(eigenvalues: Tensor, d_out: int) -> float:
    """The paper's NER: effective rank / d_out, the number of singular values of the output Y = W X (m × N).

    For m > n (gate/up) the stored spectrum has only n entries (rank(Y) ≤ n); the missing m − n singular
    values are zero and add nothing to the effective rank, but they count in the denominator.
    """
    if d_out < eigenvalues.numel():
        raise ValueError(f"d_out {d_out} is smaller than the {eigenvalues.numel()} eigenvalues given")
    return effective_rank(eigenvalues) / d_out if d_out else 0.0
