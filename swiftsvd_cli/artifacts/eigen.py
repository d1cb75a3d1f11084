"""The eigenbasis cache of a WORK (`WORK/eigen/index.json` + `eigen/layer_XXX.safetensors`).

Shard `eigen/layer_XXX.safetensors`, per module: `<module>.eigenvalues` (all, float64) and the top
break-even-rank eigenvectors in float32 (they become model weights, never more precise than that), in the
smaller exact form: `<module>.vectors` (m, k) when m ≤ n; when m > n (gate/up: 11008 x 4096)
`<module>.coefficients` (n, p) with U_p = W @ coefficients, plus `<module>.completion` (m, k − p), the
zero-energy directions (none unless the calibration had fewer tokens than k). The index records, per layer,
the SHA-256 of the Gram shard each eigen shard was computed from: a recalibrated layer invalidates exactly its
own eigenbasis, and the eigen format can change (version) without invalidating the Grams.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError, safe_open

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.format import Artifact, load_artifact
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.provenance import Provenance
from swiftsvd_cli.core.linalg import Eigenbasis, break_even_rank, expand_basis
from swiftsvd_cli.errors import SwiftSVDError

INDEX = "eigen/index.json"
VECTOR_DTYPE = torch.float32


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
    FORMAT_VERSION: ClassVar[int] = 2  # 2: compact m > n shards (coefficients + completion)
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


def eigen_tensor_specs(
    shapes: Mapping[str, tuple[int, int]], modules: tuple[str, ...], tokens: int | None = None
) -> dict[str, store.TensorSpec]:
    """What an eigen shard holds per module (m, n): all min(m, n) eigenvalues and the top k = break-even-rank
    eigenvectors in the compact form (module docstring). The energy-carrying directions of an m > n module number
    p = min(k, rank of the Gram): `tokens` bounds that rank (size estimates); None leaves p (and k − p) open."""
    tensors: dict[str, store.TensorSpec] = {}
    for name in modules:
        m, n = shapes[name]
        k = break_even_rank(m, n)
        tensors[f"{name}.eigenvalues"] = (torch.float64, (min(m, n),))
        if m <= n:
            tensors[f"{name}.vectors"] = (VECTOR_DTYPE, (m, None if tokens is None else k))
        else:
            p = None if tokens is None else min(k, tokens)
            tensors[f"{name}.coefficients"] = (VECTOR_DTYPE, (n, p))
            tensors[f"{name}.completion"] = (VECTOR_DTYPE, (m, None if p is None else k - p))
    return tensors


def read_eigenvalues(
    work: Path, index: EigenIndex, shapes: dict[str, tuple[int, int]], modules: tuple[str, ...], *, verify: bool = True
) -> dict[tuple[int, str], torch.Tensor]:
    """All spectra, (layer, module) -> eigenvalues, read without loading the eigenvectors."""
    spectra: dict[tuple[int, str], torch.Tensor] = {}
    expect = eigen_tensor_specs(shapes, modules)
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
                for key in sorted(names - {f"{name}.eigenvalues" for name in modules}):
                    vectors = handle.get_slice(key)  # its header only: shape and dtype, not its data
                    empty = torch.empty(
                        vectors.get_shape(),
                        dtype=store.SAFETENSORS_DTYPES.get(vectors.get_dtype(), torch.uint8),  # unknown: refused
                        device="meta",
                    )
                    store.check_tensor(path, key, empty, expect[key])
        except SafetensorError as error:
            raise SwiftSVDError(f"corrupt shard {path}: {error}") from error
    return spectra


def eigen_tensors(name: str, basis: Eigenbasis) -> dict[str, torch.Tensor]:
    """The shard tensors of one module's eigenbasis, in the smaller exact form (module docstring)."""
    tensors = {f"{name}.eigenvalues": basis.eigenvalues}
    if basis.coefficients is None:
        return tensors | {f"{name}.vectors": basis.vectors.to(VECTOR_DTYPE)}
    p = basis.coefficients.shape[1]
    return tensors | {
        f"{name}.coefficients": basis.coefficients.to(VECTOR_DTYPE),
        f"{name}.completion": basis.vectors[:, p:].to(VECTOR_DTYPE),
    }


def eigenvectors(tensors: Mapping[str, torch.Tensor], name: str, W: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k eigenvectors (m, k) of module `name` from its shard tensors, in W's dtype and on W's device."""
    if f"{name}.vectors" in tensors:
        return tensors[f"{name}.vectors"][:, :k].to(W)
    coefficients = tensors[f"{name}.coefficients"]
    p = min(k, coefficients.shape[1])
    return expand_basis(W, coefficients[:, :p], tensors[f"{name}.completion"][:, : k - p])
