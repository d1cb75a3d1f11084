"""Eigenbases of every target linear, computed once per WORK and cached as checksummed shards, and the spectra.

The spectrum of C = W G Wᵀ does not depend on the ratio, so every later `allocate` (any ratio, any
strategy) and every `compress` reads these shards (format: swiftsvd_cli.artifacts.eigen) instead of
decomposing again. With every eigenbasis cached, spectra and shapes come from the WORK alone: no model read.
Otherwise weights are read from the checkpoint one input group at a time, so host and device memory hold one
group's weights in float64, never the model. Under several processes each missing layer has one owner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.eigen import (
    INDEX,
    EigenIndex,
    EigenRecord,
    eigen_shard_name,
    eigen_tensor_specs,
    eigen_tensors,
    read_eigenvalues,
)
from swiftsvd_cli.artifacts.format import VersionMismatchError
from swiftsvd_cli.artifacts.manifest import MANIFEST, CalibrationManifest
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.core.linalg import Eigenbasis, group_eigenbases, output_gram_eigenbasis
from swiftsvd_cli.engine.covariance import input_gram, output_gram
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import ArchSpec, arch_for_type
from swiftsvd_cli.model.streaming import StreamedModel, open_model

logger = logging.getLogger("swiftsvd")
LinAlgError: type[Exception] = torch.linalg.LinAlgError  # type: ignore[attr-defined]  # public, not in the stubs


def load_eigen_index(work: Path, manifest: CalibrationManifest) -> EigenIndex:
    """The WORK's eigen index, or an empty one (none yet, or of a format this swiftsvd no longer reads: a cache)."""
    if (work / INDEX).is_file():
        try:
            return EigenIndex.load(work)
        except VersionMismatchError as error:
            logger.warning("%s; recomputing the eigenbases", error)
    return EigenIndex(fingerprint=manifest.model.fingerprint, provenance=make_provenance())


def layer_cost(spec: ArchSpec, shapes: dict[str, tuple[int, int]]) -> float:
    """Work of one layer's eigendecompositions: each eigenproblem is min(m, n) wide (eigh is cubic), plus one
    n × n Gram square root per input group that has a module with m > n."""
    cost = 0.0
    for names in spec.groups.values():
        cost += sum(float(min(shapes[name])) ** 3 for name in names)
        wide = [shapes[name][1] for name in names if shapes[name][0] > shapes[name][1]]
        cost += float(wide[0]) ** 3 if wide else 0.0
    return cost


def layer_eigenbases(
    streamed: StreamedModel, spec: ArchSpec, index: int, grams: Mapping[str, torch.Tensor], device: str
) -> dict[str, torch.Tensor]:
    """The eigen shard tensors of decoder layer `index`, from its covariance shard tensors and its weights."""
    tensors: dict[str, torch.Tensor] = {}
    for group, names in spec.groups.items():
        weights = {name: streamed.tensor(f"{spec.layers}.{index}.{name}.weight") for name in names}
        bases = _solved(partial(_group_eigenbases, weights, grams, group), device, f"layer {index} {group}")
        for name, basis in bases.items():
            tensors |= eigen_tensors(name, basis)
    return tensors


def _group_eigenbases(
    weights: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor], group: str, device: str
) -> dict[str, Eigenbasis]:
    """One input group's eigenbases on `device`, from its input Gram or its modules' output Grams."""
    if f"{group}.gram" in grams:
        on_device = {name: W.to(device=device, dtype=torch.float64) for name, W in weights.items()}
        return group_eigenbases(on_device, input_gram(grams, group).to(device))
    return {
        name: output_gram_eigenbasis(output_gram(grams, name).to(device), W.shape[1]) for name, W in weights.items()
    }


def _solved(solve: Callable[[str], dict[str, Eigenbasis]], device: str, where: str) -> dict[str, Eigenbasis]:
    """`solve` on `device` (in SVD_PRECISION, float64); if eigh does not converge there, once more on the CPU.

    GPU eigensolvers fail to converge on some ill-conditioned matrices that the CPU's LAPACK handles; a
    failure on the CPU too means the Gram itself is broken, which is the user's to know.
    """
    try:
        return solve(device)
    except LinAlgError as error:
        first = str(error).splitlines()[0]
        logger.warning("%s: eigh did not converge on %s (%s); recomputing in float64 on the CPU", where, device, first)
    try:
        return solve("cpu")
    except LinAlgError as error:
        raise SwiftSVDError(
            f"{where}: the eigendecomposition did not converge on {device} nor in float64 on the CPU "
            f"({str(error).splitlines()[0]}): recalibrate this WORK"
        ) from error


def _merged(index: EigenIndex, records: dict[int, EigenRecord]) -> EigenIndex:
    for layer, record in records.items():
        index = index.with_layer(layer, record)
    return index


def ensure_eigenbases(
    work: Path,
    manifest: CalibrationManifest,
    index: EigenIndex,
    missing: list[int],
    streamed: StreamedModel,
    spec: ArchSpec,
    devices: Sequence[str],
) -> EigenIndex:
    """Compute the eigen shards of the `missing` layers into `index`; return the updated index.

    Under several processes each layer has one owner (balanced by cost): the owner writes its shard, the main
    process the index once every owner is done. Every process returns the same complete index. Within a process,
    several `devices` (`--device auto` on a multi-GPU machine) share its layers the same way, one thread each:
    eigh releases the interpreter lock, so the GPUs can work at once (not yet measured on GPUs).
    """
    if index.fingerprint != manifest.model.fingerprint:
        index = EigenIndex(fingerprint=manifest.model.fingerprint, provenance=make_provenance())
    per_layer = store.shard_bytes(eigen_tensor_specs(manifest.shapes, spec.modules, manifest.layers[0].tokens))
    if distributed.is_main():
        store.require_disk(work, len(missing) * per_layer, f"eigenbases of {len(missing)} layers")
    cost = layer_cost(spec, manifest.shapes)
    owner = distributed.owners([cost] * len(missing), distributed.world_size())
    mine = [layer for layer, rank in zip(missing, owner, strict=True) if rank == distributed.rank()]
    on_device = distributed.owners([cost] * len(mine), len(devices))
    shares = [[layer for layer, d in zip(mine, on_device, strict=True) if d == i] for i in range(len(devices))]
    records: dict[int, EigenRecord] = {}
    recording = threading.Lock()
    stop = threading.Event()  # a failure on one device stops the others after their current layer

    def solve(device: str, layers: list[int], advance: Callable[[], None]) -> None:
        for layer in layers:
            if stop.is_set():
                return
            gram_shard = manifest.layers[layer].shard
            grams = store.read_shard(work, gram_shard, expect=manifest.gram_tensors(spec.groups))
            shard = store.write_shard(
                work, eigen_shard_name(layer), layer_eigenbases(streamed, spec, layer, grams, device)
            )
            with recording:
                records[layer] = EigenRecord(shard=shard, gram_sha256=gram_shard.sha256)
                if distributed.is_main():  # the main process's own layers are resumable at once
                    _merged(index, records).save(work / INDEX)
            advance()

    def compute() -> dict[int, EigenRecord]:
        with progress() as bar:
            task = bar.add_task("eigendecompositions", total=len(mine))
            advance = partial(bar.advance, task)
            if len(devices) == 1:
                solve(devices[0], shares[0], advance)
                return records
            with ThreadPoolExecutor(len(devices), thread_name_prefix="eigen") as pool:
                running = [
                    pool.submit(solve, device, share, advance) for device, share in zip(devices, shares, strict=True)
                ]
                try:
                    for done in as_completed(running):
                        done.result()
                finally:
                    stop.set()
        return records

    for found in distributed.everyone(compute):
        index = _merged(index, found)
    if distributed.is_main():
        index.save(work / INDEX)
    distributed.barrier()  # the index is on disk before any process reads it
    return index


def open_matching_model(work: Path, manifest: CalibrationManifest, spec: str | None, device: str) -> StreamedModel:
    """The calibrated model (float32 compute), refusing any other: a WORK from another model is silent garbage."""
    streamed = open_model(spec or manifest.model.spec, revision=manifest.model.revision, dtype="float32", device=device)
    if streamed.fingerprint != manifest.model.fingerprint:
        raise SwiftSVDError(
            f"model '{streamed.spec}' is not the one {work} was calibrated on "
            f"({manifest.model.model_id}): pass the right model or recalibrate"
        )
    return streamed


def calibrated_spec(work: Path, manifest: CalibrationManifest) -> ArchSpec:
    """The architecture of a WORK's model, once its manifest records a shape and a Gram form for exactly its target
    linears and input groups."""
    try:
        spec = arch_for_type(manifest.model.model_type)
    except SwiftSVDError as error:
        raise SwiftSVDError(f"{work / MANIFEST}: {error}") from None
    if set(manifest.shapes) != set(spec.modules):
        raise SwiftSVDError(
            f"{work / MANIFEST} records shapes of {sorted(manifest.shapes)}, not of the {manifest.model.model_type} "
            f"target linears {sorted(spec.modules)}: {manifest.REMEDY}"
        )
    if set(manifest.grams) != set(spec.groups):
        raise SwiftSVDError(
            f"{work / MANIFEST} records Gram forms of {sorted(manifest.grams)}, not of the "
            f"{manifest.model.model_type} input groups {sorted(spec.groups)}: {manifest.REMEDY}"
        )
    return spec


def check_shapes(work: Path, manifest: CalibrationManifest, streamed: StreamedModel, spec: ArchSpec) -> None:
    """Refuse a manifest whose recorded shapes are not the model's (plans and byte counts are sized by them)."""
    actual = {
        name: tuple(streamed.weights.shape(streamed.stored.get(key, key)))
        for name in spec.modules
        for key in [f"{spec.layers}.0.{name}.weight"]
    }
    if actual != manifest.shapes:
        raise SwiftSVDError(f"{work / MANIFEST} records target shapes that are not the model's: {manifest.REMEDY}")


@dataclass(frozen=True)
class CalibratedSpectra:
    """The spectrum of every target linear of a WORK: what plans and reports are made from."""

    spec: ArchSpec
    index: EigenIndex
    eigenvalues: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> all eigenvalues of C
    shapes: dict[str, tuple[int, int]]  # module -> (m, n), the same in every layer
    computed: list[int]  # layers eigendecomposed by this call (the others were cached)
    streamed: StreamedModel | None  # the opened model, when eigenbases had to be computed (None: not opened)


def load_spectra(
    work: Path, manifest: CalibrationManifest, model: str | None, device: str, eigen_devices: Sequence[str] = ()
) -> CalibratedSpectra:
    """Every spectrum of a WORK; the model is opened (on `device`) only to eigendecompose layers that are not
    cached yet, on `eigen_devices` (default: `device`)."""
    spec = calibrated_spec(work, manifest)

    def cached() -> tuple[EigenIndex, list[int]]:
        index = load_eigen_index(work, manifest)
        valid = set(index.valid_layers(work, manifest))  # hashes each shard once; the reads below only check sizes
        return index, [layer for layer in range(manifest.model.num_layers) if layer not in valid]

    index, missing = distributed.main_decides(cached)  # one view of the cache, before any process writes to it
    streamed = None
    if missing:
        streamed = open_matching_model(work, manifest, model, device)
        check_shapes(work, manifest, streamed, spec)
        index = ensure_eigenbases(work, manifest, index, missing, streamed, spec, eigen_devices or [device])
    eigenvalues = read_eigenvalues(work, index, manifest.shapes, spec.modules, verify=False)
    return CalibratedSpectra(spec, index, eigenvalues, dict(manifest.shapes), missing, streamed)
