"""`swiftsvd report`: where a calibrated model is compressible, as plots and a markdown summary.

From a WORK's spectra (the eigenvalues of C = W G Wᵀ per module) it draws the paper's Fig. 3 view (normalised
effective rank per matrix type against layer importance), the normalised spectra themselves, and, for a plan,
the ranks per layer; the benchmark script reuses the same plotting helpers for perplexity and timing plots.
matplotlib is optional (`pip install swiftsvd-cli[plots]`) and imported only when a plot is drawn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli.architectures import matrix_kind
from swiftsvd_cli.artifacts import CalibrationManifest, atomic_write_text
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.linalg import loss_at_rank, normalized_effective_rank, uniform_rank
from swiftsvd_cli.plan import RankPlan

logger = logging.getLogger("swiftsvd")
Spectra = Mapping[tuple[int, str], torch.Tensor]
REPORT_RATIOS = (0.8, 0.6, 0.4)
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


def relative_loss_at(eigenvalues: torch.Tensor, m: int, n: int, ratio: float) -> float:
    """‖W X − W' X‖² / ‖W X‖² at the uniform rank for `ratio`: the share of output energy that is lost."""
    total = loss_at_rank(eigenvalues, 0)
    return loss_at_rank(eigenvalues, uniform_rank(m, n, ratio)) / total if total > 0 else 0.0


def _modules(spectra: Spectra) -> list[str]:
    return list(dict.fromkeys(module for _, module in spectra))


def _layers(spectra: Spectra) -> list[int]:
    return sorted({layer for layer, _ in spectra})


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _grid(plt: Any, count: int, width: float = 3.2, height: float = 2.6) -> tuple[Any, list[Any]]:
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
    modules, layers = _modules(spectra), _layers(spectra)
    fig, axes = _grid(plt, len(modules))
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
    return _save(fig, path)


def plot_ner_importance(spectra: Spectra, importance: Sequence[float], path: Path) -> Path:
    """The paper's Fig. 3: NER per matrix type per layer beside layer importance, with their correlation."""
    plt = pyplot()
    modules, layers = _modules(spectra), _layers(spectra)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    beta = [importance[i] for i in layers]
    for module in modules:
        ner = [normalized_effective_rank(spectra[(i, module)]) for i in layers]
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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


@dataclass(frozen=True)
class TypeSummary:
    """One matrix type across layers: how much rank its outputs really use and what a ratio costs it."""

    kind: str
    shape: tuple[int, int]
    mean_ner: float
    lowest_ner_layer: int
    highest_ner_layer: int
    ner_importance_r: float
    relative_loss: dict[float, float]  # ρ -> mean share of output energy lost at the uniform rank


def summarise_types(
    spectra: Spectra, shapes: Mapping[str, tuple[int, int]], importance: Sequence[float]
) -> list[TypeSummary]:
    layers = _layers(spectra)
    out: list[TypeSummary] = []
    for module in _modules(spectra):
        m, n = shapes[module]
        ner = [normalized_effective_rank(spectra[(i, module)]) for i in layers]
        losses = {
            ratio: sum(relative_loss_at(spectra[(i, module)], m, n, ratio) for i in layers) / len(layers)
            for ratio in REPORT_RATIOS
        }
        out.append(
            TypeSummary(
                kind=matrix_kind(module),
                shape=(m, n),
                mean_ner=sum(ner) / len(ner),
                lowest_ner_layer=layers[min(range(len(ner)), key=ner.__getitem__)],
                highest_ner_layer=layers[max(range(len(ner)), key=ner.__getitem__)],
                ner_importance_r=pearson(ner, [importance[i] for i in layers]),
                relative_loss=losses,
            )
        )
    return out


def markdown_summary(
    manifest: CalibrationManifest,
    types: Sequence[TypeSummary],
    importance: Sequence[float],
    plan: RankPlan | None,
    figures: Sequence[Path],
) -> str:
    """The report's README: settings, per-type compressibility, per-layer importance, figures."""
    settings = manifest.settings
    lines = [
        f"# swiftsvd report: {manifest.model.model_id}",
        "",
        f"Calibration: {settings.samples} x {settings.seqlen} tokens of `{settings.data}` (seed {settings.seed}), "
        f"{manifest.model.num_layers} layers, model fingerprint `{manifest.model.fingerprint[:12]}`.",
        "",
        "## Matrix types",
        "",
        "NER = normalised effective rank of the outputs (low = compressible). Energy lost = share of ‖W X‖² lost "
        "at the uniform rank ⌊mn/(m+n)·ρ⌋, mean over layers (the optimum, Σ_{i>k} λ_i / Σ λ_i).",
        "",
        "| type | shape | mean NER | lowest NER (layer) | highest NER (layer) | r(NER, importance) | "
        + " | ".join(f"energy lost ρ={ratio}" for ratio in REPORT_RATIOS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(REPORT_RATIOS),
    ]
    for t in types:
        losses = " | ".join(f"{t.relative_loss[ratio]:.2%}" for ratio in REPORT_RATIOS)
        lines.append(
            f"| {t.kind} | {t.shape[0]}x{t.shape[1]} | {t.mean_ner:.3f} | {t.lowest_ner_layer} | "
            f"{t.highest_ner_layer} | {t.ner_importance_r:+.2f} | {losses} |"
        )
    order = sorted(range(len(importance)), key=lambda i: importance[i])
    shown = max(1, min(5, len(order) // 2))
    lines += [
        "",
        "## Layers",
        "",
        f"Least important layers (block influence): {', '.join(str(i) for i in order[:shown])}; "
        f"most important: {', '.join(str(i) for i in reversed(order[-shown:]))}.",
    ]
    if plan is not None:
        lines += [
            "",
            f"## Plan: {plan.strategy}, ρ = {plan.target_ratio:.2f} (achieved {plan.achieved_ratio:.4f})"
            + ("" if plan.alpha is None else f", α = {plan.alpha:.1f}"),
            "",
            f"{sum(p.dense for p in plan.modules)} of {len(plan.modules)} modules stay dense.",
        ]
    lines += ["", "## Figures", ""] + [f"![{path.stem}]({path.name})" for path in figures]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReportOptions:
    work: Path
    out: Path
    plan: Path | None = None
    model: str | None = None  # only needed when WORK has no eigenbases yet
    device: str | None = None


@dataclass(frozen=True)
class ReportResult:
    summary: Path
    figures: list[Path]
    types: list[TypeSummary]


def run_report(options: ReportOptions) -> ReportResult:
    """Write OUT/README.md and the PNGs for the calibration in `options.work` (and a plan, if given)."""
    from swiftsvd_cli.allocate import load_complete_manifest, load_spectra
    from swiftsvd_cli.models import default_device

    pyplot()  # fail before any slow work if matplotlib is missing
    manifest = load_complete_manifest(options.work)
    plan = RankPlan.load(options.plan) if options.plan is not None else None
    if plan is not None and plan.model.fingerprint != manifest.model.fingerprint:
        raise SwiftSVDError(f"plan {options.plan} belongs to another model than {options.work}")
    calibrated = load_spectra(options.work, manifest, options.model, options.device or default_device())
    spectra, shapes = calibrated.eigenvalues, calibrated.shapes
    importance = manifest.importance()
    out = options.out
    figures = [
        plot_ner_importance(spectra, importance, out / "ner_importance.png"),
        plot_spectra(spectra, out / "spectra.png"),
    ]
    if plan is not None:
        figures.append(plot_plan_ranks(plan, out / "plan_ranks.png"))
    types = summarise_types(spectra, shapes, importance)
    summary = out / "README.md"
    atomic_write_text(summary, markdown_summary(manifest, types, importance, plan, figures))
    logger.info("report: %s and %d figures", summary, len(figures))
    return ReportResult(summary=summary, figures=figures, types=types)
