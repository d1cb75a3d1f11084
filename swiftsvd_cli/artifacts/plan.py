"""The rank plan artifact (`WORK/plans/*.json`): per-module ranks plus the numbers that justify them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swiftsvd_cli import __version__
from swiftsvd_cli.artifacts.manifest import ModelInfo
from swiftsvd_cli.artifacts.store import FORMAT_VERSION, atomic_write_json, read_json, utc_now
from swiftsvd_cli.core.allocation import matrix_kind, parameter_count
from swiftsvd_cli.errors import SwiftSVDError


@dataclass(frozen=True)
class ModulePlan:
    """One target linear: its shape, rank and what the spectrum says about it."""

    layer: int
    module: str  # path inside the decoder layer, e.g. "self_attn.q_proj"
    m: int
    n: int
    rank: int
    dense: bool  # rank reached m n / (m + n): factoring would save nothing
    predicted_loss: float  # Σ_{i>k} λ_i = ‖W X − W' X‖²_F on the calibration tokens (0 when dense)
    relative_loss: float  # predicted_loss / ‖W X‖²_F
    effective_rank: float
    ner: float
    importance: float

    @property
    def kind(self) -> str:
        return matrix_kind(self.module)

    @property
    def params(self) -> int:
        return parameter_count(self.m, self.n, self.rank)


@dataclass
class RankPlan:
    work: str
    model: ModelInfo
    strategy: str
    target_ratio: float
    achieved_ratio: float
    modules: list[ModulePlan]
    alpha: float | None = None
    delta: float | None = None
    candidates: list[dict[str, float]] = field(default_factory=list)  # α grid: alpha, val_ppl, achieved_ratio
    validation: dict[str, Any] = field(default_factory=dict)  # how candidates were scored
    kind: str = "plan"
    format_version: int = FORMAT_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=utc_now)

    def ranks(self, layers_path: str) -> dict[str, int]:
        """Full module name -> rank for every factored (non-dense) module."""
        return {f"{layers_path}.{p.layer}.{p.module}": p.rank for p in self.modules if not p.dense}

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> RankPlan:
        data = read_json(path, "rank plan")
        if not isinstance(data, dict) or data.get("kind") != "plan":
            raise SwiftSVDError(f"{path} is not a swiftsvd rank plan")
        if data.get("format_version") != FORMAT_VERSION:
            raise SwiftSVDError(f"{path} has plan format {data.get('format_version')}, expected {FORMAT_VERSION}")
        try:
            data["model"] = ModelInfo(**data["model"])
            data["modules"] = [ModulePlan(**module) for module in data["modules"]]
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise SwiftSVDError(f"{path} is a malformed rank plan ({error})") from error
