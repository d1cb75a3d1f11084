"""Eigenbases of every target linear, computed once per WORK and cached as checksummed shards.

The spectrum of C = W G Wᵀ does not depend on the ratio, so every later `allocate` (any ratio, any
strategy) and every `compress` reads these shards instead of decomposing again.
Shard `eigen/layer_XXX.safetensors`: `<module>.eigenvalues` (all, float64) and `<module>.vectors`
(the top break-even-rank eigenvectors, float32: they become model weights, never more precise than that).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from swiftsvd_cli import artifacts
from swiftsvd_cli.architectures import ArchSpec, decoder_layers, target_linears
from swiftsvd_cli.artifacts import CalibrationManifest
from swiftsvd_cli.linalg import group_eigenbases
from swiftsvd_cli.log import progress

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
        if index not in manifest.eigen or not artifacts.shard_is_valid(work, manifest.eigen[index])
    ]
    with progress() as bar:
        task = bar.add_task("eigendecompositions", total=len(missing))
        for index in missing:
            grams = artifacts.read_shard(work, manifest.layers[index].shard)
            linears = target_linears(layers[index], spec)
            tensors: dict[str, torch.Tensor] = {}
            for group, names in spec.groups.items():
                weights = {name: linears[name].weight.detach().to(device) for name in names}
                bases = group_eigenbases(weights, grams[f"{group}.gram"].to(device))
                for name, basis in bases.items():
                    tensors[f"{name}.eigenvalues"] = basis.eigenvalues
                    tensors[f"{name}.vectors"] = basis.vectors.to(torch.float32)
            manifest.eigen[index] = artifacts.write_shard(work, eigen_shard_name(index), tensors)
            manifest.save(work)
            bar.advance(task)
    return missing


def read_eigenvalues(work: Path, manifest: CalibrationManifest, spec: ArchSpec) -> dict[tuple[int, str], torch.Tensor]:
    """All spectra, (layer, module) -> eigenvalues, read without loading the eigenvectors."""
    spectra: dict[tuple[int, str], torch.Tensor] = {}
    for index, shard in sorted(manifest.eigen.items()):
        path = artifacts.check_shard(work, shard)
        with safe_open(str(path), framework="pt") as handle:
            for name in spec.modules:
                spectra[(index, name)] = handle.get_tensor(f"{name}.eigenvalues")
    return spectra
