"""Stage 2: eigenbases (cached) -> rank plan for a kept-parameter ratio, uniform or dynamic (paper Algorithm 2).

The dynamic strategy scores each α of the paper's grid {0, 0.1, …, 1} by validation perplexity of the
densely reconstructed model (W' = A B in place, cheap because the eigenbases are cached) and keeps the best.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swiftsvd_cli.allocation import (
    achieved_ratio,
    dynamic_ranks,
    is_dense,
    minimal_loss_at_uniform,
)
from swiftsvd_cli.architectures import ArchSpec, arch_for, decoder_layers, target_linears
from swiftsvd_cli.artifacts import MANIFEST, CalibrationManifest
from swiftsvd_cli.data import load_text, tokenize
from swiftsvd_cli.eigen import ensure_eigenbases, read_eigenvalues
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.linalg import effective_rank, loss_at_rank, normalized_effective_rank, uniform_rank
from swiftsvd_cli.log import progress
from swiftsvd_cli.methods import FactorSource, check_method
from swiftsvd_cli.models import LoadedModel, default_device, load_model
from swiftsvd_cli.perplexity import perplexity
from swiftsvd_cli.plan import ModulePlan, RankPlan

logger = logging.getLogger("swiftsvd")
STRATEGIES = ("dynamic", "uniform")
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
RankMap = dict[tuple[int, str], int]


@dataclass(frozen=True)
class AllocateOptions:
    work: Path
    ratio: float
    strategy: str = "dynamic"
    alpha: float | None = None  # fixes α and skips the grid search
    delta: float = 0.5
    method: str = "swift"  # factorisation used to score the α candidates
    model: str | None = None  # defaults to the model recorded in WORK
    val_data: str | None = None  # defaults to the calibration text
    val_samples: int = 8
    val_seqlen: int | None = None  # defaults to the calibration seqlen
    name: str | None = None
    device: str | None = None
    force: bool = False


@dataclass(frozen=True)
class AllocationResult:
    plan: RankPlan
    path: Path
    eigen_computed: list[int]
    seconds: float


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise SwiftSVDError(f"--ratio {ratio} is outside (0, 1]: it is the fraction of parameters kept (0.8 keeps 80%)")


def load_complete_manifest(work: Path) -> CalibrationManifest:
    if not (work / MANIFEST).is_file():
        raise SwiftSVDError(f"{work} has no calibration (manifest.json): run `swiftsvd calibrate MODEL --out {work}`")
    manifest = CalibrationManifest.load(work)
    if not manifest.complete:
        raise SwiftSVDError(
            f"{work} holds {len(manifest.layers)} of {manifest.model.num_layers} calibrated layers: "
            "rerun `swiftsvd calibrate` with the same settings to finish it"
        )
    return manifest


def load_matching_model(manifest: CalibrationManifest, spec: str | None, device: str) -> LoadedModel:
    """The calibrated model, refusing any other (a WORK from another model is a silent-garbage risk)."""
    loaded = load_model(spec or manifest.model.spec, revision=manifest.model.revision, dtype="float32", device=device)
    if loaded.fingerprint != manifest.model.fingerprint:
        raise SwiftSVDError(
            f"model '{loaded.spec}' is not the one this WORK was calibrated on "
            f"({manifest.model.model_id}): pass the right model or recalibrate"
        )
    return loaded


@dataclass(frozen=True)
class CalibratedSpectra:
    """A WORK's model and the spectrum of every target linear: what plans and reports are made from."""

    loaded: LoadedModel
    spec: ArchSpec
    eigenvalues: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> all eigenvalues of C
    shapes: dict[str, tuple[int, int]]  # module -> (m, n), the same in every layer
    computed: list[int]  # layers eigendecomposed by this call (the others were cached)


def load_spectra(work: Path, manifest: CalibrationManifest, model: str | None, device: str) -> CalibratedSpectra:
    """Load the calibrated model, eigendecompose the layers not cached yet, and read every spectrum."""
    loaded = load_matching_model(manifest, model, device)
    spec = arch_for(loaded.model.config)
    computed = ensure_eigenbases(work, manifest, loaded.model, spec, device)
    linears = target_linears(decoder_layers(loaded.model, spec)[0], spec)
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    return CalibratedSpectra(loaded, spec, read_eigenvalues(work, manifest, spec), shapes, computed)


def plan_ranks(
    spectra: dict[tuple[int, str], torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    importance: list[float],
    ratio: float,
    strategy: str,
    alpha: float,
    delta: float,
) -> RankMap:
    """Ranks per (layer, module): uniform, or Algorithm 2 run separately for each matrix type."""
    layers = range(len(importance))
    ranks: RankMap = {}
    for module, (m, n) in shapes.items():
        if strategy == "uniform":
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


@contextmanager
def reconstructed(model: nn.Module, spec: ArchSpec, ranks: RankMap, factors_of: FactorSource) -> Iterator[None]:
    """Temporarily replace each factored weight by its dense rank-k reconstruction A B."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its original values)
    try:
        for index, layer in enumerate(decoder_layers(model, spec)):
            linears = target_linears(layer, spec)
            wanted = {
                name: k
                for (i, name), k in ranks.items()
                if i == index and not is_dense(linears[name].out_features, linears[name].in_features, k)
            }
            for name, (A, B) in factors_of(index, linears, wanted).items():
                weight = linears[name].weight
                saved.append((weight, weight.detach().clone()))
                with torch.no_grad():
                    weight.copy_((A @ B).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def run_allocate(options: AllocateOptions) -> AllocationResult:
    """Write `WORK/plans/<name>.json` for `options.ratio`, computing eigenbases only where none are cached."""
    check_ratio(options.ratio)
    if options.strategy not in STRATEGIES:
        raise SwiftSVDError(f"unknown strategy '{options.strategy}': use {' or '.join(STRATEGIES)}")
    if options.alpha is not None and not 0.0 <= options.alpha <= 1.0:
        raise SwiftSVDError(f"--alpha {options.alpha} is outside [0, 1]")
    check_method(options.method)
    start = time.perf_counter()
    work = options.work
    manifest = load_complete_manifest(work)
    name = options.name or f"ratio-{options.ratio:.2f}-{options.strategy}"
    path = work / "plans" / f"{name}.json"
    if path.exists() and not options.force:
        raise SwiftSVDError(f"plan {path} exists: pass --force to replace it or --name to write another")
    device = options.device or default_device()
    calibrated = load_spectra(work, manifest, options.model, device)
    loaded, spec, spectra, shapes = calibrated.loaded, calibrated.spec, calibrated.eigenvalues, calibrated.shapes
    importance = manifest.importance()

    def plan_for(alpha: float) -> RankMap:
        return plan_ranks(spectra, shapes, importance, options.ratio, options.strategy, alpha, options.delta)

    candidates: list[dict[str, float]] = []
    validation: dict[str, object] = {}
    alpha: float | None = None
    if options.strategy == "dynamic":
        alpha = options.alpha
        if alpha is None:
            alpha, candidates, validation = search_alpha(options, manifest, loaded, spec, plan_for, shapes, device)
    ranks = plan_for(alpha if alpha is not None else 0.0)
    order = {module: position for position, module in enumerate(spec.modules)}
    modules = [
        module_plan(index, module, shapes[module], ranks[(index, module)], spectra[(index, module)], importance[index])
        for (index, module) in sorted(ranks, key=lambda key: (key[0], order[key[1]]))
    ]
    plan = RankPlan(
        work=str(work.resolve()),
        model=manifest.model,
        strategy=options.strategy,
        target_ratio=options.ratio,
        achieved_ratio=achieved_ratio((p.m, p.n, p.rank) for p in modules),
        modules=modules,
        alpha=alpha,
        delta=options.delta if options.strategy == "dynamic" else None,
        candidates=candidates,
        validation=validation,
    )
    plan.save(path)
    return AllocationResult(
        plan=plan, path=path, eigen_computed=calibrated.computed, seconds=time.perf_counter() - start
    )


def module_plan(
    index: int, module: str, shape: tuple[int, int], rank: int, eigenvalues: torch.Tensor, importance: float
) -> ModulePlan:
    m, n = shape
    dense = is_dense(m, n, rank)
    loss = 0.0 if dense else loss_at_rank(eigenvalues, rank)
    total = loss_at_rank(eigenvalues, 0)
    return ModulePlan(
        layer=index,
        module=module,
        m=m,
        n=n,
        rank=rank,
        dense=dense,
        predicted_loss=loss,
        relative_loss=loss / total if total > 0 else 0.0,
        effective_rank=effective_rank(eigenvalues),
        ner=normalized_effective_rank(eigenvalues),
        importance=importance,
    )


def search_alpha(
    options: AllocateOptions,
    manifest: CalibrationManifest,
    loaded: LoadedModel,
    spec: ArchSpec,
    plan_for: Callable[[float], RankMap],
    shapes: dict[str, tuple[int, int]],
    device: str,
) -> tuple[float, list[dict[str, float]], dict[str, object]]:
    """The paper's lightweight grid search: each α's plan scored by validation perplexity; best wins."""
    data = options.val_data or manifest.settings.data
    seqlen = options.val_seqlen or manifest.settings.seqlen
    source = load_text(data, "train" if options.val_data is None else "test")
    ids = tokenize(loaded.tokenizer, source.text)
    factors = FactorSource(options.method, options.work, manifest, spec, device)
    candidates: list[dict[str, float]] = []
    with progress() as bar:
        task = bar.add_task("alpha search", total=len(ALPHA_GRID))
        for alpha in ALPHA_GRID:
            ranks = plan_for(alpha)
            with reconstructed(loaded.model, spec, ranks, factors):
                result = perplexity(loaded.model, ids, seqlen=seqlen, limit=options.val_samples, batch_size=4)
            ratio = achieved_ratio((*shapes[module], k) for (_, module), k in ranks.items())
            candidates.append({"alpha": alpha, "val_ppl": result.ppl, "achieved_ratio": ratio})
            bar.advance(task)
    best = min(candidates, key=lambda c: (c["val_ppl"], c["alpha"]))
    validation = {
        "data": data,
        "data_id": source.id,
        "windows": result.windows,
        "seqlen": seqlen,
        "note": "first non-overlapping windows of the text (calibration text by default)",
    }
    logger.info("alpha search: best alpha %.1f (val ppl %.3f)", best["alpha"], best["val_ppl"])
    return float(best["alpha"]), candidates, validation
