"""Eigenbases of every target linear, computed once per WORK and cached as checksummed shards, and the spectra.

The spectrum of C = W G Wᵀ does not depend on the ratio, so every later `allocate` (any ratio, any
strategy) and every `compress` reads these shards instead of decomposing again.
Shard `eigen/layer_XXX.safetensors`: `<module>.eigenvalues` (all, float64) and `<module>.vectors`
(the top break-even-rank eigenvectors, float32: they become model weights, never more precise than that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.core.linalg import group_eigenbases
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.model.architectures import ArchSpec, arch_for, decoder_layers, target_linears
from swiftsvd_cli.model.loading import LoadedModel, load_model

logger = logging.getLogger("swiftsvd")


def eigen_shard_name(index: int) -> str:
    return f"eigen/layer_{index:03d}.safetensors"


def ensure_eigenbases(
    work: Path, manifest: CalibrationManifest, model: nn.Module, spec: ArchSpec, device: str
) -> list[int]:
    """Compute the eigen shards that are missing or invalid; return the layer indices computed."""
    layers = decoder_layers(model, spec)
    missing = [
        index
        for index in range(len(layers))
        if index not in manifest.eigen or not store.shard_is_valid(work, manifest.eigen[index])
    ]
    with progress() as bar:
        task = bar.add_task("eigendecompositions", total=len(missing))
        for index in missing:
            grams = store.read_shard(work, manifest.layers[index].shard)
            linears = target_linears(layers[index], spec)
            tensors: dict[str, torch.Tensor] = {}
            for group, names in spec.groups.items():
                weights = {name: linears[name].weight.detach().to(device) for name in names}
                bases = group_eigenbases(weights, grams[f"{group}.gram"].to(device))
                for name, basis in bases.items():
                    tensors[f"{name}.eigenvalues"] = basis.eigenvalues
                    tensors[f"{name}.vectors"] = basis.vectors.to(torch.float32)
            manifest.eigen[index] = store.write_shard(work, eigen_shard_name(index), tensors)
            manifest.save(work)
            bar.advance(task)
    return missing


def read_eigenvalues(work: Path, manifest: CalibrationManifest, spec: ArchSpec) -> dict[tuple[int, str], torch.Tensor]:
    """All spectra, (layer, module) -> eigenvalues, read without loading the eigenvectors."""
    spectra: dict[tuple[int, str], torch.Tensor] = {}
    for index, shard in sorted(manifest.eigen.items()):
        path = store.check_shard(work, shard)
        with safe_open(str(path), framework="pt") as handle:
            for name in spec.modules:
                spectra[(index, name)] = handle.get_tensor(f"{name}.eigenvalues")
    return spectra


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
