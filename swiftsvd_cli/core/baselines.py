"""Reference factorisations at the same ranks as Swift-SVD, for comparison: plain SVD, ASVD and SVD-LLM.

Each returns (A, B) with W' = A B, A (m, k), B (k, n), in its working precision; the caller casts.
Ranks always come from the caller (a plan): a uniform plan gives SVD-LLM its own ranks ⌊m n ρ / (m + n)⌋;
ASVD's sensitivity-based rank search is not reproduced (ASVD here = its scaling at the plan's ranks).
All three split the singular values as A = U_k √Σ_k, B = √Σ_k V_kᵀ (as ASVD and SVD-LLM do), which balances
the two factors' ranges for half-precision storage; W' is the same for any split. These are baselines: their
numerics are kept as their authors wrote them (Cholesky, shift, explicit inverse, precisions), not fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from swiftsvd_cli.core.linalg import SVD_PRECISION, check_rank

ASVD_EPS = 1e-6
"""ASVD adds this to its scaling vector so that channels that were never active do not divide by zero."""

SVD_LLM_SHIFT = 1e-6
"""SVD-LLM's shift: a non-positive-definite G is moved so that its smallest eigenvalue becomes this."""


def _split_truncated(U: Tensor, sigma: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A = U_k √Σ_k (m, k), B = √Σ_k V_kᵀ (k, n) from a thin SVD."""
    root = sigma[:k].sqrt()  # (k,)
    return U[:, :k] * root, root[:, None] * Vh[:k]


def svd_factors(W: Tensor, k: int, precision: torch.dtype = SVD_PRECISION) -> tuple[Tensor, Tensor]:
    """Truncated SVD of W alone: minimises ‖W − W'‖_F but ignores the inputs (activation-unaware)."""
    check_rank(W.shape[0], W.shape[1], k)
    U, sigma, Vh = torch.linalg.svd(W.to(dtype=precision), full_matrices=False)  # (m, r), (r,), (r, n)
    return _split_truncated(U, sigma, Vh, k)


def asvd_scaling(mean_abs_x: Tensor, alpha: float = 0.5, precision: torch.dtype = SVD_PRECISION) -> Tensor:
    """ASVD's per-input-channel scale s = mean|x|^α + 1e-6, (n,)."""
    return mean_abs_x.to(dtype=precision).clamp_min(0) ** alpha + ASVD_EPS


def asvd_factors(
    W: Tensor,
    mean_abs_x: Tensor,
    k: int,
    alpha: float = 0.5,
    precision: torch.dtype = SVD_PRECISION,
) -> tuple[Tensor, Tensor]:
    """ASVD (Yuan et al.): SVD of W diag(s), s = mean|x|^α per input channel, then B = √Σ_k V_kᵀ diag(1/s).

    A diagonal scaling only weights channels by their typical magnitude; it ignores input correlations,
    so it is not optimal for ‖W X − W' X‖ (Swift-SVD and SVD-LLM are).
    """
    check_rank(W.shape[0], W.shape[1], k)
    s = asvd_scaling(mean_abs_x, alpha, precision)  # (n,)
    U, sigma, Vh = torch.linalg.svd(W.to(dtype=precision) * s, full_matrices=False)
    A, B = _split_truncated(U, sigma, Vh, k)
    return A, B / s


@dataclass(frozen=True)
class SVDLLMPrecisions:
    """Where SVD-LLM's three steps run: the stored Gram, Cholesky + shift + inverse, and the SVD + factors."""

    gram: torch.dtype  # G is rounded to this before the Cholesky (their hooks accumulate it in float32)
    cholesky: torch.dtype
    svd: torch.dtype


RELEASED = SVDLLMPrecisions(gram=torch.float32, cholesky=torch.float64, svd=torch.float32)
"""SVD-LLM's released code (SVDLLM.py): hook Gram `inp.float()ᵀ inp` summed in float32, `.double()` Cholesky and
`torch.linalg.inv`, then `.float()` for W L, its SVD and the factors. `--method svd-llm`."""

FLOAT64 = SVDLLMPrecisions(gram=torch.float64, cholesky=torch.float64, svd=torch.float64)
"""Ours, not theirs: the same algorithm in float64 throughout (`--method svd-llm-fp64`). On a well-conditioned
Gram it equals Swift-SVD to rounding, since both are optimal."""


@dataclass(frozen=True)
class SVDLLMResult:
    """SVD-LLM's factors, and whether G had to be shifted for Cholesky to succeed (then it is not optimal)."""

    A: Tensor  # (m, k)
    B: Tensor  # (k, n)
    shifted: bool


def svd_llm_factors(W: Tensor, G: Tensor, k: int, precisions: SVDLLMPrecisions = RELEASED) -> SVDLLMResult:
    """SVD-LLM truncation-aware whitening (AIoT-MLSys-Lab/SVD-LLM): G = L Lᵀ, SVD of W L, B = √Σ_k V_kᵀ L⁻¹.

    If Cholesky fails, G is shifted by (−λ_min + 1e-6) I (eigvalsh) and Cholesky retried; if inverting L
    fails, 1e-6 I is added to L, exactly as their code does. `precisions` says where each step runs
    (default: their released code's). G arrives as our float64 sum and is rounded to `precisions.gram`:
    that reproduces the precision their Gram is *stored* in, not the extra rounding of their float32
    *accumulation* (each window's product and each running sum round again), so with `RELEASED` this is,
    if anything, slightly more accurate than their code.
    """
    check_rank(W.shape[0], W.shape[1], k)
    chol_dtype = precisions.cholesky
    G_ = G.to(dtype=precisions.gram).to(dtype=chol_dtype)  # (n, n)
    shifted = False
    L, info = torch.linalg.cholesky_ex(G_)
    if int(info) != 0:
        shifted = True
        lam_min = torch.linalg.eigvalsh(G_)[0]
        G_ = G_ + (-lam_min + SVD_LLM_SHIFT) * torch.eye(G_.shape[0], dtype=chol_dtype, device=G_.device)
        L = torch.linalg.cholesky(G_)  # (n, n) lower triangular
    L_inv, info = torch.linalg.inv_ex(L)
    if int(info) != 0:
        L = L + SVD_LLM_SHIFT * torch.eye(L.shape[0], dtype=chol_dtype, device=L.device)
        L_inv = torch.linalg.inv(L)
    L, L_inv = L.to(dtype=precisions.svd), L_inv.to(dtype=precisions.svd)
    U, sigma, Vh = torch.linalg.svd(W.to(dtype=precisions.svd) @ L, full_matrices=False)  # of W L, (m, n)
    A, B = _split_truncated(U, sigma, Vh[:k] @ L_inv, k)
    return SVDLLMResult(A=A, B=B, shifted=shifted)
