"""`swiftsvd report`: where a calibrated model is compressible, as plots and a markdown summary.

From a WORK's spectra (the eigenvalues of C = W G Wᵀ per module) it draws the paper's Fig. 3 view (normalised
effective rank per matrix type against layer importance), the normalised spectra themselves, and, for a plan,
the ranks per layer (swiftsvd_cli.figures), and summarises each matrix type in a README.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftsvd_cli.artifacts.lock import work_lock
from swiftsvd_cli.artifacts.manifest import CalibrationManifest, load_complete_manifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.store import atomic_write_text
from swiftsvd_cli.core.allocation import matrix_kind
from swiftsvd_cli.core.linalg import loss_at_rank, normalized_effective_rank, uniform_rank
from swiftsvd_cli.engine.eigen import load_spectra
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.figures import (
    Spectra,
    pearson,
    plot_ner_importance,
    plot_plan_ranks,
    plot_spectra,
    pyplot,
    spectrum_layers,
    spectrum_modules,
)
from swiftsvd_cli.model.loading import eigen_devices, resolve_device

logger = logging.getLogger("swiftsvd")
REPORT_RATIOS = (0.8, 0.6, 0.4)


def relative_loss_at(eigenvalues: torch.Tensor, m: int, n: int, ratio: float) -> float:
    """‖W X − W' X‖² / ‖W X‖² at the uniform rank for `ratio`: the share of output energy that is lost."""
    total = loss_at_rank(eigenvalues, 0)
    return loss_at_rank(eigenvalues, uniform_rank(m, n, ratio)) / total if total > 0 else 0.0


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
    layers = spectrum_layers(spectra)
    out: list[TypeSummary] = []
    for module in spectrum_modules(spectra):
        m, n = shapes[module]
        ner = [normalized_effective_rank(spectra[(i, module)], m) for i in layers]
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
        f"Calibration: {settings.samples} x {settings.seqlen} tokens of `{settings.data}` "
        f"({settings.sampler} sampler, seed {settings.seed}), "
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
    pyplot()  # fail before any slow work if matplotlib is missing
    manifest = load_complete_manifest(options.work)
    plan = RankPlan.load(options.plan) if options.plan is not None else None
    if plan is not None and plan.model.fingerprint != manifest.model.fingerprint:
        raise SwiftSVDError(f"plan {options.plan} belongs to another model than {options.work}")
    with work_lock(options.work):  # may write missing eigenbases into WORK
        devices = eigen_devices(options.device)
        calibrated = load_spectra(options.work, manifest, options.model, resolve_device(options.device), devices)
    spectra, shapes = calibrated.eigenvalues, calibrated.shapes
    importance = manifest.importance()
    out = options.out
    figures = [
        plot_ner_importance(spectra, shapes, importance, out / "ner_importance.png"),
        plot_spectra(spectra, out / "spectra.png"),
    ]
    if plan is not None:
        figures.append(plot_plan_ranks(plan, out / "plan_ranks.png"))
    types = summarise_types(spectra, shapes, importance)
    summary = out / "README.md"
    atomic_write_text(summary, markdown_summary(manifest, types, importance, plan, figures))
    logger.info("report: %s and %d figures", summary, len(figures))
    return ReportResult(summary=summary, figures=figures, types=types)
