"""Plots only the benchmark draws: perplexity vs ratio per method, and seconds per stage."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from swiftsvd_cli.figures import pyplot, save_figure


def plot_perplexity(curves: Mapping[str, Mapping[float, float]], original: float, path: Path) -> Path:
    """Perplexity vs kept ratio ρ, one line per "method strategy" label, log scale: the accuracy comparison.

    Colour and marker follow the method, line style the strategy; markers shrink method by method so that
    methods with equal perplexity (Swift-SVD and SVD-LLM are both optimal) stay visible on top of each other.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
    methods = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label in curves))
    for label, points in curves.items():
        index = methods.index(label.rsplit(" ", 1)[0])
        xs = sorted(points)
        ax.semilogy(
            xs,
            [points[x] for x in xs],
            color=f"C{index}",
            marker="osD^v<>"[index % 7],
            markersize=max(3.0, 11.0 - 2.0 * index),
            fillstyle="none",
            ls="--" if label.endswith("dynamic") else "-",
            label=label,
        )
    ax.axhline(original, color="black", lw=0.8, ls=":", label=f"original ({original:.2f})")
    ax.set_xlabel("ρ (fraction of parameters kept)")
    ax.set_ylabel("perplexity (log)")
    ax.invert_xaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Perplexity vs compression ratio")
    return save_figure(fig, path)


def plot_timing(stages: Mapping[str, Mapping[str, float]], reference: Mapping[str, float], path: Path) -> Path:
    """Left: stacked seconds per stage for each method (method -> stage -> s). Right: `reference` bars
    (calibration and its forward-pass floor), kept apart because they would dwarf the factorisations."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=(2, 1), layout="constrained")
    methods = list(stages)
    names = list(dict.fromkeys(stage for per in stages.values() for stage in per))
    bottom = [0.0] * len(methods)
    for stage in names:
        values = [stages[method].get(stage, 0.0) for method in methods]
        left.barh(methods, values, left=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for y, total in enumerate(bottom):
        left.text(total, y, f" {total:.1f} s", va="center", fontsize=8)
    left.set_xlim(0, max(bottom, default=1.0) * 1.2)
    left.set_xlabel("seconds")
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    left.set_title("Factorisation per method (same Grams)")
    right.barh(list(reference), list(reference.values()), color="grey")
    for y, value in enumerate(reference.values()):
        right.text(value, y, f" {value:.1f} s", va="center", fontsize=8)
    right.set_xlim(0, max(reference.values(), default=1.0) * 1.3)
    right.set_xlabel("seconds")
    right.set_title("Calibration vs its floor")
    return save_figure(fig, path)
