"""What the CLI prints: one rich table (or line) per stage result, a rank plan per matrix type, an eval report
side by side (one column per target), and the environment. Above the stages (it renders their results), below
the CLI.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from swiftsvd_cli import __version__
from swiftsvd_cli.artifacts.eval_report import EvalReport, TargetReport
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.store import free_bytes
from swiftsvd_cli.engine.footprint import Footprint
from swiftsvd_cli.log import human, human_bytes
from swiftsvd_cli.stages.allocate import AllocationResult
from swiftsvd_cli.stages.calibrate import CalibrationResult
from swiftsvd_cli.stages.compress import CompressResult
from swiftsvd_cli.stages.report import ReportResult


def _rows(report: EvalReport) -> list[tuple[str, list[float | None], Any]]:
    """(label, one value per target, formatter) for every row the table shows."""
    targets = report.targets
    rows: list[tuple[str, list[float | None], Any]] = []

    def add(label: str, values: list[Any], fmt: Any) -> None:
        if any(v is not None for v in values):
            rows.append((label, [None if v is None else float(v) for v in values], fmt))

    add("target linears kept", [t.size.get("target_kept_ratio") for t in targets], "{:.3f}".format)
    names = list(dict.fromkeys(n for t in targets for n in t.perplexity))
    for name in names:
        add(f"ppl {Path(name).name}", [t.perplexity.get(name, {}).get("ppl") for t in targets], "{:.3f}".format)
    tasks = list(dict.fromkeys(n for t in targets for n in t.zero_shot))
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            add(
                f"{task} {metric} %",
                [_scaled(t.zero_shot.get(task, {}).get(metric)) for t in targets],
                "{:.2f}".format,
            )
    add("params", [t.size.get("params_total") for t in targets], human)
    add("params in target linears", [t.size.get("params_target_linear") for t in targets], human)
    add("weights in memory", [t.size.get("weights_bytes") for t in targets], human_bytes)
    add("target linears in memory", [t.size.get("target_bytes") for t in targets], human_bytes)
    add("checkpoint", [t.size.get("checkpoint_bytes") for t in targets], human_bytes)
    for key, label, fmt in (
        ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}".format),
        ("decode_tokens_per_s", "decode tok/s", "{:.1f}".format),
        ("peak_memory_bytes", _peak_label(targets), human_bytes),
        ("kv_cache_bytes_per_token", "KV cache per token", human_bytes),
    ):
        add(label, [(t.speed or {}).get(key) for t in targets], fmt)
    return rows


def _peak_label(targets: list[TargetReport]) -> str:
    kinds = {(t.speed or {}).get("peak_memory_kind") for t in targets} - {None}
    return "peak memory (cuda)" if kinds == {"cuda_max_allocated"} else "peak RSS Δ (cpu, approx.)"


def _scaled(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def render_table(report: EvalReport) -> Table:
    """One column per target; every later column shows its change relative to the first target."""
    table = Table(title="swiftsvd eval", caption=_caption(report))
    table.add_column("metric")
    for target in report.targets:
        table.add_column(Path(target.target).name or target.target, justify="right")
    for label, values, fmt in _rows(report):
        base = values[0]
        cells = []
        for index, value in enumerate(values):
            if value is None:
                cells.append("—")
            elif index == 0 or base is None or base == 0:
                cells.append(fmt(value))
            else:
                cells.append(f"{fmt(value)} ({(value / base - 1) * 100:+.0f}%)")
        table.add_row(label, *cells)
    return table


def _caption(report: EvalReport) -> str:
    ppl = report.protocol["perplexity"]
    parts = [f"seqlen {ppl['seqlen']}", f"device {report.protocol['device']}"]
    if report.zero_shot_skipped:
        parts.append("skipped: " + ", ".join(sorted(report.zero_shot_skipped)))
    for target in report.targets:
        for name, result in target.perplexity.items():
            if result.get("tuned_on"):
                roles = " + ".join(result["tuned_on"])
                parts.append(f"NOT HELD OUT: {Path(target.target).name} was tuned on {name} ({roles})")
    return "; ".join(parts)


def plan_table(plan: RankPlan) -> Table:
    """Per matrix type: rank range, mean NER, and the layers given most / least."""
    alpha = "" if plan.alpha is None else f", alpha {plan.alpha:.1f}"
    budget = (
        ""
        if plan.bytes_ratio is None or plan.achieved_bytes_ratio is None
        else f", {plan.achieved_bytes_ratio:.3f} of the 16-bit bytes ({plan.factor_dtype or '16-bit'} factors)"
    )
    found = (
        f" (smallest meeting --target-ppl {plan.target['ppl']:g}: validation ppl {plan.target['validation_ppl']:.3f})"
        if plan.target
        else ""
    )
    table = Table(
        title=f"{plan.strategy} plan: target ratio {plan.target_ratio:.3f}{found}, "
        f"achieved {plan.achieved_ratio:.4f}{alpha}{budget}"
    )
    for column in ("matrix", "shape", "ranks", "dense", "mean NER", "most (layer)", "least (layer)"):
        table.add_column(column)
    kinds: dict[str, list[Any]] = {}
    for module in plan.modules:
        kinds.setdefault(module.kind, []).append(module)
    for kind, modules in kinds.items():
        ranks = [m.rank for m in modules]
        most = max(modules, key=lambda m: m.rank)
        least = min(modules, key=lambda m: m.rank)
        table.add_row(
            kind,
            f"{modules[0].m}x{modules[0].n}",
            f"{min(ranks)}..{max(ranks)}",
            str(sum(m.dense for m in modules)),
            f"{sum(m.ner for m in modules) / len(modules):.3f}",
            f"{most.rank} ({most.layer})",
            f"{least.rank} ({least.layer})",
        )
    return table


def calibration_table(result: CalibrationResult, out: Path) -> Table:
    manifest = result.manifest
    importance = manifest.importance()
    reused = len(manifest.layers) - len(result.computed_layers)
    table = Table(title=f"calibration of {manifest.model.model_id}", show_header=False)
    table.add_row("layers", f"{len(manifest.layers)} ({len(result.computed_layers)} computed, {reused} reused)")
    table.add_row("tokens", f"{manifest.layers[0].tokens:,} ({manifest.settings.samples} x {manifest.settings.seqlen})")
    table.add_row("data", manifest.settings.data_id)
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("disk", human_bytes(result.disk_bytes))
    table.add_row("importance", f"{min(importance):.4f} .. {max(importance):.4f}")
    table.add_row("output", str(out))
    return table


def allocation_summary(result: AllocationResult) -> str:
    return f"plan: {result.path}  ({len(result.eigen_computed)} layers eigendecomposed, {result.seconds:.1f} s)"


def compression_table(result: CompressResult, method: str, merge: bool) -> Table:
    table = Table(title=f"compressed {result.plan.model.model_id} -> {result.out}", show_header=False)
    compensated = ", compensated" if result.compensation is not None else ""
    table.add_row("method", f"{method}" + (" (merged dense)" if merge else "") + compensated)
    if result.factor_dtype is not None:
        table.add_row("stored as", f"{result.factor_dtype} (every target linear)")
    if result.kv_kept is not None:
        table.add_row("KV cache", f"latent k/v: {result.kv_kept:.1%} of the dense cache per token")
    table.add_row(
        "parameters",
        f"{result.params_before:,} -> {result.params_after:,} "
        f"({result.params_after / result.params_before:.1%} of the model)",
    )
    for stage, value in result.seconds.items():
        table.add_row(f"time: {stage}", f"{value:.1f} s")
    if result.compensation is not None:
        table.add_row("time: of which compensation", f"{result.compensation.seconds:.1f} s")
        if result.compensation.damping:
            table.add_row("damped Grams", f"{len(result.compensation.damping)} matrices (see the swiftsvd section)")
    return table


def report_table(result: ReportResult) -> Table:
    table = Table(title=f"compressibility report -> {result.summary}")
    for column in ("matrix", "shape", "mean NER", "NER vs importance r"):
        table.add_column(column)
    for summary in result.types:
        table.add_row(
            summary.kind,
            f"{summary.shape[0]}x{summary.shape[1]}",
            f"{summary.mean_ner:.3f}",
            f"{summary.ner_importance_r:+.2f}",
        )
    return table


def env_table() -> Table:
    """Versions and devices, for bug reports."""
    import accelerate
    import torch
    import transformers

    table = Table(title="swiftsvd environment", show_header=False)
    table.add_row("swiftsvd", __version__)
    table.add_row("python", sys.version.split()[0])
    table.add_row("platform", platform.platform())
    for module in (torch, transformers, accelerate):
        table.add_row(module.__name__, module.__version__)
    table.add_row("cuda", str(torch.version.cuda) if torch.cuda.is_available() else "not available")
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        table.add_row(f"cuda:{index}", f"{properties.name}, {human_bytes(properties.total_memory)}")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    return table


def footprint_table(footprint: Footprint, work: Path) -> Table:
    """`calibrate --dry-run`: what the run will need, beside what the disk has."""
    table = Table(title=f"calibration footprint ({footprint.layers} layers)", show_header=False)
    table.add_row(
        "disk: Grams",
        f"{human_bytes(footprint.covariance_bytes)} ({human_bytes(footprint.covariance_layer_bytes)} per layer)",
    )
    table.add_row(
        "disk: eigenbases (allocate)",
        f"{human_bytes(footprint.eigen_bytes)} ({human_bytes(footprint.eigen_layer_bytes)} per layer)",
    )
    where = "disk, during the run" if footprint.offload else "host RAM"
    table.add_row("hidden states", f"{human_bytes(footprint.hidden_bytes)} ({where})")
    table.add_row("host RAM (peak, estimate)", human_bytes(footprint.host_bytes))
    table.add_row(
        "device memory (peak, estimate)", human_bytes(footprint.device_bytes) if footprint.device_bytes else "- (CPU)"
    )
    table.add_row("free disk", f"{human_bytes(free_bytes(work))} at {work}")
    return table
