"""The JSON report of `swiftsvd eval`: the protocol once, then every target's numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from swiftsvd_cli.artifacts.format import Artifact, load_artifact
from swiftsvd_cli.artifacts.provenance import Provenance


@dataclass(frozen=True)
class TargetReport:
    """All numbers for one target, with where it came from."""

    target: str
    model_id: str
    revision: str | None
    fingerprint: str
    dtype: str
    compressed: dict[str, Any] | None  # the compressed-model section of a swiftsvd directory
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class EvalReport(Artifact):
    """The JSON artifact of `swiftsvd eval`: protocol once, then one entry per target in the given order."""

    KIND: ClassVar[str] = "eval"
    FORMAT_VERSION: ClassVar[int] = 2  # 2: kind "eval" (was "swiftsvd-eval"), provenance replaces "created"
    TITLE: ClassVar[str] = "eval report"
    REMEDY: ClassVar[str] = "evaluate again with `swiftsvd eval --output`"

    protocol: dict[str, Any]
    targets: list[TargetReport]
    zero_shot_skipped: dict[str, str]
    provenance: Provenance  # inputs: every target's fingerprint and every text's SHA-256

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        return load_artifact(cls, path)
