"""The rank plan artifact (`WORK/plans/*.json`): per-module ranks plus the numbers that justify them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from swiftsvd_cli.artifacts.format import Artifact, Upgrade, load_artifact
from swiftsvd_cli.artifacts.manifest import ModelInfo
from swiftsvd_cli.artifacts.provenance import Provenance
from swiftsvd_cli.core.allocation import is_dense, matrix_kind, parameter_count
from swiftsvd_cli.core.linalg import effective_rank, loss_at_rank, normalized_effective_rank


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


def module_plan(
    index: int, module: str, shape: tuple[int, int], rank: int, eigenvalues: Tensor, importance: float
) -> ModulePlan:
    """One module's plan entry at `rank`: dense at the break-even rank, loss = eigenvalue tail Σ_{i>k} λ_i."""
    m, n = shape
    dense = is_dense(m, n, rank)
    loss = 0.0 if dense else loss_at_rank(eigenvalues, rank)
    total = loss_at_rank(eigenvalues, 0)
    return ModulePlan(
        layer=index,
        module=module,
        m=m,
        n=n,
        rank=rank,
        dense=dense,
        predicted_loss=loss,
        relative_loss=loss / total if total > 0 else 0.0,
        effective_rank=effective_rank(eigenvalues),
        ner=normalized_effective_rank(eigenvalues, m),
        importance=importance,
    )


def _from_version_2(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 plans were sized by --ratio or --bytes-ratio: no --target-ppl record."""
    return data | {"format_version": 3, "target": {}}


@dataclass(frozen=True)
class RankPlan(Artifact):
    KIND: ClassVar[str] = "plan"
    FORMAT_VERSION: ClassVar[int] = 3  # 2: own version, resolved options and provenance; 3: --target-ppl record
    UPGRADES: ClassVar[dict[int, Upgrade]] = {2: _from_version_2}
    TITLE: ClassVar[str] = "rank plan"
    REMEDY: ClassVar[str] = "make it again with `swiftsvd allocate`"

    work: str
    model: ModelInfo
    strategy: str
    target_ratio: float
    achieved_ratio: float
    modules: list[ModulePlan]
    options: dict[str, Any]  # the resolved allocate options (ratio, strategy, alpha, delta, method, validation)
    provenance: Provenance  # inputs: the calibration manifest and eigen index it was made from
    alpha: float | None = None
    delta: float | None = None
    candidates: list[dict[str, float]] = field(default_factory=list)  # α grid: alpha, val_ppl, achieved_ratio
    validation: dict[str, Any] = field(default_factory=dict)  # how candidates were scored
    factor_dtype: str | None = None  # stored dtype the plan was sized for (None: the model's)
    bytes_ratio: float | None = None  # target share of the 16-bit target-linear bytes, if sized by bytes
    achieved_bytes_ratio: float | None = None  # stored bytes / 16-bit bytes of the target linears
    target: dict[str, Any] = field(default_factory=dict)  # --target-ppl: the target and the ratio search's steps

    def ranks(self, layers_path: str) -> dict[str, int]:
        """Full module name -> rank for every factored (non-dense) module."""
        return {f"{layers_path}.{p.layer}.{p.module}": p.rank for p in self.modules if not p.dense}

    def rank_map(self) -> dict[tuple[int, str], int]:
        """(layer, module path in the layer) -> rank, dense modules included."""
        return {(p.layer, p.module): p.rank for p in self.modules}

    @classmethod
    def load(cls, path: Path) -> RankPlan:
        return load_artifact(cls, path)
