"""The calibration manifest (`WORK/manifest.json`): which model, which data and settings, which shards.

A WORK directory holds this manifest and per-layer Gram shards under `covariance/`; eigenbases derived from them
have their own index (`eigen/index.json`, swiftsvd_cli.artifacts.eigen). The manifest also records every target
linear's shape and the model family, so stages that only need spectra (`report`, `allocate` with cached
eigenbases) never load the model. Format 4: packed float64 Grams, output Grams where smaller (`grams`), the Gram
precision route and the device that chose it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from swiftsvd_cli.artifacts.format import Artifact, load_artifact
from swiftsvd_cli.artifacts.provenance import Provenance
from swiftsvd_cli.artifacts.store import Shard, TensorSpec
from swiftsvd_cli.errors import SwiftSVDError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelInfo:
    """Which model an artifact belongs to; `fingerprint` is what mismatches are judged by."""

    spec: str
    model_id: str
    revision: str | None
    fingerprint: str
    model_type: str
    num_layers: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers {self.num_layers} < 1")


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that changes the Grams: a WORK directory is valid for exactly one of these."""

    data: str
    data_id: str
    data_sha256: str
    samples: int
    seqlen: int
    seed: int
    dtype: str
    gram_precision: str  # "float64" or "float32" products (core.grams), summed in float64 either way
    keep_input_grams: bool  # every input Gram kept, even where the output Grams are smaller
    sampler: str = "tokens"  # how windows were drawn (config.Sampler); manifests before it: seeded token windows


@dataclass(frozen=True)
class LayerRecord:
    """One decoder layer's calibration result: its shard and the numbers read without opening it."""

    shard: Shard
    tokens: int
    importance: float
    skipped: list[int] = field(default_factory=list)  # windows left out for NaN/Inf activations (--skip-nonfinite)

    def __post_init__(self) -> None:
        if self.tokens < 1 or not math.isfinite(self.importance):
            raise ValueError(f"layer record of {self.shard.file}: tokens {self.tokens}, importance {self.importance}")


@dataclass(frozen=True)
class CalibrationManifest(Artifact):
    """A WORK's calibration; `layers` grows (through `with_layer`) as layers are calibrated."""

    KIND: ClassVar[str] = "calibration"
    FORMAT_VERSION: ClassVar[int] = 4  # 2: shapes, options, provenance; 3: skipped windows; 4: packed/output Grams
    TITLE: ClassVar[str] = "calibration manifest"
    REMEDY: ClassVar[str] = "recalibrate (`swiftsvd calibrate`) into a new directory, or pass --force"

    model: ModelInfo
    settings: CalibrationSettings
    shapes: dict[str, tuple[int, int]]  # target linear path inside a decoder layer -> (m, n), same in every layer
    options: dict[str, Any]  # the resolved options of the run that created it (batch size, device, ...)
    provenance: Provenance
    grams: dict[str, str]  # input group -> "input" (G stored) or "output" (its modules' C = W G Wᵀ stored)
    device: str  # where the Grams were accumulated (its kind chose the precision route)
    layers: dict[int, LayerRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad_shapes = [name for name, (m, n) in self.shapes.items() if m < 1 or n < 1]
        if bad_shapes:
            raise ValueError(f"non-positive shape of {', '.join(bad_shapes)}")
        outside = [index for index in self.layers if not 0 <= index < self.model.num_layers]
        if outside:
            raise ValueError(f"layer(s) {outside} outside 0..{self.model.num_layers - 1}")
        forms = sorted(set(self.grams.values()) - {"input", "output"})
        if forms:
            raise ValueError(f"unknown Gram form(s) {forms}: 'input' or 'output'")

    def gram_tensors(self, groups: Mapping[str, tuple[str, ...]]) -> dict[str, TensorSpec]:
        """What each covariance shard of this WORK holds (`covariance_tensors`)."""
        return covariance_tensors(self.shapes, groups, self.grams)

    @property
    def complete(self) -> bool:
        return len(self.layers) == self.model.num_layers

    def importance(self) -> list[float]:
        return [self.layers[index].importance for index in range(self.model.num_layers)]

    def with_layer(self, index: int, record: LayerRecord | None) -> CalibrationManifest:
        """This manifest with layer `index` set to `record` (None: dropped, to be recomputed)."""
        layers = {i: r for i, r in self.layers.items() if i != index}
        if record is not None:
            layers[index] = record
        return dataclasses.replace(self, layers=dict(sorted(layers.items())))

    def save_to(self, work: Path) -> None:
        self.save(work / MANIFEST)

    @classmethod
    def load(cls, work: Path) -> CalibrationManifest:
        return load_artifact(cls, work / MANIFEST)


def covariance_tensors(
    shapes: Mapping[str, tuple[int, int]], groups: Mapping[str, tuple[str, ...]], forms: Mapping[str, str]
) -> dict[str, TensorSpec]:
    """A covariance shard's tensors: the token count and, per input group, Σ|x| (n,) and either its input Gram
    (`<group>.gram`) or each consumer's output Gram (`<module>.output_gram`), as packed upper triangles."""
    tensors: dict[str, TensorSpec] = {"tokens": (torch.int64, ())}
    for group, names in groups.items():
        n = shapes[names[0]][1]
        tensors[f"{group}.abs_sum"] = (torch.float64, (n,))
        if forms[group] == "input":
            tensors[f"{group}.gram"] = (torch.float64, (n * (n + 1) // 2,))
        else:
            for name in names:
                m = shapes[name][0]
                tensors[f"{name}.output_gram"] = (torch.float64, (m * (m + 1) // 2,))
    return tensors


def load_complete_manifest(work: Path) -> CalibrationManifest:
    """The manifest of a WORK whose every layer is calibrated; anything else is a user-facing error."""
    if not (work / MANIFEST).is_file():
        raise SwiftSVDError(f"{work} has no calibration (manifest.json): run `swiftsvd calibrate MODEL --out {work}`")
    manifest = CalibrationManifest.load(work)
    if not manifest.complete:
        raise SwiftSVDError(
            f"{work} holds {len(manifest.layers)} of {manifest.model.num_layers} calibrated layers: "
            "rerun `swiftsvd calibrate` with the same settings to finish it"
        )
    return manifest
