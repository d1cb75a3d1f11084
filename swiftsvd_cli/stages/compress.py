"""Stage 3: apply a rank plan -> a compressed directory (factored, loaded by plain transformers too; or dense)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftsvd_cli.artifacts.compressed import CompressedSection
from swiftsvd_cli.artifacts.format import jsonable
from swiftsvd_cli.artifacts.manifest import load_complete_manifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.artifacts.store import sha256_file
from swiftsvd_cli.config import METHOD, Method, check_ratio, choice
from swiftsvd_cli.engine.eigen import load_eigen_index
from swiftsvd_cli.engine.factors import FactorSource
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import arch_for, decoder_layers, target_linears
from swiftsvd_cli.model.checkpoint import save_compressed
from swiftsvd_cli.model.hf.lowrank import LowRankLinear, replace_module
from swiftsvd_cli.model.loading import ModelSource

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class CompressOptions:
    source: ModelSource
    out: Path
    plan: Path
    method: Method = METHOD
    merge: bool = False
    force: bool = False


@dataclass(frozen=True)
class CompressResult:
    out: Path
    plan: RankPlan
    work: Path
    params_before: int
    params_after: int
    seconds: dict[str, float]  # per stage: compress (and, in one shot, calibrate and allocate)


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite before any work is done."""
    if out.exists() and not force:
        raise SwiftSVDError(f"output {out} exists: pass --force to replace it or choose another --out")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_compress(options: CompressOptions) -> CompressResult:
    """Factor every planned linear of `options.source` and save the result to `options.out`."""
    check_output(options.out, options.force)
    method = choice(Method, options.method)
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
    factors = FactorSource(method, work, manifest, load_eigen_index(work, manifest), spec, device)
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
    section = CompressedSection(
        method=str(method),
        merged=options.merge,
        strategy=plan.strategy,
        alpha=plan.alpha,
        target_ratio=plan.target_ratio,
        achieved_ratio=plan.achieved_ratio,
        ranks=ranks,
        plan=str(options.plan.resolve()),
        base_model=plan.model.model_id,
        base_fingerprint=plan.model.fingerprint,
        options=jsonable(options),
        allocation=plan.options,
        calibration=jsonable(manifest.settings),
        provenance=make_provenance(plan=sha256_file(options.plan), model=loaded.fingerprint),
    )
    save_compressed(model, loaded.tokenizer, section, options.out)
    seconds = {"compress": time.perf_counter() - start}
    return CompressResult(options.out, plan, work, before, count_parameters(model), seconds)
