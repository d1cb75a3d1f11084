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
from safetensors import SafetensorError, safe_open

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.format import Artifact, load_artifact
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.provenance import Provenance
from swiftsvd_cli.errors import SwiftSVDError

INDEX = "eigen/index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}  # any other: read as uint8, and so refused


def eigen_shard_name(index: int) -> str:
    return f"eigen/layer_{index:03d}.safetensors"


@dataclass(frozen=True)
class EigenRecord:
    """One layer's eigen shard and the Gram shard it was derived from."""

    shard: store.Shard
    gram_sha256: str

    def __post_init__(self) -> None:
        if not store.SHA256.fullmatch(self.gram_sha256):
            raise ValueError(f"eigen record of {self.shard.file}: {self.gram_sha256!r} is not a SHA-256")


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


def eigen_tensors(shapes: dict[str, tuple[int, int]], modules: tuple[str, ...]) -> dict[str, store.TensorSpec]:
    """What an eigen shard holds per module (m, n): all min(m, n) eigenvalues and the top eigenvectors (m, k)."""
    tensors: dict[str, store.TensorSpec] = {}
    for name in modules:
        m, n = shapes[name]
        tensors |= {f"{name}.eigenvalues": (torch.float64, (min(m, n),)), f"{name}.vectors": (torch.float32, (m, None))}
    return tensors


def read_eigenvalues(
    work: Path, index: EigenIndex, shapes: dict[str, tuple[int, int]], modules: tuple[str, ...], *, verify: bool = True
) -> dict[tuple[int, str], torch.Tensor]:
    """All spectra, (layer, module) -> eigenvalues, read without loading the eigenvectors."""
    spectra: dict[tuple[int, str], torch.Tensor] = {}
    expect = eigen_tensors(shapes, modules)
    for layer, record in sorted(index.layers.items()):
        path = store.check_shard(work, record.shard, verify=verify)
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys())
                if names != expect.keys():
                    raise SwiftSVDError(
                        f"corrupt shard {path}: missing tensors {sorted(expect.keys() - names)}, unexpected "
                        f"tensors {sorted(names - expect.keys())}: delete it and rerun"
                    )
                for name in modules:
                    key = f"{name}.eigenvalues"
                    spectra[(layer, name)] = handle.get_tensor(key)
                    store.check_tensor(path, key, spectra[(layer, name)], expect[key])
                    vectors = handle.get_slice(f"{name}.vectors")  # its header only: shape and dtype, not its data
                    empty = torch.empty(
                        vectors.get_shape(),
                        dtype=SAFETENSORS_DTYPES.get(vectors.get_dtype(), torch.uint8),
                        device="meta",
                    )
                    store.check_tensor(path, f"{name}.vectors", empty, expect[f"{name}.vectors"])
        except SafetensorError as error:
            raise SwiftSVDError(f"corrupt shard {path}: {error}") from error
    return spectra
