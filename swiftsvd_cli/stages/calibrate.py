"""Stage 1: stream calibration windows layer by layer and write float64 input Grams per input group.

Per decoder layer and input group (q/k/v share one, gate/up share one, o and down their own) we store
`G = Σ x xᵀ`, the per-channel `Σ |x|` (ASVD's scaling), the token count, and the layer's importance
`BI = mean(1 − cos(h_in, h_out))` (ShortGPT). Grams do not depend on the ratio, so one calibration serves
every ratio, plan and method. A rerun verifies finished shards and recomputes only missing or broken ones.
"""

from __future__ import annotations

import logging
import shutil
import time
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
from swiftsvd_cli.config import BATCH_SIZE, DATA, SAMPLER, SAMPLES, SEED, SEQLEN, Sampler, choice
from swiftsvd_cli.core.linalg import accumulate_gram, make_empty_gram
from swiftsvd_cli.data.text import load_text, sample_windows
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import ArchSpec, arch_for, decoder_layers, target_linears
from swiftsvd_cli.model.layerwise import LayerInputs, capture_first_layer_inputs, iterate_batches, layer_output
from swiftsvd_cli.model.loading import LoadedModel, ModelSource

logger = logging.getLogger("swiftsvd")
DERIVED = ("eigen", "plans", "importance.json")  # artifacts computed from the Grams, invalid without them


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
    force: bool = False
    skip_nonfinite: bool = False  # leave out windows whose activations overflow (recorded per layer) instead of failing


@dataclass(frozen=True)
class CalibrationResult:
    manifest: CalibrationManifest
    computed_layers: list[int]
    seconds: float

    @property
    def disk_bytes(self) -> int:
        return sum(record.shard.bytes for record in self.manifest.layers.values())


def shard_name(index: int) -> str:
    return f"covariance/layer_{index:03d}.safetensors"


def model_info(loaded: LoadedModel, num_layers: int) -> ModelInfo:
    return ModelInfo(
        spec=loaded.spec,
        model_id=loaded.model_id,
        revision=loaded.revision,
        fingerprint=loaded.fingerprint,
        model_type=loaded.model.config.model_type,
        num_layers=num_layers,
    )


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


class _GroupStats:
    """Forward pre-hooks on one module per input group, accumulating G, Σ|x| and the token count.

    A batch's inputs are held until its forward pass ends, then added only if every one is finite: a batch
    that overflows (NaN or Inf anywhere in the layer) leaves no trace in any group's statistics.
    """

    def __init__(self, layer: nn.Module, spec: ArchSpec, device: torch.device | str) -> None:
        linears = target_linears(layer, spec)
        self.grams: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}  # this batch's input per group, until `commit` or `discard`
        self.tokens = 0
        self.handles = []
        for group, names in spec.groups.items():
            n = linears[names[0]].in_features
            self.grams[group] = make_empty_gram(n).to(device)
            self.abs_sums[group] = torch.zeros(n, dtype=torch.float64, device=device)
            self.handles.append(linears[names[0]].register_forward_pre_hook(self._hook(group)))

    def _hook(self, group: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.pending[group] = args[0].detach()

        return hook

    def finite(self) -> bool:
        return all(bool(torch.isfinite(x).all()) for x in self.pending.values())

    def commit(self) -> None:
        for group, x in self.pending.items():
            count = accumulate_gram(self.grams[group], x)
            self.abs_sums[group] += x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)
            if group == next(iter(self.grams)):
                self.tokens += count
        self.pending.clear()

    def remove(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        tensors = {f"{group}.gram": gram for group, gram in self.grams.items()}
        tensors |= {f"{group}.abs_sum": value for group, value in self.abs_sums.items()}
        tensors["tokens"] = torch.tensor(self.tokens, dtype=torch.int64)
        return tensors


def _importance_sum(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Σ over tokens of 1 − cos(h_in, h_out), in float64 (ShortGPT's Block Influence before averaging)."""
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
    return float((1.0 - cos).sum())


@torch.no_grad()
def run_calibrate(options: CalibrateOptions) -> CalibrationResult:
    """Compute (or resume) the per-layer Grams of `options.source` into `options.work`."""
    if options.samples < 1 or options.seqlen < 2 or options.batch_size < 1:
        raise SwiftSVDError("--samples, --batch-size must be >= 1 and --seqlen >= 2")
    sampler = choice(Sampler, options.sampler)
    work = options.work
    if work.exists() and not work.is_dir():
        raise SwiftSVDError(f"--out {work} exists and is not a directory")
    work.mkdir(parents=True, exist_ok=True)
    with work_lock(work):
        return _calibrate(options, sampler)


def _calibrate(options: CalibrateOptions, sampler: Sampler) -> CalibrationResult:
    work = options.work
    # the main process reads (and with --force clears) WORK; fail on a corrupt one before the (slow) model load
    old = distributed.main_decides(lambda: _existing_manifest(work, options.force))
    start = time.perf_counter()
    device = options.source.compute_device
    loaded = options.source.load(keep_on_cpu=True)
    spec = arch_for(loaded.model.config)
    layers = decoder_layers(loaded.model, spec)
    source = load_text(options.data, "train")
    settings = CalibrationSettings(
        data=options.data,
        data_id=source.id,
        data_sha256=source.sha256,
        samples=options.samples,
        seqlen=options.seqlen,
        seed=options.seed,
        dtype=str(next(loaded.model.parameters()).dtype),
        sampler=str(sampler),
    )
    info = model_info(loaded, len(layers))
    windows = sample_windows(sampler, loaded.tokenizer, source.text, options.samples, options.seqlen, options.seed)
    linears = target_linears(layers[0], spec)
    widest = max(linear.in_features for linear in linears.values())
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
            shapes={name: (linear.out_features, linear.in_features) for name, linear in linears.items()},
            options=jsonable(options),
            provenance=make_provenance(model=info.fingerprint, data=settings.data_sha256),
        )
        missing = [
            i
            for i in range(len(layers))
            if i not in manifest.layers or not store.shard_is_valid(work, manifest.layers[i].shard)
        ]
        for index in missing:
            manifest = manifest.with_layer(index, None)  # its eigenbasis is invalid too: eigen/index.json has the Gram
        store.remove_stale_temps(work.rglob(".*"))  # a killed run's; under the WORK lock, so none is a live writer's
        manifest.save_to(work)
        return manifest, missing

    manifest, missing = distributed.main_decides(prepare)
    if missing:
        share = torch.stack(distributed.my_share(list(windows), "calibration windows"))  # disjoint, deterministic
        offset = sum(distributed.everyone(lambda: share.shape[0])[: distributed.rank()])  # shares are contiguous
        manifest = _run_layers(loaded.model, layers, spec, share, options, device, manifest, missing, offset)
        manifest = distributed.main_decides(lambda: manifest)  # the one the main process wrote
    if distributed.is_main():
        store.atomic_write_json(work / "importance.json", manifest.importance())
    return CalibrationResult(manifest, missing, time.perf_counter() - start)


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
    stats: _GroupStats | None,
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
        if not bool(torch.isfinite(out).all()) or (stats is not None and not stats.finite()):
            samples = list(range(first, first + hidden.shape[0]))
            _nonfinite(index, samples, str(hidden.dtype), options.skip_nonfinite)
            newly += samples
            if stats is not None:
                stats.pending.clear()
            continue
        if stats is not None:
            stats.commit()
        importance += _importance_sum(hidden, out)
        inputs.hidden[batch] = out.cpu()
    return importance, newly


def _run_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    spec: ArchSpec,
    windows: torch.Tensor,
    options: CalibrateOptions,
    device: str,
    manifest: CalibrationManifest,
    missing: list[int],
    offset: int,
) -> CalibrationManifest:
    """Push `windows` through layers 0..max(missing), accumulating statistics on the missing ones.

    Under several processes `windows` is this process's share (from window `offset` on): each checks its own
    batches for NaN/Inf before anything is summed, the statistics (sums all) are summed over the processes before
    the main process writes each layer's shard and the manifest, and a window skipped by any process is recorded.
    """
    batch_size, work = options.batch_size, options.work
    inputs = capture_first_layer_inputs(model, layers, windows, batch_size)
    skipped: list[int] = []  # windows left out from the layer where their activations stopped being finite
    with progress() as bar:
        task = bar.add_task("calibrating", total=max(missing) + 1)
        for index in range(max(missing) + 1):
            layer = layers[index].to(device)
            stats = _GroupStats(layer, spec, device) if index in missing else None
            passes = distributed.everyone(
                partial(_layer_pass, index, layer, stats, inputs, device, options, offset, skipped)
            )
            importance = sum(part for part, _ in passes)  # summed over the processes' shares
            skipped += sorted(sample for _, newly in passes for sample in newly)
            layers[index].to("cpu")
            if stats is not None:
                tensors = distributed.sum_over_processes(stats.remove())
                tokens = int(tensors["tokens"])
                if tokens == 0:
                    raise SwiftSVDError(f"layer {index}: every calibration window was skipped (NaN or Inf)")
                if distributed.is_main():
                    shard = store.write_shard(work, shard_name(index), tensors)
                    record = LayerRecord(
                        shard=shard, tokens=tokens, importance=importance / tokens, skipped=list(skipped)
                    )
                    manifest = manifest.with_layer(index, record)
                    manifest.save_to(work)
                logger.debug("layer %d: %d tokens, importance %.4f", index, tokens, importance / tokens)
            bar.advance(task)
    return manifest
