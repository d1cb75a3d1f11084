"""Stage 3: apply a rank plan -> a compressed HF-style directory (factored, or `--merge`d dense)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftsvd_cli import __version__
from swiftsvd_cli.artifacts.manifest import load_complete_manifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.store import FORMAT_VERSION, atomic_write_json, sha256_file
from swiftsvd_cli.config import check_ratio
from swiftsvd_cli.engine.factors import FactorSource, check_method
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import arch_for, decoder_layers, target_linears
from swiftsvd_cli.model.checkpoint import save_directory
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.model.lowrank import LowRankLinear, replace_module

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class CompressOptions:
    source: ModelSource
    out: Path
    plan: Path
    method: str = "swift"
    merge: bool = False
    force: bool = False


@dataclass(frozen=True)
class CompressResult:
    out: Path
    plan: RankPlan
    params_before: int
    params_after: int
    seconds: float


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite before any work is done."""
    if out.exists() and not force:
        raise SwiftSVDError(f"output {out} exists: pass --force to replace it or choose another --out")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_compress(options: CompressOptions) -> CompressResult:
    """Factor every planned linear of `options.source` and save the result to `options.out`."""
    check_output(options.out, options.force)
    check_method(options.method)
    start = time.perf_counter()
    plan = RankPlan.load(options.plan)
    check_ratio(plan.target_ratio)
    work = Path(plan.work)
    manifest = load_complete_manifest(work)
    if manifest.model.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(f"plan {options.plan} does not belong to the calibration in {work}")
    device = options.source.compute_device
    loaded = options.source.load()
    if loaded.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(
            f"plan {options.plan} was made for another model ({plan.model.model_id}), not '{options.source.model}'"
        )
    model = loaded.model
    spec = arch_for(model.config)
    before = count_parameters(model)
    dtype = next(model.parameters()).dtype
    ranks = plan.ranks(spec.layers)
    factors = FactorSource(options.method, work, manifest, spec, device)
    with progress() as bar:
        task = bar.add_task("factorising", total=manifest.model.num_layers)
        for index, layer in enumerate(decoder_layers(model, spec)):
            linears = target_linears(layer, spec)
            wanted = {p.module: p.rank for p in plan.modules if p.layer == index and not p.dense}
            for name, (A, B) in factors(index, linears, wanted).items():
                linear = linears[name]
                with torch.no_grad():
                    if options.merge:
                        linear.weight.copy_((A @ B).to(dtype))
                    else:
                        bias = None if linear.bias is None else linear.bias.detach()
                        replace_module(layer, name, LowRankLinear.from_factors(A, B, bias, dtype))
            bar.advance(task)
    if not options.merge:
        model.config.swiftsvd = {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "method": options.method,
            "strategy": plan.strategy,
            "alpha": plan.alpha,
            "target_ratio": plan.target_ratio,
            "achieved_ratio": plan.achieved_ratio,
            "ranks": ranks,
            "plan": str(options.plan.resolve()),
            "plan_sha256": sha256_file(options.plan),
            "base_model": plan.model.model_id,
            "base_fingerprint": plan.model.fingerprint,
        }
    save_directory(model, loaded.tokenizer, options.out)
    if options.merge:
        provenance = {
            "merged_from_plan": str(options.plan.resolve()),
            "method": options.method,
            "tool_version": __version__,
            "base_model": plan.model.model_id,
        }
        atomic_write_json(options.out / "swiftsvd.json", provenance)
    return CompressResult(options.out, plan, before, count_parameters(model), time.perf_counter() - start)
