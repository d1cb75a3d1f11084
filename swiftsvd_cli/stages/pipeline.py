"""One shot: `swiftsvd compress MODEL --ratio ρ` runs whichever stage has no valid cached artifact, then compresses.

The WORK directory defaults to a cache folder named after the model and the calibration settings, so a
second ratio of the same model reuses the Grams and eigenbases of the first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from swiftsvd_cli.config import BATCH_SIZE, SAMPLES, SEED, SEQLEN, VAL_SAMPLES, check_ratio
from swiftsvd_cli.data.demo import cache_dir
from swiftsvd_cli.model.loading import DEMO, ModelSource
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from swiftsvd_cli.stages.compress import CompressOptions, CompressResult, check_output, run_compress

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class CalibrationDefaults:
    data: str
    samples: int
    seqlen: int
    val_samples: int  # validation windows per alpha candidate of the dynamic strategy


# The demo runs on 2-core CPUs in minutes: 64 x 512 tokens instead of the field's 256 x 2048.
DEMO_CALIBRATION = CalibrationDefaults(data="demo", samples=64, seqlen=512, val_samples=4)
FIELD_CALIBRATION = CalibrationDefaults(data="wikitext2", samples=SAMPLES, seqlen=SEQLEN, val_samples=VAL_SAMPLES)


@dataclass(frozen=True)
class OneShotOptions:
    source: ModelSource
    ratio: float
    out: Path
    work: Path | None = None
    strategy: str = "dynamic"
    alpha: float | None = None
    method: str = "swift"
    merge: bool = False
    data: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    seed: int = SEED
    batch_size: int = BATCH_SIZE
    force: bool = False


@dataclass
class OneShotResult:
    compress: CompressResult
    work: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)


def default_work(model: str, data: str, samples: int, seqlen: int, seed: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/~.")) or "model"
    return cache_dir() / "work" / f"{slug}-{Path(data).name}-{samples}x{seqlen}-seed{seed}"


def run_oneshot(options: OneShotOptions) -> OneShotResult:
    check_ratio(options.ratio)
    check_output(options.out, options.force)
    model = options.source.model
    defaults = DEMO_CALIBRATION if model == DEMO else FIELD_CALIBRATION
    data = options.data or defaults.data
    samples = options.samples or defaults.samples
    seqlen = options.seqlen or defaults.seqlen
    work = options.work or default_work(model, data, samples, seqlen, options.seed)
    logger.info("WORK directory: %s", work)
    calibration = run_calibrate(
        CalibrateOptions(
            source=options.source,
            work=work,
            data=data,
            samples=samples,
            seqlen=seqlen,
            seed=options.seed,
            batch_size=options.batch_size,
        )
    )
    name = (
        f"ratio-{options.ratio:.2f}-{options.strategy}"
        + (f"-alpha{options.alpha:.2f}" if options.alpha is not None else "")
        + (f"-{options.method}" if options.method != "swift" else "")
    )
    plan_path = work / "plans" / f"{name}.json"
    allocate_seconds = 0.0
    if plan_path.exists() and not calibration.computed_layers:  # new Grams invalidate old plans
        logger.info("reusing plan %s", plan_path)
    else:
        allocation = run_allocate(
            AllocateOptions(
                work=work,
                ratio=options.ratio,
                strategy=options.strategy,
                alpha=options.alpha,
                method=options.method,
                model=model,
                val_samples=defaults.val_samples,
                name=name,
                device=options.source.device,
                force=True,
            )
        )
        allocate_seconds = allocation.seconds
    result = run_compress(
        CompressOptions(
            source=options.source,
            out=options.out,
            plan=plan_path,
            method=options.method,
            merge=options.merge,
            force=options.force,
        )
    )
    return OneShotResult(
        result,
        work,
        {"calibrate": calibration.seconds, "allocate": allocate_seconds, "compress": result.seconds},
    )
