"""Stage 1: stream calibration windows layer by layer and write float64 Grams per input group.

Per decoder layer and input group (q/k/v share one, gate/up share one, o and down their own) we store `G = Σ x xᵀ`
or, where smaller, its consumers' `C = W G Wᵀ` (engine.covariance), the per-channel `Σ |x|` (ASVD's scaling), the
token count, and the layer's importance `BI = mean(1 − cos(h_in, h_out))` (ShortGPT). Grams do not depend on the
ratio, so one calibration serves every ratio, plan and method. Only the embeddings, then one decoder layer at a
time (the next one read ahead in the background) are loaded from the checkpoint; shards are written in the
background while the next layer runs. A rerun verifies finished shards and recomputes only missing or broken ones.
Under several processes each takes a disjoint share of the windows; per layer the sums are all-reduced before
the main process writes the shard and the manifest.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.format import VersionMismatchError, jsonable
from swiftsvd_cli.artifacts.lock import work_lock
from swiftsvd_cli.artifacts.manifest import MANIFEST, CalibrationManifest, CalibrationSettings, LayerRecord, ModelInfo
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.config import (
    BATCH_SIZE,
    DATA,
    GRAM_PRODUCTS,
    OFFLOAD,
    SAMPLER,
    SAMPLES,
    SEED,
    SEQLEN,
    GramProducts,
    Offload,
    Sampler,
    choice,
)
from swiftsvd_cli.core.grams import GramPrecision, all_finite
from swiftsvd_cli.data.text import load_text, sample_windows
from swiftsvd_cli.engine.covariance import GramForm, LayerStats, auto_gram_precision, gram_forms, pack
from swiftsvd_cli.engine.footprint import Footprint, calibration_footprint
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import ArchSpec, arch_for, decoder_layers, module_shapes
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype
from swiftsvd_cli.model.layerwise import (
    HiddenStates,
    LayerInputs,
    capture_first_layer_inputs,
    iterate_batches,
    layer_output,
)
from swiftsvd_cli.model.loading import ModelSource, resolve, skeleton
from swiftsvd_cli.model.streaming import StreamedModel

logger = logging.getLogger("swiftsvd")
DERIVED = ("eigen", "plans", "importance.json")  # artifacts computed from the Grams, invalid without them
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default: a zero hidden state has cosine 0


@dataclass(frozen=True)
class CalibrateOptions:
    source: ModelSource
    work: Path
    data: str = DATA
    samples: int = SAMPLES
    seqlen: int = SEQLEN
    seed: int = SEED
    sampler: Sampler = SAMPLER
    batch_size: int = BATCH_SIZE
    gram_precision: GramProducts = GRAM_PRODUCTS
    keep_input_grams: bool = False  # every input Gram, also where output Grams are smaller (SVD-LLM needs them)
    offload_hidden: Offload = OFFLOAD
    force: bool = False
    skip_nonfinite: bool = False  # leave out windows whose activations overflow (recorded per layer) instead of failing

    def precision(self) -> GramPrecision:
        """The Gram product route: the one asked for, or per device for `auto` (engine.covariance)."""
        chosen = choice(GramProducts, self.gram_precision)
        if chosen == GramProducts.AUTO:
            return auto_gram_precision(self.source.compute_device)
        return "float64" if chosen == GramProducts.FLOAT64 else "float32"


@dataclass(frozen=True)
class CalibrationResult:
    manifest: CalibrationManifest
    computed_layers: list[int]
    seconds: float
    footprint: Footprint

    @property
    def disk_bytes(self) -> int:
        return sum(record.shard.bytes for record in self.manifest.layers.values())


def shard_name(index: int) -> str:
    return f"covariance/layer_{index:03d}.safetensors"


def model_info(streamed: StreamedModel, num_layers: int) -> ModelInfo:
    return ModelInfo(
        spec=streamed.spec,
        model_id=streamed.model_id,
        revision=streamed.revision,
        fingerprint=streamed.fingerprint,
        model_type=streamed.config.model_type,
        num_layers=num_layers,
    )


def _check_options(options: CalibrateOptions) -> None:
    if options.samples < 1 or options.seqlen < 2 or options.batch_size < 1:
        raise SwiftSVDError("--samples, --batch-size must be >= 1 and --seqlen >= 2")
    choice(Sampler, options.sampler)
    choice(Offload, options.offload_hidden)
    if options.work.exists() and not options.work.is_dir():
        raise SwiftSVDError(f"--out {options.work} exists and is not a directory")
    options.precision()  # an unknown --gram-precision fails here, before the model is read


def _footprint(
    model: nn.Module, spec: ArchSpec, options: CalibrateOptions, dtype: torch.dtype
) -> tuple[Footprint, dict[str, GramForm]]:
    shapes = module_shapes(model, spec)
    forms = gram_forms(shapes, spec, options.keep_input_grams)
    footprint = calibration_footprint(
        model,
        spec,
        shapes,
        forms,
        samples=options.samples,
        seqlen=options.seqlen,
        batch_size=options.batch_size,
        dtype=dtype,
        device=options.source.compute_device,
        precision=options.precision(),
        offload=options.offload_hidden == Offload.DISK,
    )
    return footprint, forms


def dry_run(options: CalibrateOptions) -> Footprint:
    """What `run_calibrate` would need, from the model's config alone (no weights, no data read)."""
    _check_options(options)
    source = options.source
    resolved = resolve(source.model, source.revision, source.trust_remote_code)
    dtype = resolve_dtype(source.dtype, source.compute_device, checkpoint_dtype(resolved.config))
    model = skeleton(resolved.config, dtype)
    return _footprint(model, arch_for(model.config), options, dtype)[0]


def _existing_manifest(work: Path, force: bool) -> CalibrationManifest | None:
    """The WORK's manifest, if any; with --force, one of a format this swiftsvd cannot read is cleared."""
    if not (work / MANIFEST).exists():
        return None
    try:
        return CalibrationManifest.load(work)
    except VersionMismatchError as error:
        if not force:
            raise
        logger.warning("--force: replacing the calibration in %s (%s)", work, error)
        _clear(work)
        return None


def _clear(work: Path) -> None:
    """Delete a WORK's Grams and everything derived from them (not the manifest: the caller rewrites it)."""
    for name in ("covariance", *DERIVED):
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _check_compatible(
    old: CalibrationManifest, model: ModelInfo, settings: CalibrationSettings, force: bool, work: Path
) -> bool:
    """True if `old` can be resumed; with --force a mismatching WORK is cleared, otherwise refused."""
    changed = (["model"] if old.model.fingerprint != model.fingerprint else []) + store.differences(
        old.settings, settings
    )
    if not changed:
        return True
    if not force:
        raise SwiftSVDError(
            f"{work} holds a calibration with other {', '.join(changed)} ({old.model.model_id}): "
            "use another --out, or --force to replace it"
        )
    logger.warning("--force: replacing the calibration in %s (%s changed)", work, ", ".join(changed))
    _clear(work)
    return False


def importance_sum(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Σ over tokens of 1 − cos(h_in, h_out), in float64 (ShortGPT's Block Influence before averaging).

    Written out (one dot product and two norms per token) rather than `cosine_similarity`, which took 2.7
    times as long on the demo's batches; norms are clamped at `COSINE_EPS` as there.
    """
    a, b = h_in.double(), h_out.double()
    norm_a, norm_b = (torch.linalg.vector_norm(h, dim=-1).clamp_min(COSINE_EPS) for h in (a, b))
    return float((1.0 - torch.linalg.vecdot(a, b) / (norm_a * norm_b)).sum())


@torch.no_grad()
def run_calibrate(options: CalibrateOptions) -> CalibrationResult:
    """Compute (or resume) the per-layer Grams of `options.source` into `options.work`."""
    _check_options(options)
    options.work.mkdir(parents=True, exist_ok=True)
    with work_lock(options.work):
        return _calibrate(options, choice(Sampler, options.sampler))


def _calibrate(options: CalibrateOptions, sampler: Sampler) -> CalibrationResult:
    work = options.work
    # the main process reads (and with --force clears) WORK; fail on a corrupt one before the model is read
    old = distributed.main_decides(lambda: _existing_manifest(work, options.force))
    start = time.perf_counter()
    device = options.source.compute_device
    streamed = options.source.open()
    spec = arch_for(streamed.config)
    footprint, forms = _footprint(streamed.skeleton, spec, options, streamed.dtype)
    source = load_text(options.data, "train")
    precision = options.precision()
    settings = CalibrationSettings(
        data=options.data,
        data_id=source.id,
        data_sha256=source.sha256,
        samples=options.samples,
        seqlen=options.seqlen,
        seed=options.seed,
        dtype=str(streamed.dtype),
        gram_precision=precision,
        keep_input_grams=options.keep_input_grams,
        sampler=str(sampler),
    )
    num_layers = len(decoder_layers(streamed.skeleton, spec))
    info = model_info(streamed, num_layers)
    windows = sample_windows(sampler, streamed.tokenizer, source.text, options.samples, options.seqlen, options.seed)
    shapes = module_shapes(streamed.skeleton, spec)
    widest = max(n for _, n in shapes.values())
    if windows.numel() < widest:
        logger.warning(
            "%d calibration tokens < input width %d: the Grams are rank-deficient (this still works)",
            windows.numel(),
            widest,
        )

    def prepare() -> tuple[CalibrationManifest, list[int]]:
        """The manifest to resume (or a new one) and the layers to compute, decided and saved by one process."""
        manifest = old if old is not None and _check_compatible(old, info, settings, options.force, work) else None
        manifest = manifest or CalibrationManifest(
            model=info,
            settings=settings,
            shapes=shapes,
            options=jsonable(options),
            provenance=make_provenance(model=info.fingerprint, data=settings.data_sha256),
            grams=dict(forms),
            device=_device_name(device),
        )
        missing = [
            i
            for i in range(num_layers)
            if i not in manifest.layers or not store.shard_is_valid(work, manifest.layers[i].shard)
        ]
        logger.info("calibrate %s: %s", streamed.model_id, footprint.summary())
        offloaded = footprint.hidden_bytes if footprint.offload else 0
        needed = len(missing) * footprint.covariance_layer_bytes + offloaded
        store.require_disk(work, needed if missing else 0, f"calibrating {len(missing)} layers")
        for index in missing:
            manifest = manifest.with_layer(index, None)  # its eigenbasis is invalid too: eigen/index.json has the Gram
        store.remove_stale_temps(work.rglob(".*"))  # a killed run's; under the WORK lock, so none is a live writer's
        manifest.save_to(work)
        return manifest, missing

    manifest, missing = distributed.main_decides(prepare)
    if missing:
        share = torch.stack(distributed.my_share(list(windows), "calibration windows"))  # disjoint, deterministic
        offset = sum(distributed.everyone(lambda: share.shape[0])[: distributed.rank()])  # shares are contiguous
        manifest = _run_layers(streamed, spec, share, options, manifest, missing, forms, precision, offset)
        manifest = distributed.main_decides(lambda: manifest)  # the one the main process wrote
    if distributed.is_main():
        store.atomic_write_json(work / "importance.json", manifest.importance())
    return CalibrationResult(manifest, missing, time.perf_counter() - start, footprint)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def _nonfinite(layer: int, samples: list[int], dtype: str, skip: bool) -> None:
    """A batch whose activations in `layer` hold NaN or Inf: an error naming its samples, or (skip) a warning."""
    where = f"layer {layer}: NaN or Inf activations in calibration samples {samples[0]}..{samples[-1]} ({dtype})"
    if not skip:
        raise SwiftSVDError(
            f"{where}: calibrate in float32 (--dtype float32), or pass --skip-nonfinite to leave them out"
        )
    logger.warning("%s: skipped (--skip-nonfinite); the manifest records them", where)


def _layer_pass(
    index: int,
    layer: nn.Module,
    stats: LayerStats | None,
    inputs: LayerInputs,
    device: str,
    options: CalibrateOptions,
    offset: int,
    skipped: list[int],
) -> tuple[float, list[int]]:
    """This process's batches through layer `index`: their importance sum and the samples newly skipped.

    Each batch is checked here, in the process that ran it, before its statistics are kept (and so before the
    sums over processes); samples are numbered over all windows, so every process records the same ones.
    """
    importance, newly = 0.0, []
    for batch, hidden, kwargs in iterate_batches(inputs, device):
        first = offset + batch * options.batch_size
        if first in skipped:
            continue
        out = layer_output(layer, hidden, kwargs)
        if not all_finite(out) or (stats is not None and not stats.finite()):
            samples = list(range(first, first + hidden.shape[0]))
            _nonfinite(index, samples, str(hidden.dtype), options.skip_nonfinite)
            newly += samples
            if stats is not None:
                stats.discard()
            continue
        if stats is not None:
            stats.commit()
        importance += importance_sum(hidden, out)
        inputs.hidden[batch] = out
    return importance, newly


class _Recorder:
    """Writes layer shards and records them in the manifest, on one writer thread, one layer after another."""

    def __init__(self, work: Path, manifest: CalibrationManifest) -> None:
        self.work, self.manifest = work, manifest

    def write(self, index: int, tensors: dict[str, torch.Tensor], importance: float, skipped: list[int]) -> None:
        tokens = int(tensors["tokens"])
        shard = store.write_shard(self.work, shard_name(index), tensors)
        record = LayerRecord(shard=shard, tokens=tokens, importance=importance / tokens, skipped=skipped)
        self.manifest = self.manifest.with_layer(index, record)
        self.manifest.save_to(self.work)
        logger.debug("layer %d: %d tokens, importance %.4f", index, tokens, importance / tokens)


def _run_layers(
    streamed: StreamedModel,
    spec: ArchSpec,
    windows: torch.Tensor,
    options: CalibrateOptions,
    manifest: CalibrationManifest,
    missing: list[int],
    forms: dict[str, GramForm],
    precision: GramPrecision,
    offset: int,
) -> CalibrationManifest:
    """Push `windows` through layers 0..max(missing), accumulating statistics on the missing ones.

    Under several processes `windows` is this process's share (from window `offset` on): each checks its own
    batches for NaN/Inf before anything is summed, the sums are added over the processes before the main process
    writes each layer's shard and the manifest, and a window skipped by any process is recorded.
    """
    work, device = options.work, options.source.compute_device
    layers = decoder_layers(streamed.skeleton, spec)
    # named by host and pid: each process its own, and a killed run's is swept by the next (store.remove_stale_temps)
    path = work / store.owned_temp_name("hidden-states") if options.offload_hidden == Offload.DISK else None
    hidden = HiddenStates.for_windows(windows, options.batch_size, streamed.config.hidden_size, streamed.dtype, path)
    recorder = _Recorder(work, manifest)
    skipped: list[int] = []  # windows left out from the layer where their activations stopped being finite
    writes: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=1) as writer, progress() as bar:
        try:
            with streamed.loaded(spec.embeddings, "cpu"):
                inputs = capture_first_layer_inputs(streamed.skeleton, layers, windows, hidden, "cpu")
            task = bar.add_task("calibrating", total=max(missing) + 1)
            for index in range(max(missing) + 1):
                with streamed.loaded(f"{spec.layers}.{index}", device) as layer:
                    if index + 1 <= max(missing):
                        streamed.prefetch(f"{spec.layers}.{index + 1}")
                    stats = LayerStats(layer, spec, forms, precision, device) if index in missing else None
                    passes = distributed.everyone(
                        partial(_layer_pass, index, layer, stats, inputs, device, options, offset, skipped)
                    )
                    importance = sum(part for part, _ in passes)  # summed over the processes' shares
                    skipped += sorted(sample for _, newly in passes for sample in newly)
                    # packed now, and the full sums dropped with `stats`: kept until the next layer is done, they
                    # doubled the float64 Grams held while it runs (0.54 GB per Llama-2-7B layer)
                    shard = pack(distributed.sum_over_processes(stats.remove())) if stats is not None else None
                    stats = None
                if shard is not None:
                    if int(shard["tokens"]) == 0:
                        raise SwiftSVDError(f"layer {index}: every calibration window was skipped (NaN or Inf)")
                    if distributed.is_main():
                        writes.append(writer.submit(recorder.write, index, shard, importance, list(skipped)))
                    shard = None  # the writer's until written
                bar.advance(task)
            for write in writes:
                write.result()
        finally:
            hidden.close()
    return recorder.manifest
