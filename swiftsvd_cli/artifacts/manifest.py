"""The calibration manifest (`WORK/manifest.json`): which model, which data and settings, which shards.

A WORK directory holds this manifest and per-layer shards under `covariance/` (Grams) and `eigen/`
(eigenbases); every stage that reads a WORK validates the manifest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swiftsvd_cli import __version__
from swiftsvd_cli.artifacts.store import FORMAT_VERSION, Shard, atomic_write_json, read_json, utc_now
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


@dataclass(frozen=True)
class LayerRecord:
    """One decoder layer's calibration result: its shard and the numbers read without opening it."""

    shard: Shard
    tokens: int
    importance: float


@dataclass
class CalibrationManifest:
    model: ModelInfo
    settings: CalibrationSettings
    layers: dict[int, LayerRecord] = field(default_factory=dict)
    eigen: dict[int, Shard] = field(default_factory=dict)  # eigenbases derived from these Grams and weights
    kind: str = "calibration"
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=utc_now)

    @property
    def complete(self) -> bool:
        return len(self.layers) == self.model.num_layers

    def importance(self) -> list[float]:
        return [self.layers[index].importance for index in range(self.model.num_layers)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = {str(index): asdict(record) for index, record in sorted(self.layers.items())}
        data["eigen"] = {str(index): asdict(shard) for index, shard in sorted(self.eigen.items())}
        return data

    def save(self, work: Path) -> None:
        atomic_write_json(work / MANIFEST, self.to_dict())

    @classmethod
    def load(cls, work: Path) -> CalibrationManifest:
        data = read_json(work / MANIFEST, "calibration manifest")
        if not isinstance(data, dict) or data.get("kind") != "calibration":
            raise SwiftSVDError(f"{work / MANIFEST} is not a swiftsvd calibration manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise SwiftSVDError(
                f"{work / MANIFEST} has format version {data.get('format_version')}, this swiftsvd reads "
                f"{FORMAT_VERSION}: recalibrate into a new directory"
            )
        try:
            layers = {
                int(index): LayerRecord(
                    shard=Shard(**record["shard"]), tokens=record["tokens"], importance=record["importance"]
                )
                for index, record in data["layers"].items()
            }
            return cls(
                model=ModelInfo(**data["model"]),
                settings=CalibrationSettings(**data["settings"]),
                layers=layers,
                eigen={int(index): Shard(**shard) for index, shard in data.get("eigen", {}).items()},
                tool_version=data["tool_version"],
                created=data["created"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise SwiftSVDError(f"{work / MANIFEST} is malformed ({error}): recalibrate") from error


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
