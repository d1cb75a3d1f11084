"""The eigenbasis cache of a WORK (`WORK/eigen/index.json` + `eigen/layer_XXX.safetensors`).

Shard `eigen/layer_XXX.safetensors`: `<module>.eigenvalues` (all, float64) and `<module>.vectors` (the top
break-even-rank eigenvectors, float32). The index records, per layer, the SHA-256 of the Gram shard each
eigen shard was computed from: a recalibrated layer invalidates exactly its own eigenbasis, and the eigen format
can change (version) without invalidating the Grams.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.format import Artifact, load_artifact
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.provenance import Provenance

INDEX = "eigen/index.json"


def eigen_shard_name(index: int) -> str:
    return f"eigen/layer_{index:03d}.safetensors"


@dataclass(frozen=True)
class EigenRecord:
    """One layer's eigen shard and the Gram shard it was derived from."""

    shard: store.Shard
    gram_sha256: str


@dataclass(frozen=True)
class EigenIndex(Artifact):
    """Which eigen shards a WORK holds, for which model (fingerprint) and from which Grams."""

    KIND: ClassVar[str] = "eigen"
    FORMAT_VERSION: ClassVar[int] = 1
    TITLE: ClassVar[str] = "eigenbasis index"
    REMEDY: ClassVar[str] = "delete WORK/eigen; the next `swiftsvd allocate` recomputes it"

    fingerprint: str  # of the model whose weights the eigenbases are computed from
    provenance: Provenance
    layers: dict[int, EigenRecord] = field(default_factory=dict)

    def valid_layers(self, work: Path, manifest: CalibrationManifest) -> list[int]:
        """Layers whose eigen shard matches the manifest's model and Gram and is intact on disk."""
        if self.fingerprint != manifest.model.fingerprint:
            return []
        return [
            index
            for index, record in self.layers.items()
            if index in manifest.layers
            and record.gram_sha256 == manifest.layers[index].shard.sha256
            and store.shard_is_valid(work, record.shard)
        ]

    def with_layer(self, index: int, record: EigenRecord) -> EigenIndex:
        return dataclasses.replace(self, layers=dict(sorted({**self.layers, index: record}.items())))

    @classmethod
    def load(cls, work: Path) -> EigenIndex:
        return load_artifact(cls, work / INDEX)


def read_eigenvalues(
    work: Path, index: EigenIndex, modules: tuple[str, ...], *, verify: bool = True
) -> dict[tuple[int, str], torch.Tensor]:
    """All spectra, (layer, module) -> eigenvalues, read without loading the eigenvectors."""
    spectra: dict[tuple[int, str], torch.Tensor] = {}
    for layer, record in sorted(index.layers.items()):
        path = store.check_shard(work, record.shard, verify=verify)
        with safe_open(str(path), framework="pt") as handle:
            for name in modules:
                spectra[(layer, name)] = handle.get_tensor(f"{name}.eigenvalues")
    return spectra
