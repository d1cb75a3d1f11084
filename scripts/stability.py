"""The paper's numerical-stability experiment (Table 5): FP32 Swift-SVD and SVD-LLM against the exact minimum.

For a random weight W (d, d) and inputs X (d, N), every method computes a rank-k W' in float32 from the same
float32 Gram G = X Xᵀ; its reconstruction loss ‖W X − W' X‖_F is then measured in float64, and compared with
the exact minimum (Eckart–Young: the float64 singular values of Y = W X beyond k). The paper does not say how
its X is drawn, so three settings are reported: `gaussian` (square standard-normal W and X, like the paper's
"128²" sizes), `ill-conditioned` (X with singular values log-spaced over `ILL_CONDITION`, i.e. cond(G) =
ILL_CONDITION², beyond float32's 1/eps, as activations with outlier channels are) and `rank-deficient`
(d/2 tokens of scale `SMALL_SCALE`: G is singular, FP32 Cholesky fails and SVD-LLM's *absolute* 1e-6 shift
is no longer small next to G's eigenvalues).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from swiftsvd_cli.core.baselines import RELEASED, SVDLLMPrecisions, svd_llm_factors
from swiftsvd_cli.core.linalg import eigenbasis, factorize, uniform_rank

FP32 = torch.float32
ALL_FP32 = SVDLLMPrecisions(gram=FP32, cholesky=FP32, svd=FP32)
"""The paper's Table 5 runs every step of SVD-LLM in FP32."""
SETTINGS = ("gaussian", "ill-conditioned", "rank-deficient")
ILL_CONDITION = 1e4
"""cond(X) of the ill-conditioned setting: cond(G) = 1e8 > 1/eps(float32) ≈ 1.7e7, where FP32 Cholesky breaks."""

SMALL_SCALE = 1e-3
"""Entry scale of the rank-deficient setting's X: G's eigenvalues are then ~1e-6 · d, SVD-LLM's shift size."""

PAPER_TABLE5: dict[int, tuple[float, float]] = {
    128: (126.25, 0.46),
    1024: (841.18, 13.23),
    2048: (1657.48, 28.70),
    4096: (3308.64, 57.01),
}
"""The paper's Table 5, size -> (minimum loss, SVD-LLM's loss above it); Swift-SVD's gap there is 0."""


@dataclass(frozen=True)
class StabilityRow:
    """One (setting, size): the exact minimum and each method's loss above it (float64 evaluation)."""

    setting: str
    size: int  # W is (size, size), X is (size, tokens)
    tokens: int
    rank: int
    gram_condition: float  # cond(G) in float64 (inf when G is singular)
    minimum: float  # min ‖W X − W' X‖_F over rank(W') ≤ k, float64 SVD of Y
    swift_gap: float  # Swift-SVD (eigh of W G Wᵀ in FP32) loss − minimum
    svd_llm_gap: float | None  # SVD-LLM (Cholesky, inverse, SVD all in FP32) loss − minimum; None: it failed
    svd_llm_shifted: bool  # FP32 Cholesky failed, G was shifted as SVD-LLM does
    svd_llm_failed: bool  # Cholesky failed even after the shift (SVD-LLM's "not positive-definite" error)
    svd_llm_mixed_gap: float | None  # SVD-LLM as their code runs it: Gram FP32, Cholesky + inverse float64, SVD FP32
    paper_minimum: float | None
    paper_svd_llm_gap: float | None

    @property
    def swift_relative(self) -> float:
        return self.swift_gap / self.minimum if self.minimum > 0 else 0.0

    @property
    def svd_llm_relative(self) -> float | None:
        if self.svd_llm_gap is None:
            return None
        return self.svd_llm_gap / self.minimum if self.minimum > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"swift_relative": self.swift_relative, "svd_llm_relative": self.svd_llm_relative}


def random_problem(size: int, setting: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(W, X) in float32, W (size, size), X (size, N): the values every method starts from."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting '{setting}': use one of {', '.join(SETTINGS)}")
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(size, size, generator=generator, dtype=torch.float64)  # (d, d)
    if setting == "gaussian":
        X = torch.randn(size, size, generator=generator, dtype=torch.float64)  # (d, N = d)
    elif setting == "rank-deficient":
        X = torch.randn(size, size // 2, generator=generator, dtype=torch.float64) * SMALL_SCALE  # (d, N = d/2)
    else:
        Q1, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        Q2, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        s = torch.logspace(0, -math.log10(ILL_CONDITION), size, dtype=torch.float64) * math.sqrt(size)
        X = (Q1 * s) @ Q2.T  # (d, N = d), singular values s
    return W.to(FP32), X.to(FP32)


def loss(W: Tensor, W_approx: Tensor, X: Tensor) -> float:
    """‖(W − W') X‖_F in float64, so that measuring adds no error of its own."""
    return float(torch.linalg.matrix_norm((W.double() - W_approx.double()) @ X.double()))


def minimum_loss(W: Tensor, X: Tensor, k: int) -> float:
    """Eckart–Young: √(Σ_{i>k} σ_i²) of Y = W X, from a float64 SVD (the exact reference)."""
    sigma = torch.linalg.svdvals(W.double() @ X.double())
    return float(sigma[k:].pow(2).sum().sqrt())


def swift_fp32(W: Tensor, G: Tensor, k: int) -> Tensor:
    """Swift-SVD in FP32: eigh of C = W G Wᵀ, W' = U_k U_kᵀ W."""
    basis = eigenbasis(W, G, k=k, precision=FP32)
    A, B = factorize(W, basis.vectors, k)
    return A @ B


def svd_llm_fp32(W: Tensor, G: Tensor, k: int, precisions: SVDLLMPrecisions = ALL_FP32) -> tuple[Tensor | None, bool]:
    """SVD-LLM's W' = A B from the FP32 Gram, with its SVD in FP32 and its Cholesky + inverse as `precisions` say.

    Returns (None, True) when Cholesky fails even on the shifted G: in FP32 the shift −λ_min + 1e-6 is
    rounded away next to large eigenvalues, which is SVD-LLM's reported "not positive-definite" failure.
    """
    try:
        result = svd_llm_factors(W, G, k, precisions)
    except RuntimeError:  # torch.linalg.LinAlgError (a RuntimeError; the stubs do not export it)
        return None, True
    return result.A @ result.B, result.shifted


def _gap(W: Tensor, W_approx: Tensor | None, X: Tensor, minimum: float) -> float | None:
    return None if W_approx is None else loss(W, W_approx, X) - minimum


def stability_row(size: int, setting: str, ratio: float = 0.6, seed: int = 0) -> StabilityRow:
    """One row of Table 5: all methods on one random problem, rank = the paper's ⌊d²/(2d) · ρ⌋."""
    W, X = random_problem(size, setting, seed)
    k = uniform_rank(size, size, ratio)
    G = X @ X.T  # (d, d), formed in FP32 like everything else the methods see
    minimum = minimum_loss(W, X, k)
    svd_llm, shifted = svd_llm_fp32(W, G, k)
    mixed, _ = svd_llm_fp32(W, G, k, RELEASED)
    paper = PAPER_TABLE5.get(size)
    return StabilityRow(
        setting=setting,
        size=size,
        tokens=int(X.shape[1]),
        rank=k,
        gram_condition=float(torch.linalg.cond(X.double() @ X.double().T)),
        minimum=minimum,
        swift_gap=loss(W, swift_fp32(W, G, k), X) - minimum,
        svd_llm_gap=_gap(W, svd_llm, X, minimum),
        svd_llm_shifted=shifted,
        svd_llm_failed=svd_llm is None,
        svd_llm_mixed_gap=_gap(W, mixed, X, minimum),
        paper_minimum=paper[0] if paper and setting == "gaussian" else None,
        paper_svd_llm_gap=paper[1] if paper and setting == "gaussian" else None,
    )


def stability_table(
    sizes: Iterable[int], settings: Iterable[str] = SETTINGS, ratio: float = 0.6, seed: int = 0
) -> list[StabilityRow]:
    """Every (setting, size) row, in that order."""
    return [stability_row(size, setting, ratio, seed) for setting in settings for size in sizes]
