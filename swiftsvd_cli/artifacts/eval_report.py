"""The JSON report of `swiftsvd eval`: the protocol once, then every target's numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1


@dataclass
class TargetReport:
    """All numbers for one target, with where it came from."""

    target: str
    model_id: str
    revision: str | None
    fingerprint: str
    dtype: str
    compressed: dict[str, Any] | None
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)
    size: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass
class EvalReport:
    """The JSON artifact of `swiftsvd eval`: protocol once, then one entry per target in the given order."""

    protocol: dict[str, Any]
    targets: list[TargetReport]
    zero_shot_skipped: dict[str, str]
    created: str
    kind: str = "swiftsvd-eval"
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
