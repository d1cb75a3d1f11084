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
from swiftsvd_cli.model.layerwise import capture_first_layer_inputs, iterate_batches, layer_output
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
    """Forward pre-hooks on one module per input group, accumulating G, Σ|x| and the token count."""

    def __init__(self, layer: nn.Module, spec: ArchSpec, device: torch.device | str) -> None:
        linears = target_linears(layer, spec)
        self.grams: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.handles = []
        for group, names in spec.groups.items():
            n = linears[names[0]].in_features
            self.grams[group] = make_empty_gram(n).to(device)
            self.abs_sums[group] = torch.zeros(n, dtype=torch.float64, device=device)
            self.handles.append(linears[names[0]].register_forward_pre_hook(self._hook(group)))

    def _hook(self, group: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            count = accumulate_gram(self.grams[group], x)
            self.abs_sums[group] += x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)
            if group == next(iter(self.grams)):
                self.tokens += count

        return hook

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
        manifest.save_to(work)
        return manifest, missing

    manifest, missing = distributed.main_decides(prepare)
    if missing:
        share = torch.stack(distributed.my_share(list(windows), "calibration windows"))  # disjoint, deterministic
        manifest = _run_layers(loaded.model, layers, spec, share, options.batch_size, device, manifest, work, missing)
        manifest = distributed.main_decides(lambda: manifest)  # the one the main process wrote
    if distributed.is_main():
        store.atomic_write_json(work / "importance.json", manifest.importance())
    return CalibrationResult(manifest, missing, time.perf_counter() - start)


def _run_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    spec: ArchSpec,
    windows: torch.Tensor,
    batch_size: int,
    device: str,
    manifest: CalibrationManifest,
    work: Path,
    missing: list[int],
) -> CalibrationManifest:
    """Push `windows` through layers 0..max(missing), accumulating statistics on the missing ones.

    Under several processes `windows` is this process's share: the statistics (sums all) are summed over the
    processes before the main process writes each layer's shard and the manifest.
    """
    inputs = capture_first_layer_inputs(model, layers, windows, batch_size)
    with progress() as bar:
        task = bar.add_task("calibrating", total=max(missing) + 1)
        for index in range(max(missing) + 1):
            layer = layers[index].to(device)
            stats = _GroupStats(layer, spec, device) if index in missing else None
            importance = 0.0
            for batch, hidden, kwargs in iterate_batches(inputs, device):
                out = layer_output(layer, hidden, kwargs)
                importance += _importance_sum(hidden, out)
                inputs.hidden[batch] = out.cpu()
            layers[index].to("cpu")
            if stats is not None:
                local = stats.remove() | {"importance": torch.tensor(importance, dtype=torch.float64)}
                tensors = distributed.sum_over_processes(local)
                importance = float(tensors.pop("importance"))
                tokens = int(tensors["tokens"])
                if distributed.is_main():
                    shard = store.write_shard(work, shard_name(index), tensors)
                    record = LayerRecord(shard=shard, tokens=tokens, importance=importance / tokens)
                    manifest = manifest.with_layer(index, record)
                    manifest.save_to(work)
                logger.debug("layer %d: %d tokens, importance %.4f", index, tokens, importance / tokens)
            bar.advance(task)
    return manifest
