"""Stage 3: apply a rank plan -> a compressed directory (factored, loaded by plain transformers too; or dense)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from swiftsvd_cli.artifacts.compressed import CompressedSection
from swiftsvd_cli.artifacts.format import jsonable
from swiftsvd_cli.artifacts.manifest import load_complete_manifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.artifacts.store import sha256_file
from swiftsvd_cli.config import METHOD, FactorDType, Method, check_ratio, choice
from swiftsvd_cli.engine.eigen import load_eigen_index
from swiftsvd_cli.engine.factors import FactorSource, apply_factors
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import arch_for
from swiftsvd_cli.model.checkpoint import save_compressed
from swiftsvd_cli.model.hf.qlinear import weight_count
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
    factor_dtype: FactorDType | None = None  # int8: every target linear stored quantised; None: as the plan says


@dataclass(frozen=True)
class CompressResult:
    out: Path
    plan: RankPlan
    work: Path
    params_before: int
    params_after: int
    seconds: dict[str, float]  # per stage: compress (and, in one shot, calibrate and allocate)
    factor_dtype: FactorDType | None = None


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite before any work is done."""
    if out.exists() and not force:
        raise SwiftSVDError(f"output {out} exists: pass --force to replace it or choose another --out")


def resolve_factor_dtype(given: str | None, plan: RankPlan, merge: bool) -> FactorDType | None:
    """--factor-dtype, else the one the plan's byte budget was sized for; a contradiction is an error."""
    if given is not None and plan.factor_dtype is not None and given != plan.factor_dtype:
        raise SwiftSVDError(
            f"the plan was sized for {plan.factor_dtype} factors: drop --factor-dtype {given} or allocate again"
        )
    chosen = given or plan.factor_dtype
    factor_dtype = None if chosen is None else choice(FactorDType, chosen)
    check_merge(merge, factor_dtype)
    return factor_dtype


def check_merge(merge: bool, factor_dtype: str | None) -> None:
    if merge and factor_dtype is not None:
        raise SwiftSVDError(f"--merge writes dense float weights: it does not combine with {factor_dtype} factors")


def run_compress(options: CompressOptions) -> CompressResult:
    """Factor every planned linear of `options.source` and save the result to `options.out`."""
    check_output(options.out, options.force)
    method = choice(Method, options.method)
    start = time.perf_counter()
    plan = RankPlan.load(options.plan)
    check_ratio(plan.target_ratio)
    factor_dtype = resolve_factor_dtype(options.factor_dtype, plan, options.merge)
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
    before = weight_count(model)
    factors = FactorSource(method, work, manifest, load_eigen_index(work, manifest), spec, device)
    with progress() as bar:
        task = bar.add_task("factorising", total=manifest.model.num_layers)
        apply_factors(
            model,
            spec,
            plan.rank_map(),
            factors,
            merge=options.merge,
            factor_dtype=factor_dtype,
            on_layer=lambda: bar.advance(task),
        )
    section = CompressedSection(
        method=str(method),
        merged=options.merge,
        strategy=plan.strategy,
        alpha=plan.alpha,
        target_ratio=plan.target_ratio,
        achieved_ratio=plan.achieved_ratio,
        ranks=plan.ranks(spec.layers),
        plan=str(options.plan.resolve()),
        base_model=plan.model.model_id,
        base_fingerprint=plan.model.fingerprint,
        options=jsonable(options),
        allocation=plan.options,
        calibration=jsonable(manifest.settings),
        validation=plan.validation,
        provenance=make_provenance(plan=sha256_file(options.plan), model=loaded.fingerprint),
        factor_dtype=None if factor_dtype is None else str(factor_dtype),
        int8_dense=[f"{spec.layers}.{p.layer}.{p.module}" for p in plan.modules if p.dense]
        if factor_dtype == FactorDType.INT8
        else [],
    )
    save_compressed(model, loaded.tokenizer, section, options.out)
    seconds = {"compress": time.perf_counter() - start}
    return CompressResult(options.out, plan, work, before, weight_count(model), seconds, factor_dtype)
