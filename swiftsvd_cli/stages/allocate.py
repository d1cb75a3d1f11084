"""Stage 2: eigenbases (cached) -> rank plan for a kept-parameter ratio: uniform, dynamic (paper Algorithm 2) or global.

The dynamic strategy scores each α of the paper's grid {0, 0.1, …, 1} by validation perplexity of the
densely reconstructed model (W' = A B in place, cheap because the eigenbases are cached) and keeps the best.
The global strategy hands out eigen-directions across all matrices of all layers by weighted loss per parameter.
The ratio is given (`--ratio`), the largest that fits a byte budget (`--bytes-ratio`), or the smallest whose
validation perplexity meets a target (`--target-ppl`, by bisection, each step a plan scored like an α candidate).
The validation text is the `validation` split of `--val-data` (default: of the calibration data), never the
`test` split `eval` reports on; the plan records it (source, split, windows, tokens, SHA-256) so that `eval`
can flag a perplexity text that α or the ratio was chosen on.
Plans are scored one decoder layer at a time read from the checkpoint (engine.scoring): all α candidates together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts.eigen import INDEX
from swiftsvd_cli.artifacts.format import jsonable
from swiftsvd_cli.artifacts.lock import work_lock
from swiftsvd_cli.artifacts.manifest import MANIFEST, CalibrationManifest, load_complete_manifest
from swiftsvd_cli.artifacts.plan import RankPlan, module_plan
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.artifacts.store import remove_stale_temps, sha256_file
from swiftsvd_cli.config import (
    ALPHA_GRID,
    BATCH_SIZE,
    DELTA,
    METHOD,
    SEARCH_ALPHA,
    STRATEGY,
    TARGET_STEP,
    VAL_SAMPLES,
    FactorDType,
    Method,
    Strategy,
    check_ratio,
    choice,
)
from swiftsvd_cli.core.allocation import (
    achieved_ratio,
    dynamic_ranks,
    global_plan,
    largest_fitting_ratio,
    minimal_loss_at_uniform,
    reference_bytes,
    weight_bytes,
)
from swiftsvd_cli.core.linalg import uniform_rank
from swiftsvd_cli.core.search import max_steps, smallest_ratio
from swiftsvd_cli.data.text import TextSource, load_text, spread_windows, tokenize
from swiftsvd_cli.engine.eigen import CalibratedSpectra, load_spectra, open_matching_model
from swiftsvd_cli.engine.factors import FactorSource, RankMap, require_statistics
from swiftsvd_cli.engine.scoring import candidate_perplexities
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.metrics.perplexity import pooled
from swiftsvd_cli.model.architectures import ArchSpec
from swiftsvd_cli.model.loading import eigen_devices, resolve_device
from swiftsvd_cli.model.streaming import StreamedModel

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class AllocateOptions:
    work: Path
    ratio: float | None = None  # kept-parameter ratio; or give bytes_ratio or target_ppl
    strategy: Strategy = STRATEGY
    alpha: float | None = None  # fixes α and skips the grid search
    delta: float = DELTA
    method: Method = METHOD  # factorisation used to score the α candidates
    model: str | None = None  # defaults to the model recorded in WORK
    val_data: str | None = None  # validation split of this data; defaults to the calibration data
    val_samples: int = VAL_SAMPLES
    val_seqlen: int | None = None  # defaults to the calibration seqlen
    name: str | None = None
    device: str | None = None
    force: bool = False
    bytes_ratio: float | None = None  # share of the 16-bit target-linear bytes to keep, instead of ratio
    factor_dtype: FactorDType | None = None  # stored dtype of the factors (int8), for the byte count
    target_ppl: float | None = None  # the smallest ratio whose validation perplexity is at most this

    @property
    def default_name(self) -> str:
        if self.bytes_ratio is not None:
            return f"bytes-{self.bytes_ratio:.2f}-{self.factor_dtype or '16bit'}-{self.strategy}"
        if self.target_ppl is not None:
            return f"target-ppl-{self.target_ppl:g}-{self.strategy}"
        return f"ratio-{self.ratio:.2f}-{self.strategy}"


@dataclass(frozen=True)
class AllocationResult:
    plan: RankPlan
    path: Path
    eigen_computed: list[int]
    seconds: float


def plan_ranks(
    spectra: dict[tuple[int, str], torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    importance: list[float],
    ratio: float,
    strategy: str,
    alpha: float,
    delta: float,
) -> RankMap:
    """Ranks per (layer, module): uniform, Algorithm 2 run separately for each matrix type, or global."""
    layers = range(len(importance))
    if strategy == Strategy.GLOBAL:
        return global_plan(spectra, shapes, importance, ratio, delta)
    ranks: RankMap = {}
    for module, (m, n) in shapes.items():
        if strategy == Strategy.UNIFORM:
            ranks |= {(i, module): uniform_rank(m, n, ratio) for i in layers}
            continue
        eps = [minimal_loss_at_uniform(spectra[(i, module)], m, n, ratio) for i in layers]
        ranks |= dict(
            zip(
                [(i, module) for i in layers],
                dynamic_ranks(m, n, eps, importance, ratio, alpha, delta),
                strict=True,
            )
        )
    return ranks


def check_target(
    ratio: float | None, bytes_ratio: float | None, factor_dtype: str | None, target_ppl: float | None = None
) -> FactorDType | None:
    """Exactly one of --ratio / --bytes-ratio / --target-ppl, each in range; the factor dtype as a choice (None:
    the model's). --target-ppl scores the model with float factors, so it does not size int8 ones."""
    given = [
        flag
        for flag, value in (("--ratio", ratio), ("--bytes-ratio", bytes_ratio), ("--target-ppl", target_ppl))
        if value is not None
    ]
    if not given:
        raise SwiftSVDError(
            "give one of --ratio (parameters kept), --bytes-ratio (bytes kept) or --target-ppl (validation perplexity)"
        )
    if len(given) > 1:
        raise SwiftSVDError(f"{' and '.join(given)} each choose the ratio: give only one of them")
    if ratio is not None:
        check_ratio(ratio)
    elif bytes_ratio is not None and not 0.0 < bytes_ratio <= 1.0:
        raise SwiftSVDError(
            f"--bytes-ratio {bytes_ratio} is outside (0, 1]: it is the share of the 16-bit target-linear bytes kept"
        )
    elif target_ppl is not None and not 1.0 <= target_ppl < math.inf:
        raise SwiftSVDError(f"--target-ppl {target_ppl} is not a perplexity (a finite number >= 1)")
    if target_ppl is not None and factor_dtype is not None:
        raise SwiftSVDError(
            f"--target-ppl scores the model with 16-bit factors, not {factor_dtype} ones: drop --factor-dtype, "
            "or size the plan by --ratio or --bytes-ratio"
        )
    return None if factor_dtype is None else choice(FactorDType, factor_dtype)


def run_allocate(options: AllocateOptions) -> AllocationResult:
    """Write `WORK/plans/<name>.json` for the target ratio, computing eigenbases only where none are cached."""
    factor_dtype = check_target(options.ratio, options.bytes_ratio, options.factor_dtype, options.target_ppl)
    strategy = choice(Strategy, options.strategy)
    choice(Method, options.method)
    if options.alpha is not None and not 0.0 <= options.alpha <= 1.0:
        raise SwiftSVDError(f"--alpha {options.alpha} is outside [0, 1]")
    if not 0.0 <= options.delta <= 1.0:
        raise SwiftSVDError(f"--delta {options.delta} is outside [0, 1]")
    with work_lock(options.work):
        return _allocate(options, strategy, factor_dtype)


def _allocate(options: AllocateOptions, strategy: Strategy, factor_dtype: FactorDType | None) -> AllocationResult:
    start = time.perf_counter()
    work = options.work
    manifest = load_complete_manifest(work)
    require_statistics(options.method, work, manifest)  # before any eigendecomposition
    if distributed.is_main():  # under the WORK lock: the temps of dead writers only, by one process
        remove_stale_temps(work.rglob(".*"))
    name = options.name or options.default_name
    path = work / "plans" / f"{name}.json"
    distributed.main_decides(lambda: check_new_plan(path, options.force))
    device = resolve_device(options.device)
    calibrated = load_spectra(work, manifest, options.model, device, eigen_devices(options.device))
    spec, spectra, shapes = calibrated.spec, calibrated.eigenvalues, calibrated.shapes
    importance = manifest.importance()
    layer_shapes = [shapes[module] for (_, module) in spectra]
    budget = None if options.bytes_ratio is None else options.bytes_ratio * reference_bytes(layer_shapes)

    def ranks_at(ratio: float, alpha: float) -> RankMap:
        return plan_ranks(spectra, shapes, importance, ratio, strategy, alpha, options.delta)

    given = options.ratio  # --ratio, or the ratio --target-ppl finds below

    def ratio_for(alpha: float) -> float:
        """--ratio as given (or found for --target-ppl), or the largest kept ratio whose plan fits the byte budget."""
        if budget is None:
            assert given is not None
            return given
        found = largest_fitting_ratio(lambda ratio: plan_bytes(ranks_at(ratio, alpha), shapes, factor_dtype), budget)
        if found is None:
            raise SwiftSVDError(f"--bytes-ratio {options.bytes_ratio} is too small: not even rank 0 fits")
        return found

    def plan_for(alpha: float) -> RankMap:
        return ranks_at(ratio_for(alpha), alpha)

    searching_alpha = strategy == Strategy.DYNAMIC and options.alpha is None
    needs_scorer = searching_alpha or options.target_ppl is not None
    scorer = validator(options, manifest, calibrated, device) if needs_scorer else None
    target: dict[str, Any] = {}
    if scorer is not None and options.target_ppl is not None:
        given, target = search_ratio(options.target_ppl, strategy, options.alpha, ranks_at, scorer)
    candidates: list[dict[str, float]] = []
    alpha = options.alpha if strategy == Strategy.DYNAMIC else None
    if scorer is not None and searching_alpha:
        alpha, candidates = search_alpha(plan_for, shapes, scorer)
        if target:  # the grid holds the α the ratio search used, so this is at most its validation perplexity
            target["validation_ppl"] = min(c["val_ppl"] for c in candidates)
    ratio = ratio_for(alpha if alpha is not None else 0.0)
    ranks = ranks_at(ratio, alpha if alpha is not None else 0.0)
    order = {module: position for position, module in enumerate(spec.modules)}
    modules = [
        module_plan(index, module, shapes[module], ranks[(index, module)], spectra[(index, module)], importance[index])
        for (index, module) in sorted(ranks, key=lambda key: (key[0], order[key[1]]))
    ]
    plan = RankPlan(
        work=str(work.resolve()),
        model=manifest.model,
        strategy=str(strategy),
        target_ratio=ratio,
        achieved_ratio=achieved_ratio((p.m, p.n, p.rank) for p in modules),
        modules=modules,
        options=jsonable(options),
        provenance=make_provenance(manifest=sha256_file(work / MANIFEST), eigen=sha256_file(work / INDEX)),
        alpha=alpha,
        delta=options.delta if strategy != Strategy.UNIFORM else None,
        candidates=candidates,
        validation=scorer.record if scorer is not None else {},
        factor_dtype=None if factor_dtype is None else str(factor_dtype),
        bytes_ratio=options.bytes_ratio,
        achieved_bytes_ratio=plan_bytes(ranks, shapes, factor_dtype) / reference_bytes(layer_shapes),
        target=target,
    )
    if options.bytes_ratio is not None and ratio == 1.0:
        logger.info("bytes ratio %.3f: every target linear fits unfactored, no low rank", options.bytes_ratio)
    elif options.bytes_ratio is not None:
        logger.info("bytes ratio %.3f: kept-parameter ratio %.4f fits", options.bytes_ratio, ratio)
    if distributed.is_main():
        plan.save(path)
    return AllocationResult(
        plan=plan, path=path, eigen_computed=calibrated.computed, seconds=time.perf_counter() - start
    )


def check_new_plan(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise SwiftSVDError(f"plan {path} exists: pass --force to replace it or --name to write another")


def plan_bytes(ranks: RankMap, shapes: dict[str, tuple[int, int]], factor_dtype: str | None) -> int:
    """Stored bytes of every target linear's weights under `ranks`."""
    return sum(weight_bytes(*shapes[module], k, factor_dtype) for (_, module), k in ranks.items())


@dataclass(frozen=True)
class Validator:
    """Scores rank plans by the validation perplexity of the densely reconstructed model (W' = A B in place).

    One validation text serves every choice a plan makes (the α grid, the --target-ppl ratio search), and
    `record` is what the plan (and, through it, the compressed directory) says about it. The model is streamed
    (engine.scoring): several plans scored together read each decoder layer once.
    """

    streamed: StreamedModel
    spec: ArchSpec
    factors: FactorSource
    windows: torch.Tensor  # (k, seqlen) validation windows
    record: dict[str, Any]
    device: str

    def ppls(self, plans: list[RankMap]) -> list[float]:
        """Under several processes each scores its share of the windows; their NLL sums are pooled per plan."""
        seqlen = self.windows.shape[1]
        share = torch.stack(distributed.my_share(list(self.windows), "validation windows")).reshape(-1)
        parts = distributed.everyone(
            lambda: candidate_perplexities(
                self.streamed,
                self.spec,
                share,
                seqlen=seqlen,
                plans=plans,
                factors=self.factors,
                device=self.device,
                batch_size=BATCH_SIZE,
            )
        )
        return [pooled([part[c] for part in parts]).ppl for c in range(len(plans))]

    def ppl(self, ranks: RankMap) -> float:
        return self.ppls([ranks])[0]


def validator(
    options: AllocateOptions, manifest: CalibrationManifest, calibrated: CalibratedSpectra, device: str
) -> Validator:
    """`--val-samples` windows evenly spaced over the validation split, never the test split `eval` reports on."""
    streamed = calibrated.streamed or open_matching_model(options.work, manifest, options.model, device)
    seqlen = options.val_seqlen or manifest.settings.seqlen
    source = validation_text(options.val_data, manifest)
    windows = spread_windows(tokenize(streamed.tokenizer, source.text), seqlen, options.val_samples)
    record = {
        "data": options.val_data or manifest.settings.data,
        "split": "validation",
        "data_id": source.id,
        "text_sha256": source.sha256,
        "protocol": source.protocol,
        "windows": windows.shape[0],
        "seqlen": seqlen,
        "tokens": windows.numel(),
        "held_out_from_calibration": source.sha256 != manifest.settings.data_sha256,
        "note": "non-overlapping windows evenly spaced over the whole validation text",
    }
    factors = FactorSource(options.method, options.work, manifest, calibrated.index, calibrated.spec, device)
    return Validator(streamed, calibrated.spec, factors, windows, record, device)


def search_alpha(
    plan_for: Callable[[float], RankMap], shapes: dict[str, tuple[int, int]], scorer: Validator
) -> tuple[float, list[dict[str, float]]]:
    """The paper's lightweight grid search: each α's plan scored by validation perplexity (all in one pass over
    the layers); best wins."""
    plans = [plan_for(alpha) for alpha in ALPHA_GRID]
    candidates = [
        {
            "alpha": alpha,
            "val_ppl": ppl,
            "achieved_ratio": achieved_ratio((*shapes[module], k) for (_, module), k in ranks.items()),
        }
        for alpha, ranks, ppl in zip(ALPHA_GRID, plans, scorer.ppls(plans), strict=True)
    ]
    best = min(candidates, key=lambda c: (c["val_ppl"], c["alpha"]))
    logger.info("alpha search: best alpha %.1f (val ppl %.3f)", best["alpha"], best["val_ppl"])
    return float(best["alpha"]), candidates


def search_ratio(
    target: float,
    strategy: Strategy,
    alpha: float | None,
    ranks_at: Callable[[float, float], RankMap],
    scorer: Validator,
) -> tuple[float, dict[str, Any]]:
    """The smallest ρ (grid TARGET_STEP) whose plan's validation perplexity is at most `target`, by bisection.

    Algorithm 2 runs at a fixed α meanwhile (--alpha, else SEARCH_ALPHA, a point of the α grid), so the grid
    search at the ρ found can only lower the validation perplexity further.
    """
    alpha = alpha if alpha is not None else SEARCH_ALPHA
    with progress() as bar:
        task = bar.add_task("ratio search", total=max_steps(TARGET_STEP))

        def metric(ratio: float) -> float:
            value = scorer.ppl(ranks_at(ratio, alpha))
            logger.info("ratio %.2f: validation ppl %.3f", ratio, value)
            bar.advance(task)
            return value

        result = smallest_ratio(metric, target, TARGET_STEP)
    if result.ratio is None:
        raise SwiftSVDError(
            f"--target-ppl {target:g} is unreachable: the uncompressed model (ratio 1.0) already has validation "
            f"perplexity {result.value:.3f} on {scorer.record['data_id']}; give a target above it"
        )
    logger.info("ratio search: %.2f (validation ppl %.3f <= %g)", result.ratio, result.value, target)
    return result.ratio, {
        "ppl": target,
        "ratio": result.ratio,
        "validation_ppl": result.value,
        "step": TARGET_STEP,
        "alpha_during_search": alpha if strategy == Strategy.DYNAMIC else None,
        "steps": [{"ratio": ratio, "val_ppl": value} for ratio, value in result.steps],
    }


def validation_text(val_data: str | None, manifest: CalibrationManifest) -> TextSource:
    """The `validation` split of `val_data`, or of the calibration data when it is None.

    A local file has no splits: without --val-data, α is then scored on the calibration file itself
    (held out from evaluation, not from calibration), which the log says and the plan records.
    """
    source = load_text(val_data or manifest.settings.data, "validation")
    if source.sha256 == manifest.settings.data_sha256:
        logger.warning(
            "alpha and --target-ppl are scored on the calibration text itself (%s has no validation split): "
            "pass --val-data for held-out text",
            manifest.settings.data,
        )
    return source
