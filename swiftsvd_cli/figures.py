"""Figures of a calibration: spectra, NER vs layer importance (the paper's Fig. 3) and a plan's ranks.

matplotlib is optional (`pip install swiftsvd-cli[plots]`) and imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.core.allocation import matrix_kind
from swiftsvd_cli.core.linalg import normalized_effective_rank, uniform_rank
from swiftsvd_cli.errors import SwiftSVDError

Spectra = Mapping[tuple[int, str], torch.Tensor]
DPI = 90  # small PNGs (< 300 KB) that still read well in a README


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or a clear error saying how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise SwiftSVDError('plots need matplotlib: pip install "swiftsvd-cli[plots]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (no direction to correlate)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spectrum_modules(spectra: Spectra) -> list[str]:
    return list(dict.fromkeys(module for _, module in spectra))


def spectrum_layers(spectra: Spectra) -> list[int]:
    return sorted({layer for layer, _ in spectra})


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def subplot_grid(plt: Any, count: int, width: float = 3.2, height: float = 2.6) -> tuple[Any, list[Any]]:
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_spectra(spectra: Spectra, path: Path) -> Path:
    """λ_i / λ_1 per matrix type, one line per layer (colour = depth): flatter means less compressible."""
    plt = pyplot()
    modules, layers = spectrum_modules(spectra), spectrum_layers(spectra)
    fig, axes = subplot_grid(plt, len(modules))
    cmap = plt.get_cmap("viridis")
    for ax, module in zip(axes, modules, strict=True):
        for layer in layers:
            lam = spectra[(layer, module)].double().clamp_min(0)
            if lam.numel() == 0 or float(lam[0]) <= 0:
                continue
            ax.semilogy((lam / lam[0]).clamp_min(1e-12).numpy(), color=cmap(layer / max(1, len(layers) - 1)), lw=0.8)
        ax.set_title(matrix_kind(module), fontsize=9)
        ax.set_xlabel("index i", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("λ_i / λ_1", fontsize=8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(layers)))
    fig.colorbar(sm, ax=axes, label="layer", shrink=0.8)
    fig.suptitle("Eigenvalue spectra of C = W G Wᵀ per matrix type")
    return save_figure(fig, path)


def plot_ner_importance(
    spectra: Spectra, shapes: Mapping[str, tuple[int, int]], importance: Sequence[float], path: Path
) -> Path:
    """The paper's Fig. 3: NER (erank / d_out) per matrix type per layer beside layer importance, with their
    correlation; `shapes` maps each module to its (d_out, d_in)."""
    plt = pyplot()
    modules, layers = spectrum_modules(spectra), spectrum_layers(spectra)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    beta = [importance[i] for i in layers]
    for module in modules:
        ner = [normalized_effective_rank(spectra[(i, module)], shapes[module][0]) for i in layers]
        r = pearson(ner, beta)
        left.plot(layers, ner, marker=".", lw=1, label=matrix_kind(module))
        right.scatter(beta, ner, s=12, label=f"{matrix_kind(module)} (r = {r:+.2f})")
    twin = left.twinx()
    twin.plot(layers, beta, color="black", ls="--", lw=1.2, label="importance")
    twin.set_ylabel("layer importance (BI)")
    left.set_xlabel("layer")
    left.set_ylabel("NER")
    left.legend(fontsize=7, ncol=2, loc="lower left")
    twin.legend(fontsize=7, loc="upper right")
    right.set_xlabel("layer importance (BI)")
    right.set_ylabel("NER")
    right.legend(fontsize=7)
    fig.suptitle("Normalised effective rank vs layer importance (paper Fig. 3)")
    return save_figure(fig, path)


def plot_plan_ranks(plan: RankPlan, path: Path) -> Path:
    """Ranks per layer as a multiple of the uniform rank, per matrix type, with importance: what Algorithm 2 did."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    kinds: dict[str, list[tuple[int, float]]] = {}
    importance: dict[int, float] = {}
    for p in plan.modules:
        k_bar = uniform_rank(p.m, p.n, plan.target_ratio)
        kinds.setdefault(p.kind, []).append((p.layer, p.rank / k_bar if k_bar else 0.0))
        importance[p.layer] = p.importance
    for name, points in kinds.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker=".", lw=1, label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    twin = ax.twinx()
    layers = sorted(importance)
    twin.plot(layers, [importance[i] for i in layers], color="black", ls="--", lw=1.2, label="importance")
    twin.set_ylabel("layer importance (BI)")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank / uniform rank")
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    alpha = "" if plan.alpha is None else f", α = {plan.alpha:.1f}"
    ax.set_title(f"{plan.strategy} plan at ρ = {plan.target_ratio:.2f}{alpha} (achieved {plan.achieved_ratio:.3f})")
    return save_figure(fig, path)
