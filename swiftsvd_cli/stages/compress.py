"""Stage 3: apply a rank plan -> a compressed directory (factored, loaded by plain transformers too; or dense).

Factors come from the cached eigenbases (one pass, ratio-independent), or with `compensate` from a layer-by-layer
pass that fits each linear to the inputs the compressed layers before it produce (ratio-specific, computed here
for this plan and recorded in the output directory, never stored in WORK).
The checkpoint is streamed: tensors outside the decoder layers are copied as stored; each decoder layer is read
from the original checkpoint, its planned linears factored (and, with int8 factors, quantised), and its tensors
handed to the shard writer, so host memory holds one layer (with `compensate`: one layer, its compressed copy
and the two hidden-state streams), its float64 factorisations and at most one shard. Floating-point weights are
written in the dtype the original stored them in, whatever device computed them; int8 codes and their float32
row scales as they are.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli.artifacts.compressed import CompressedSection
from swiftsvd_cli.artifacts.eigen import EigenIndex, read_eigenvalues
from swiftsvd_cli.artifacts.format import jsonable
from swiftsvd_cli.artifacts.manifest import CalibrationSettings
from swiftsvd_cli.artifacts.plan import ModulePlan, RankPlan, module_plan
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.artifacts.store import remove_stale_temps, require_disk, sha256_file
from swiftsvd_cli.config import BATCH_SIZE, KV_CACHE, METHOD, FactorDType, KVCache, Method, check_ratio, choice
from swiftsvd_cli.core.allocation import achieved_ratio, kv_rank_cap
from swiftsvd_cli.core.compensation import ORIGINAL_WEIGHT
from swiftsvd_cli.engine.compensate import CompensationResult, Compensator, manifest_windows
from swiftsvd_cli.engine.eigen import calibrated_spec, check_shapes, load_eigen_index
from swiftsvd_cli.engine.factors import FactorSource, RankMap, factor_layer, install_factors
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import ArchSpec, target_linears
from swiftsvd_cli.model.checkpoint import write_compressed
from swiftsvd_cli.model.hf.latent_kv import LatentKVError, check_latent_kv_support
from swiftsvd_cli.model.hf.lowrank import replace_module
from swiftsvd_cli.model.hf.qlinear import weight_count
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.model.streaming import StreamedModel

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
    kv_cache: KVCache = KV_CACHE  # latent: cache the k/v latents B x instead of keys and values
    kv_ratio: float | None = None  # cap on the kept share of the KV cache (latent only)


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
    kv_kept: float | None = None  # latent cache: Σ (r_k + r_v) / Σ 2 num_kv_heads · head_dim over the layers


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


def check_kv_options(kv_cache: str, kv_ratio: float | None, merge: bool) -> KVCache:
    """Refuse contradictory KV settings before any work is done."""
    mode = choice(KVCache, kv_cache)
    if mode == KVCache.LATENT and merge:
        raise SwiftSVDError("--kv-cache latent needs the factored checkpoint: it cannot be combined with --merge")
    if kv_ratio is not None:
        if mode != KVCache.LATENT:
            raise SwiftSVDError("--kv-ratio only saves memory with --kv-cache latent: pass both")
        if not 0.0 < kv_ratio <= 1.0:
            raise SwiftSVDError(f"--kv-ratio {kv_ratio} is outside (0, 1]: it is the fraction of the KV cache kept")
    return mode


def with_kv_ratio(
    plan: RankPlan, spec: ArchSpec, kv_ratio: float, work: Path, index: EigenIndex, shapes: dict[str, tuple[int, int]]
) -> RankPlan:
    """The plan with every k/v rank capped at floor(kv_ratio · m), losses and achieved ratio recomputed.

    The cap only lowers ranks (the weight budget of the plan is never exceeded); a k/v the plan left dense
    becomes factored at the cap.
    """
    spectra = read_eigenvalues(work, index, shapes, spec.modules)

    def capped(p: ModulePlan) -> ModulePlan:
        rank = min(p.rank, kv_rank_cap(p.m, kv_ratio))
        return module_plan(p.layer, p.module, (p.m, p.n), rank, spectra[(p.layer, p.module)], p.importance)

    modules = [capped(p) if p.module in spec.kv else p for p in plan.modules]
    return replace(plan, modules=modules, achieved_ratio=achieved_ratio((p.m, p.n, p.rank) for p in modules))


def check_latent_plan(plan: RankPlan, spec: ArchSpec) -> None:
    """A latent cache needs every k/v factored: name the first one the plan leaves dense."""
    dense = [p for p in plan.modules if p.module in spec.kv and p.dense]
    if dense:
        first = dense[0]
        raise SwiftSVDError(
            f"--kv-cache latent needs factored k/v, but the plan keeps {len(dense)} dense (first: layer "
            f"{first.layer} {first.module}, rank {first.rank}): pass --kv-ratio (e.g. 0.5) or a lower ratio"
        )


def _written_bytes(streamed: StreamedModel, spec: ArchSpec, plan: RankPlan, merge: bool) -> int:
    """Bytes of the weights the checkpoint will hold, from shapes alone (an upper bound with int8 factors)."""
    factored = {f"{spec.layers}.{p.layer}.{p.module}.weight": p.rank for p in plan.modules if not p.dense}
    written = 0
    for name in streamed.state_names():
        shape = streamed.weights.shape(name)
        numel = torch.Size(shape).numel()
        kept = factored[name] * (shape[0] + shape[1]) if name in factored and not merge else numel
        written += torch.empty(0, dtype=streamed.stored_dtype(name)).element_size() * kept
    return written


class _Counter:
    """Weights before and after factoring (parameters plus int8 codes, as `weight_count` counts them)."""

    def __init__(self, streamed: StreamedModel) -> None:
        self.before = sum(torch.Size(streamed.weights.shape(name)).numel() for name in streamed.state_names())
        self.after = self.before


def _stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A factored layer's tensor as written: floats in the checkpoint's dtype, int8 codes and their float32 row
    scales (`Int8Linear.scale`) as they are."""
    if not tensor.is_floating_point() or name.rpartition(".")[2] == "scale":
        return tensor
    return tensor.to(dtype)


def _compressed_tensors(
    streamed: StreamedModel,
    spec: ArchSpec,
    ranks: RankMap,
    factors: FactorSource | Compensator,
    counter: _Counter,
    *,
    merge: bool,
    factor_dtype: str | None,
    num_layers: int,
    device: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the output checkpoint, one decoder layer at a time: originals as stored, target linears
    factored (A and B, or int8 codes and scales) in the checkpoint's dtype. With a `Compensator` each layer is
    read onto the device and its compensated copy is written."""
    prefix = f"{spec.layers}."
    yield from ((name, streamed.tensor(name)) for name in streamed.state_names() if not name.startswith(prefix))
    compensating = isinstance(factors, Compensator)
    with progress() as bar:
        task = bar.add_task("compensating" if compensating else "factorising", total=num_layers)
        for index in range(num_layers):
            path = f"{spec.layers}.{index}"
            with streamed.loaded(path, device if compensating else "cpu") as layer:
                if index + 1 < num_layers:
                    streamed.prefetch(f"{spec.layers}.{index + 1}")
                originals = target_linears(layer, spec)
                dtype = streamed.stored_dtype(f"{path}.{next(iter(originals))}.weight")
                if isinstance(factors, Compensator):
                    written = factors.layer(index, layer)
                else:
                    written = layer
                    factor_layer(
                        written, index, spec, ranks, factors, dtype=dtype, merge=merge, factor_dtype=factor_dtype
                    )
                targets = tuple(f"{path}.{name}." for name in originals)
                for name in streamed.state_names(path):
                    if not name.startswith(targets):
                        yield name, streamed.tensor(name)
                for module, original in originals.items():
                    factored = written.get_submodule(module)
                    counter.after += weight_count(factored) - weight_count(original)
                    for key, tensor in factored.state_dict().items():
                        yield f"{path}.{module}.{key}", _stored(key, tensor.detach(), dtype)
                    replace_module(layer, module, original)  # the skeleton's own linear again, freed on exit
            bar.advance(task)


def run_compress(options: CompressOptions) -> CompressResult:
    """Factor every planned linear of `options.source` and save the result to `options.out`."""
    check_output(options.out, options.force)
    remove_stale_temps(options.out.parent.glob(f".{options.out.name}.*"))
    method = choice(Method, options.method)
    if options.compensate and method != Method.SWIFT:
        raise SwiftSVDError(f"--compensate fits Swift-SVD factors; it does not apply to --method {method}")
    kv_cache = check_kv_options(options.kv_cache, options.kv_ratio, options.merge)
    start = time.perf_counter()
    plan = RankPlan.load(options.plan)
    check_ratio(plan.target_ratio)
    factor_dtype = resolve_factor_dtype(options.factor_dtype, plan, options.merge)
    work = Path(plan.work)
    manifest = plan.calibration(options.plan)
    spec = calibrated_spec(work, manifest)  # a broken manifest fails before the model is read
    index = load_eigen_index(work, manifest)
    if kv_cache == KVCache.LATENT:
        if options.kv_ratio is not None:
            plan = with_kv_ratio(plan, spec, options.kv_ratio, work, index, manifest.shapes)
        check_latent_plan(plan, spec)
    device = options.source.compute_device
    factors = FactorSource(method, work, manifest, index, spec, device)  # refuses a WORK lacking what method reads
    streamed = options.source.open()
    if streamed.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(
            f"plan {options.plan} was made for another model ({plan.model.model_id}), not '{options.source.model}'"
        )
    if kv_cache == KVCache.LATENT:
        try:
            check_latent_kv_support(streamed.skeleton)
        except LatentKVError as error:
            raise SwiftSVDError(str(error)) from None
    check_shapes(work, manifest, streamed, spec)
    size = _written_bytes(streamed, spec, plan, options.merge)
    require_disk(options.out.parent, size, f"the compressed checkpoint {options.out}")
    compensator: Compensator | None = None
    if options.compensate:
        install = partial(install_factors, merge=options.merge, factor_dtype=factor_dtype, dtype=streamed.dtype)
        planned = {(p.layer, p.module): p.rank for p in plan.modules if not p.dense}
        windows = manifest_windows(manifest, streamed.tokenizer)
        compensator = Compensator(streamed, spec, windows, planned, BATCH_SIZE, device, install)
    config = copy.deepcopy(streamed.config)
    config.dtype = str(streamed.stored_dtype(f"{spec.layers}.0.{spec.modules[0]}.weight")).removeprefix("torch.")
    counter = _Counter(streamed)
    tensors = _compressed_tensors(
        streamed,
        spec,
        plan.rank_map(),
        compensator or factors,
        counter,
        merge=options.merge,
        factor_dtype=None if factor_dtype is None else str(factor_dtype),
        num_layers=manifest.model.num_layers,
        device=device,
    )

    def section() -> CompressedSection:
        """The record of what was written, once every tensor is (the compensation's numbers are known then)."""
        compensation = None if compensator is None else compensator.result()
        return CompressedSection(
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
            provenance=make_provenance(plan=sha256_file(options.plan), model=streamed.fingerprint),
            factor_dtype=None if factor_dtype is None else str(factor_dtype),
            int8_dense=[f"{spec.layers}.{p.layer}.{p.module}" for p in plan.modules if p.dense]
            if factor_dtype == FactorDType.INT8
            else [],
            compensation=None if compensation is None else compensation_record(compensation, manifest.settings),
            kv_cache=str(kv_cache),
            kv_ratio=options.kv_ratio,
        )

    write_compressed(options.out, tensors, config, streamed.tokenizer, section, streamed.location, size)
    seconds = {"compress": time.perf_counter() - start}
    kv = [p for p in plan.modules if p.module in spec.kv]
    kv_kept = sum(p.rank for p in kv) / sum(p.m for p in kv) if kv_cache == KVCache.LATENT else None
    compensation = None if compensator is None else compensator.result()
    return CompressResult(
        options.out, plan, work, counter.before, counter.after, seconds, factor_dtype, compensation, kv_kept
    )


def compensation_record(result: CompensationResult, settings: CalibrationSettings) -> dict[str, Any]:
    """What the compressed directory records about an error-compensated compression."""
    return {
        "ratio_specific": True,
        "objective": "min over rank k of ||W X - W' X_hat||_F^2 + gamma ||W X - W' X||_F^2, X_hat = inputs from the "
        "compressed layers before",
        "gamma": ORIGINAL_WEIGHT,
        "calibration": jsonable(settings),
        "tokens": result.tokens,
        "damping": result.damping,
        "seconds": result.seconds,
    }
