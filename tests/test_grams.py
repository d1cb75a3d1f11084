"""Gram accumulation against direct float64 products: triangle panels, packing, the output-Gram route, float32 bound."""

from __future__ import annotations

import math

import pytest
import torch

from swiftsvd_cli.core.grams import (
    CHUNK_TOKENS,
    accumulate_gram,
    accumulate_output_gram,
    all_finite,
    make_empty_gram,
    output_gram_is_smaller,
    pack_upper,
    packed_size,
    symmetric_from_upper,
    unpack_upper,
)
from swiftsvd_cli.core.linalg import eigenbasis, factorize

F64 = torch.float64


def activations(tokens: int, n: int, seed: int) -> torch.Tensor:
    """float32 activations shaped like an LLM's: a few outlier channels 100x larger, correlated features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / math.sqrt(n)
    x = torch.randn(tokens, n, generator=g) @ mix + 0.1 * torch.randn(tokens, n, generator=g)
    x[:, :3] *= 100.0
    return x.to(torch.float32)


def gram(x: torch.Tensor, precision: str, batch: int = 700) -> torch.Tensor:
    G = make_empty_gram(x.shape[-1])
    for start in range(0, x.shape[0], batch):  # uneven batches, as hooks see them
        accumulate_gram(G, x[start : start + batch], precision)  # type: ignore[arg-type]
    return symmetric_from_upper(G)


def test_float64_route_equals_direct_product_across_panels() -> None:
    x = activations(1500, 300, seed=0)  # 300 features: three row panels of 128
    reference = x.double().T @ x.double()
    G = make_empty_gram(300)
    assert accumulate_gram(G, x.view(3, 500, 300)) == 1500
    assert torch.count_nonzero(torch.tril(G, diagonal=-128)) == 0  # the lower triangle is never computed
    error = (symmetric_from_upper(G) - reference).norm() / reference.norm()
    assert error < 1e-13


def test_packing_round_trips_and_halves_the_bytes() -> None:
    G = gram(activations(200, 37, seed=1), "float64")
    packed = pack_upper(G)
    assert packed.numel() == 37 * 38 // 2 and packed.dtype == F64
    assert torch.equal(unpack_upper(packed), G)
    with pytest.raises(ValueError, match="upper triangle"):
        packed_size(10 * 11 // 2 + 1)


def test_output_gram_route_equals_w_g_wt() -> None:
    """Σ (W x)(W x)ᵀ accumulated directly equals W G Wᵀ formed from the input Gram, to 1e-10 relative."""
    x = activations(3000, 96, seed=2)
    W = (torch.randn(40, 96, generator=torch.Generator().manual_seed(3)) / 10).to(torch.float32)
    G = gram(x, "float64")
    expected = W.double() @ G @ W.double().T
    C = make_empty_gram(40)
    for start in range(0, 3000, 999):
        accumulate_output_gram(C, x[start : start + 999], W, "float64")
    assert (symmetric_from_upper(C) - expected).norm() / expected.norm() < 1e-10
    C32 = make_empty_gram(40)
    accumulate_output_gram(C32, x, W, "float32")
    assert (symmetric_from_upper(C32) - expected).norm() / expected.norm() < 1e-6


def test_float32_route_within_its_stated_bound() -> None:
    """float32 products on chunks of ≤ CHUNK_TOKENS, float64 sums: every entry within γ_c √(G_ii G_jj) (worst case,
    module docstring), and within 1e-6 relative in Frobenius norm on LLM-like activations."""
    x = activations(3 * CHUNK_TOKENS + 123, 200, seed=4)
    reference = x.double().T @ x.double()  # exact: products of float32 numbers are exact in float64
    G = gram(x, "float32", batch=5000)
    u = 2.0**-24
    gamma = CHUNK_TOKENS * u / (1 - CHUNK_TOKENS * u)
    scale = torch.sqrt(torch.outer(reference.diagonal(), reference.diagonal()))
    assert bool(((G - reference).abs() <= gamma * scale).all())
    assert (G - reference).norm() / reference.norm() < 1e-6


def test_float32_grams_keep_eckart_young_to_their_precision() -> None:
    """With float32-route Grams the closed form stays optimal to the route's precision at every rank."""
    x = activations(4000, 48, seed=5)
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(6), dtype=F64)
    X = x.double().T  # (n, N)
    s = torch.linalg.svdvals(W @ X)
    total = float((s**2).sum())
    basis = eigenbasis(W, gram(x, "float32"), k=48)
    for k in range(0, 49, 4):
        A, B = factorize(W, basis.vectors, k)
        loss = float(((W @ X - A @ (B @ X)) ** 2).sum())
        assert abs(loss - float((s[k:] ** 2).sum())) < 1e-6 * total


@pytest.mark.parametrize(
    ("n", "outputs", "smaller"),
    [(11008, (4096,), True), (4096, (4096,), False), (4096, (4096, 1024, 1024), False), (4096, (11008,), False)],
)
def test_output_gram_only_where_smaller(n: int, outputs: tuple[int, ...], smaller: bool) -> None:
    assert output_gram_is_smaller(n, outputs) is smaller


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_isfinite_everywhere(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 7).to(dtype) * 1e30
    assert all_finite(x) and all_finite(x[:0])
    for values in ([math.nan], [math.inf], [-math.inf], [math.inf, -math.inf]):  # ±Inf together: no NaN sum
        for position in [(0, 0, 0), (2, 4, 6), (1, 2, 3)]:
            poisoned = x.clone()
            for offset, value in enumerate(values):
                poisoned[position[0], position[1], (position[2] + offset) % 7] = value
            assert all_finite(poisoned) == bool(torch.isfinite(poisoned).all()) is False
