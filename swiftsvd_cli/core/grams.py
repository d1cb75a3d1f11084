"""Gram accumulation, pure math: G = Σ x xᵀ in float64, half the products, two precision routes, packed storage.

Calibration spends its time here, so three things keep it near the cost of a plain forward pass:
- only the upper triangle is computed (row panels `G[i:j, i:] += X[:, i:j]ᵀ X[:, i:]`, about half the products of
  a full `Xᵀ X`), and only the upper triangle is stored (`pack_upper`), since G is symmetric;
- a single-consumer input whose consumers' outputs are narrower (down_proj: 4096 outputs of 11008 inputs) keeps
  the output Gram `C = W G Wᵀ = Σ y yᵀ` instead (`output_gram_is_smaller`), which is all Swift-SVD needs;
- the products run in float64 (`"float64"`: every product exact, sums in float64, the stored Gram equals a float64
  reference to ~1e-15 relative) or in float32 over chunks of at most `CHUNK_TOKENS` tokens whose partial Grams are
  added in float64 (`"float32"`). Activations are float32/bfloat16 numbers, so every product x_i x_j is exact in
  float32 too; only the in-chunk sums round: |Ĝ_ij − G_ij| ≤ γ_c Σ_t |x_ti x_tj| ≤ γ_c √(G_ii G_jj),
  γ_c = c u / (1 − c u), u = 2⁻²⁴, c ≤ CHUNK_TOKENS (Higham, Accuracy and Stability, §3.1). Worst case 1.2e-4
  of the Cauchy–Schwarz scale; rounding errors of random sign make it ~√c u ≈ 3e-6; tests hold the route to 1e-6
  relative in Frobenius norm.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

GramPrecision = Literal["float64", "float32"]
GRAM_PRECISIONS: tuple[GramPrecision, ...] = ("float64", "float32")

CHUNK_TOKENS = 2048
"""Tokens per float32 partial Gram: bounds the float32 sums (error ∝ chunk length) while keeping each float64
addition of a partial Gram small next to its products (n² additions per chunk of 2048 n²/2 products)."""

PANELS, MIN_PANEL = 16, 128
"""At most 16 row panels of at least 128 rows: 53-61 % of a full product's work, each panel still a large GEMM."""


def make_empty_gram(n: int, device: torch.device | str = "cpu") -> Tensor:
    """A zero (n, n) float64 accumulator; float64 because sums over millions of tokens drift."""
    return torch.zeros(n, n, dtype=torch.float64, device=device)


def _panels(n: int) -> list[tuple[int, int]]:
    """Row panels [i, j) of an (n, n) matrix; the panel at i updates columns i.. only."""
    width = max(MIN_PANEL, -(-n // PANELS))
    return [(i, min(n, i + width)) for i in range(0, n, width)]


def accumulate_gram(G: Tensor, x: Tensor, precision: GramPrecision = "float64") -> int:
    """Add the upper triangle (and the diagonal panels) of xᵀ x to G in place; return the tokens (rows) added.

    x is (..., n) in any dtype, e.g. a (batch, seq, n) activation captured by a hook. G's strict lower triangle
    outside the diagonal panels is never touched: read G through `symmetric_from_upper` or `pack_upper`.
    """
    n = G.shape[0]
    if x.shape[-1] != n:
        raise ValueError(f"input has {x.shape[-1]} features, Gram is {n} x {n}")
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"unknown Gram precision {precision!r}: use {' or '.join(GRAM_PRECISIONS)}")
    X = x.reshape(-1, n).to(device=G.device)  # (N, n)
    if precision == "float64":
        chunks = [X.to(torch.float64)]
    else:
        X = X.to(torch.float32)
        chunks = list(torch.split(X, CHUNK_TOKENS))
    for chunk in chunks:
        for i, j in _panels(n):
            block = chunk[:, i:j].T @ chunk[:, i:]  # (j - i, n - i), in the chunk's precision
            G[i:j, i:] += block
    return int(X.shape[0])


def accumulate_output_gram(C: Tensor, x: Tensor, W: Tensor, precision: GramPrecision = "float64") -> int:
    """Add Σ (W x)(W x)ᵀ to the (m, m) accumulator C: the output Gram W G Wᵀ without ever forming the (n, n) G.

    W is (m, n) without bias. The products W x run in the route's precision (float64: exact products of the
    float32/bfloat16 inputs and weights, so C equals W G Wᵀ to float64 rounding).
    """
    dtype = torch.float64 if precision == "float64" else torch.float32
    X = x.reshape(-1, x.shape[-1]).to(device=C.device, dtype=dtype)  # (N, n)
    return accumulate_gram(C, X @ W.to(device=C.device, dtype=dtype).T, precision)


def all_finite(x: Tensor) -> bool:
    """Whether x holds no NaN or ±Inf, exactly, from its minimum and maximum (which carry any NaN or Inf).

    One fused reduction, several times faster than `isfinite(x).all()`, which writes a boolean per element.
    """
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def symmetric_from_upper(G: Tensor) -> Tensor:
    """The full symmetric matrix whose upper triangle is G's (what `accumulate_gram` leaves)."""
    upper = torch.triu(G)
    return upper + torch.triu(G, diagonal=1).T


def pack_upper(G: Tensor) -> Tensor:
    """The upper triangle of G, row by row, as a (n (n + 1) / 2,) vector: half the bytes of a symmetric G."""
    mask = torch.ones(G.shape, dtype=torch.bool, device=G.device).triu()
    return G.masked_select(mask)


def unpack_upper(packed: Tensor) -> Tensor:
    """The symmetric (n, n) matrix a `pack_upper` vector came from."""
    n = packed_size(packed.numel())
    mask = torch.ones(n, n, dtype=torch.bool, device=packed.device).triu()
    upper = torch.zeros(n, n, dtype=packed.dtype, device=packed.device).masked_scatter_(mask, packed)
    return upper + torch.triu(upper, diagonal=1).T


def packed_size(length: int) -> int:
    """n for a packed triangle of n (n + 1) / 2 entries; anything else is a corrupt artifact."""
    n = (int((8 * length + 1) ** 0.5) - 1) // 2
    if n * (n + 1) // 2 != length:
        raise ValueError(f"{length} entries are not the upper triangle of a square matrix")
    return n


def output_gram_is_smaller(n: int, outputs: tuple[int, ...]) -> bool:
    """Whether the output Grams of the modules reading one n-wide input (m_i × m_i each) take less room than G.

    True for a single consumer with m < n (down_proj); shared inputs (q/k/v, gate/up) keep their one G.
    """
    return sum(m * m for m in outputs) < n * n
