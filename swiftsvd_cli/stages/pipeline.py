"""One shot: `swiftsvd compress MODEL --ratio ρ` (or `--bytes-ratio`, `--target-ppl`) runs whichever stage has no
valid cached artifact, then compresses.

The WORK directory defaults to a cache folder named after the model and the calibration settings, so a
second ratio of the same model reuses the Grams and eigenbases of the first; a plan is reused only when it was
made with the same settings. This is the only stage module that composes the others.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts.format import jsonable
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.store import require_disk
from swiftsvd_cli.config import (
    BATCH_SIZE,
    DATA,
    DELTA,
    KV_CACHE,
    METHOD,
    OFFLOAD,
    SAMPLES,
    SEED,
    SEQLEN,
    STRATEGY,
    VAL_SAMPLES,
    FactorDType,
    KVCache,
    Method,
    Offload,
    Strategy,
)
from swiftsvd_cli.data.demo import cache_dir
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.loading import DEMO, ModelSource
from swiftsvd_cli.recipes import load_recipe
from swiftsvd_cli.stages.allocate import AllocateOptions, check_target, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, dry_run, run_calibrate
from swiftsvd_cli.stages.compress import (
    CompressOptions,
    CompressResult,
    check_kv_options,
    check_merge,
    check_output,
    run_compress,
)

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class OneShotOptions:
    """Compress in one shot; None fields take the model's defaults (the demo recipe for `demo`, else the field's)."""

    source: ModelSource
    ratio: float | None  # kept-parameter ratio; or give bytes_ratio or target_ppl
    out: Path
    work: Path | None = None
    strategy: Strategy = STRATEGY
    alpha: float | None = None
    delta: float = DELTA
    method: Method = METHOD
    merge: bool = False
    compensate: bool = False  # error-compensated factors (ratio-specific, see `CompressOptions`)
    kv_cache: KVCache = KV_CACHE
    kv_ratio: float | None = None
    data: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    val_samples: int | None = None
    seed: int = SEED
    batch_size: int = BATCH_SIZE
    keep_input_grams: bool = False
    offload_hidden: Offload = OFFLOAD
    skip_nonfinite: bool = False  # calibration leaves out windows whose activations overflow (see CalibrateOptions)
    force: bool = False
    bytes_ratio: float | None = None  # instead of ratio: share of the 16-bit target-linear bytes kept
    factor_dtype: FactorDType | None = None  # int8: factors stored quantised
    target_ppl: float | None = None  # instead of ratio: the smallest ratio meeting this validation perplexity


FIELD_DEFAULTS: dict[str, Any] = {"data": DATA, "samples": SAMPLES, "seqlen": SEQLEN, "val_samples": VAL_SAMPLES}
"""The one shot's model-dependent settings and their defaults for every model but the demo."""


def model_defaults(model: str) -> dict[str, Any]:
    """The one shot's model-dependent defaults: the demo recipe's for `demo` (sized for a 2-core CPU)."""
    if model != DEMO:
        return FIELD_DEFAULTS
    demo = load_recipe(DEMO).values
    return {key: demo.get(key, value) for key, value in FIELD_DEFAULTS.items()}


def default_work(model: str, data: str, samples: int, seqlen: int, seed: int) -> Path:
    """A cache folder per model and settings; named with the calibration format, so a newer swiftsvd never
    trips over (or deletes) a cache an older one left."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/~.")) or "model"
    return (
        cache_dir()
        / "work"
        / f"{slug}-{Path(data).name}-{samples}x{seqlen}-seed{seed}-v{CalibrationManifest.FORMAT_VERSION}"
    )


PLAN_SETTINGS = (
    "ratio",
    "bytes_ratio",
    "target_ppl",
    "factor_dtype",
    "strategy",
    "alpha",
    "delta",
    "method",
    "val_data",
    "val_samples",
    "val_seqlen",
)
"""The allocate options a plan depends on (not its name, WORK path, model location or device)."""


def _reusable(path: Path, options: AllocateOptions) -> bool:
    """An existing plan made with exactly these allocate settings (a plan from other settings is remade)."""
    if not path.is_file():
        return False
    try:
        plan = RankPlan.load(path)
    except SwiftSVDError:
        return False
    wanted = jsonable(options)
    return all(plan.options.get(key) == wanted[key] for key in PLAN_SETTINGS)


def run_oneshot(options: OneShotOptions) -> CompressResult:
    """Calibrate and allocate where no valid cached artifact exists, then compress into `options.out`."""
    check_merge(
        options.merge, check_target(options.ratio, options.bytes_ratio, options.factor_dtype, options.target_ppl)
    )
    distributed.main_decides(lambda: check_output(options.out, options.force))  # the main process writes OUT
    check_kv_options(options.kv_cache, options.kv_ratio, options.merge)
    model = options.source.model
    defaults = model_defaults(model)
    data = options.data or defaults["data"]
    samples = options.samples or defaults["samples"]
    seqlen = options.seqlen or defaults["seqlen"]
    work = options.work or default_work(model, data, samples, seqlen, options.seed)
    logger.info("WORK directory: %s", work)
    calibrate_options = CalibrateOptions(
        source=options.source,
        work=work,
        data=data,
        samples=samples,
        seqlen=seqlen,
        seed=options.seed,
        batch_size=options.batch_size,
        keep_input_grams=options.keep_input_grams,
        offload_hidden=options.offload_hidden,
        skip_nonfinite=options.skip_nonfinite,
        force=options.work is None,  # the default WORK is a cache: one of another format or settings is rebuilt
    )
    footprint = dry_run(calibrate_options)
    cached = sum(
        file.stat().st_size for part in ("covariance", "eigen") for file in (work / part).glob("*.safetensors")
    )
    require_disk(work, footprint.covariance_bytes + footprint.eigen_bytes - cached, "calibration and eigenbases")
    calibration = run_calibrate(calibrate_options)
    allocate = AllocateOptions(
        work=work,
        ratio=options.ratio,
        bytes_ratio=options.bytes_ratio,
        target_ppl=options.target_ppl,
        factor_dtype=options.factor_dtype if options.bytes_ratio is not None else None,  # --ratio plans: any dtype
        strategy=options.strategy,
        alpha=options.alpha,
        delta=options.delta,
        method=options.method,
        model=model,
        val_samples=options.val_samples or defaults["val_samples"],
        device=options.source.device,
        force=True,
    )
    name = (
        allocate.default_name
        + (f"-alpha{options.alpha:.2f}" if options.alpha is not None else "")
        + (f"-{options.method}" if options.method != Method.SWIFT else "")
    )
    allocate = dataclasses.replace(allocate, name=name)
    plan_path = work / "plans" / f"{name}.json"
    allocate_seconds = 0.0
    # new Grams invalidate old plans
    if distributed.main_decides(lambda: not calibration.computed_layers and _reusable(plan_path, allocate)):
        logger.info("reusing plan %s", plan_path)
    else:
        allocate_seconds = run_allocate(allocate).seconds
    by_plan = CompressOptions(
        source=options.source,
        out=options.out,
        plan=plan_path,
        method=options.method,
        merge=options.merge,
        compensate=options.compensate,
        kv_cache=options.kv_cache,
        kv_ratio=options.kv_ratio,
        force=options.force,
        factor_dtype=options.factor_dtype,
    )
    result = distributed.main_decides(lambda: run_compress(by_plan))  # one process builds OUT
    seconds = {"calibrate": calibration.seconds, "allocate": allocate_seconds, **result.seconds}
    return dataclasses.replace(result, seconds=seconds)


def compress(options: CompressOptions | OneShotOptions) -> CompressResult:
    """The public `compress`: by a plan (`CompressOptions`) or in one shot (`OneShotOptions`)."""
    return run_oneshot(options) if isinstance(options, OneShotOptions) else run_compress(options)
