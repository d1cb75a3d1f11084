"""Eigenbases of every target linear, computed once per WORK and cached as checksummed shards, and the spectra.

The spectrum of C = W G Wᵀ does not depend on the ratio, so every later `allocate` (any ratio, any
strategy) and every `compress` reads these shards (format: swiftsvd_cli.artifacts.eigen) instead of
decomposing again. With every eigenbasis cached, spectra and shapes come from the WORK alone: no model load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.eigen import INDEX, EigenIndex, EigenRecord, eigen_shard_name, read_eigenvalues
from swiftsvd_cli.artifacts.format import VersionMismatchError
from swiftsvd_cli.artifacts.manifest import MANIFEST, CalibrationManifest
from swiftsvd_cli.artifacts.provenance import make_provenance
from swiftsvd_cli.core.linalg import Eigenbasis, group_eigenbases
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import ArchSpec, arch_for_type, decoder_layers, target_linears
from swiftsvd_cli.model.loading import LoadedModel, load_model

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


def _merged(index: EigenIndex, records: dict[int, EigenRecord]) -> EigenIndex:
    for layer, record in records.items():
        index = index.with_layer(layer, record)
    return index


def ensure_eigenbases(
    work: Path,
    manifest: CalibrationManifest,
    index: EigenIndex,
    missing: list[int],
    model: nn.Module,
    spec: ArchSpec,
    device: str,
) -> EigenIndex:
    """Compute the eigen shards of the `missing` layers into `index`; return the updated index.

    Under several processes each layer has one owner (balanced by cost): the owner writes its shard, the main
    process the index once every owner is done. Every process returns the same complete index.
    """
    layers = decoder_layers(model, spec)
    if index.fingerprint != manifest.model.fingerprint:
        index = EigenIndex(fingerprint=manifest.model.fingerprint, provenance=make_provenance())
    owner = distributed.owners([layer_cost(spec, manifest.shapes)] * len(missing), distributed.world_size())
    mine = [layer for layer, rank in zip(missing, owner, strict=True) if rank == distributed.rank()]

    def compute() -> dict[int, EigenRecord]:
        records: dict[int, EigenRecord] = {}
        with progress() as bar:
            task = bar.add_task("eigendecompositions", total=len(mine))
            for layer in mine:
                gram_shard = manifest.layers[layer].shard
                grams = store.read_shard(work, gram_shard, expect=manifest.gram_tensors(spec.groups))
                linears = target_linears(layers[layer], spec)
                tensors: dict[str, torch.Tensor] = {}
                for group, names in spec.groups.items():
                    weights = {name: linears[name].weight.detach() for name in names}
                    bases = _eigenbases(weights, grams[f"{group}.gram"], device, f"layer {layer} {group}")
                    for name, basis in bases.items():
                        tensors[f"{name}.eigenvalues"] = basis.eigenvalues
                        tensors[f"{name}.vectors"] = basis.vectors.to(torch.float32)
                shard = store.write_shard(work, eigen_shard_name(layer), tensors)
                records[layer] = EigenRecord(shard=shard, gram_sha256=gram_shard.sha256)
                if distributed.is_main():  # the main process's own layers are resumable at once
                    _merged(index, records).save(work / INDEX)
                bar.advance(task)
        return records

    for records in distributed.everyone(compute):
        index = _merged(index, records)
    if distributed.is_main():
        index.save(work / INDEX)
    distributed.barrier()  # the index is on disk before any process reads it
    return index


def _eigenbases(weights: dict[str, torch.Tensor], G: torch.Tensor, device: str, where: str) -> dict[str, Eigenbasis]:
    """`group_eigenbases` on `device`; if eigh does not converge there, once more in float64 on the CPU.

    GPU eigensolvers fail to converge on some ill-conditioned matrices that the CPU's LAPACK handles; a
    failure on the CPU too means the Gram itself is broken, which is the user's to know.
    """
    try:
        return group_eigenbases({name: W.to(device) for name, W in weights.items()}, G.to(device))
    except LinAlgError as error:
        first = str(error).splitlines()[0]
        logger.warning("%s: eigh did not converge on %s (%s); recomputing in float64 on the CPU", where, device, first)
    try:
        return group_eigenbases({name: W.cpu() for name, W in weights.items()}, G.cpu(), precision=torch.float64)
    except LinAlgError as error:
        raise SwiftSVDError(
            f"{where}: the eigendecomposition did not converge on {device} nor in float64 on the CPU "
            f"({str(error).splitlines()[0]}): recalibrate this WORK"
        ) from error


def load_matching_model(work: Path, manifest: CalibrationManifest, spec: str | None, device: str) -> LoadedModel:
    """The calibrated model, refusing any other (a WORK from another model is a silent-garbage risk)."""
    loaded = load_model(spec or manifest.model.spec, revision=manifest.model.revision, dtype="float32", device=device)
    if loaded.fingerprint != manifest.model.fingerprint:
        raise SwiftSVDError(
            f"model '{loaded.spec}' is not the one {work} was calibrated on "
            f"({manifest.model.model_id}): pass the right model or recalibrate"
        )
    return loaded


def calibrated_spec(work: Path, manifest: CalibrationManifest) -> ArchSpec:
    """The architecture of a WORK's model, once its manifest records a shape for exactly its target linears."""
    try:
        spec = arch_for_type(manifest.model.model_type)
    except SwiftSVDError as error:
        raise SwiftSVDError(f"{work / MANIFEST}: {error}") from None
    if set(manifest.shapes) != set(spec.modules):
        raise SwiftSVDError(
            f"{work / MANIFEST} records shapes of {sorted(manifest.shapes)}, not of the {manifest.model.model_type} "
            f"target linears {sorted(spec.modules)}: {manifest.REMEDY}"
        )
    return spec


def check_shapes(work: Path, manifest: CalibrationManifest, model: nn.Module, spec: ArchSpec) -> None:
    """Refuse a manifest whose recorded shapes are not the model's (plans and byte counts are sized by them)."""
    linears = target_linears(decoder_layers(model, spec)[0], spec)
    actual = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
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
    loaded: LoadedModel | None  # the model, when eigenbases had to be computed (None: not loaded at all)


def load_spectra(work: Path, manifest: CalibrationManifest, model: str | None, device: str) -> CalibratedSpectra:
    """Every spectrum of a WORK; the model is loaded only to eigendecompose layers that are not cached yet."""
    spec = calibrated_spec(work, manifest)

    def cached() -> tuple[EigenIndex, list[int]]:
        index = load_eigen_index(work, manifest)
        valid = set(index.valid_layers(work, manifest))  # hashes each shard once; the reads below only check sizes
        return index, [layer for layer in range(manifest.model.num_layers) if layer not in valid]

    index, missing = distributed.main_decides(cached)  # one view of the cache, before any process writes to it
    loaded = None
    if missing:
        loaded = load_matching_model(work, manifest, model, device)
        check_shapes(work, manifest, loaded.model, spec)
        index = ensure_eigenbases(work, manifest, index, missing, loaded.model, spec, device)
    eigenvalues = read_eigenvalues(work, index, manifest.shapes, spec.modules, verify=False)
    return CalibratedSpectra(spec, index, eigenvalues, dict(manifest.shapes), missing, loaded)
