"""Stage 3: apply a rank plan -> a compressed directory (factored, loaded by plain transformers too; or dense).

Factors come from the cached eigenbases (one pass, ratio-independent), or with `compensate` from a layer-by-layer
pass that fits each linear to the inputs the compressed layers before it produce (ratio-specific, computed here
for this plan and recorded in the output directory, never stored in WORK).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from swiftsvd_cli.artifacts.compressed import CompressedSection
from swiftsvd_cli.artifacts.format import jsonable
from swiftsvd_cli.artifacts.manifest import CalibrationSettings, load_complete_manifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.artifacts.store import sha256_file
from swiftsvd_cli.config import BATCH_SIZE, METHOD, FactorDType, Method, check_ratio, choice
from swiftsvd_cli.engine.compensate import CompensationResult, compensate, manifest_windows
from swiftsvd_cli.engine.eigen import load_eigen_index
from swiftsvd_cli.engine.factors import FactorSource, apply_factors, install_factors
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
    compensate: bool = False  # fit factors to the compressed path's inputs (Swift-SVD factors only)
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
    compensation: CompensationResult | None = None


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
    if factor_dtype is not None and plan.target:
        raise SwiftSVDError(
            f"the plan's ratio meets --target-ppl {plan.target['ppl']:g} with 16-bit factors, not {factor_dtype} "
            "ones: drop --factor-dtype, or allocate by --ratio or --bytes-ratio"
        )
    check_merge(merge, factor_dtype)
    return factor_dtype


def check_merge(merge: bool, factor_dtype: str | None) -> None:
    if merge and factor_dtype is not None:
        raise SwiftSVDError(f"--merge writes dense float weights: it does not combine with {factor_dtype} factors")


def run_compress(options: CompressOptions) -> CompressResult:
    """Factor every planned linear of `options.source` and save the result to `options.out`."""
    check_output(options.out, options.force)
    method = choice(Method, options.method)
    if options.compensate and method != Method.SWIFT:
        raise SwiftSVDError(f"--compensate fits Swift-SVD factors; it does not apply to --method {method}")
    start = time.perf_counter()
    plan = RankPlan.load(options.plan)
    check_ratio(plan.target_ratio)
    factor_dtype = resolve_factor_dtype(options.factor_dtype, plan, options.merge)
    work = Path(plan.work)
    manifest = load_complete_manifest(work)
    if manifest.model.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(f"plan {options.plan} does not belong to the calibration in {work}")
    device = options.source.compute_device
    loaded = options.source.load(keep_on_cpu=options.compensate)  # compensation moves one layer at a time
    if loaded.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(
            f"plan {options.plan} was made for another model ({plan.model.model_id}), not '{options.source.model}'"
        )
    model = loaded.model
    spec = arch_for(model.config)
    before = weight_count(model)
    compensation: CompensationResult | None = None
    if options.compensate:
        dtype = next(model.parameters()).dtype
        install = partial(install_factors, merge=options.merge, factor_dtype=factor_dtype, dtype=dtype)
        planned = {(p.layer, p.module): p.rank for p in plan.modules if not p.dense}
        windows = manifest_windows(manifest, loaded.tokenizer)
        compensation = compensate(model, spec, windows, planned, BATCH_SIZE, device, install)
    else:
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
        compensation=None if compensation is None else compensation_record(compensation, manifest.settings),
    )
    save_compressed(model, loaded.tokenizer, section, options.out)
    seconds = {"compress": time.perf_counter() - start}
    return CompressResult(options.out, plan, work, before, weight_count(model), seconds, factor_dtype, compensation)


def compensation_record(result: CompensationResult, settings: CalibrationSettings) -> dict[str, Any]:
    """What the compressed directory records about an error-compensated compression."""
    return {
        "ratio_specific": True,
        "objective": "min over rank k of ||W X - W' X_hat||_F, X_hat = inputs from the compressed layers before",
        "calibration": jsonable(settings),
        "tokens": result.tokens,
        "damping": result.damping,
        "seconds": result.seconds,
    }
