"""The rank plan artifact (`WORK/plans/*.json`): per-module ranks plus the numbers that justify them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from swiftsvd_cli.artifacts.format import MODULE_NAME, Artifact, Upgrade, load_artifact
from swiftsvd_cli.artifacts.manifest import MANIFEST, CalibrationManifest, ModelInfo, load_complete_manifest
from swiftsvd_cli.artifacts.provenance import Provenance
from swiftsvd_cli.core.allocation import is_dense, matrix_kind, parameter_count
from swiftsvd_cli.core.linalg import effective_rank, loss_at_rank, normalized_effective_rank
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

    def __post_init__(self) -> None:
        """Refuse what no allocate writes, so a hand-edited plan fails on load, not deep inside compress."""
        where = f"layer {self.layer} {self.module!r}"
        if not MODULE_NAME.fullmatch(self.module):
            raise ValueError(f"{where}: not a module path")
        if self.layer < 0 or self.m < 1 or self.n < 1:
            raise ValueError(f"{where}: layer {self.layer}, shape ({self.m}, {self.n})")
        if not 0 <= self.rank <= min(self.m, self.n):
            raise ValueError(f"{where}: rank {self.rank} outside 0..min(m, n) = {min(self.m, self.n)}")
        if self.dense != is_dense(self.m, self.n, self.rank):
            raise ValueError(f"{where}: dense is {self.dense} at rank {self.rank} of ({self.m}, {self.n})")
        numbers = (self.predicted_loss, self.relative_loss, self.effective_rank, self.ner, self.importance)
        if not all(math.isfinite(number) for number in numbers):
            raise ValueError(f"{where}: NaN or Inf among its losses, ranks and importance")

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


def _positive(value: Any) -> bool:
    """A finite number above 0 (a perplexity), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


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

    def __post_init__(self) -> None:
        ratios = (self.target_ratio, self.achieved_ratio, self.bytes_ratio)
        if not all(r is None or (math.isfinite(r) and 0 <= r <= 1) for r in ratios) or self.target_ratio == 0:
            raise ValueError(f"ratios {ratios} outside (0, 1]")
        if self.achieved_bytes_ratio is not None and not math.isfinite(self.achieved_bytes_ratio):
            raise ValueError(f"achieved_bytes_ratio {self.achieved_bytes_ratio}")
        if not all(x is None or (math.isfinite(x) and 0 <= x <= 1) for x in (self.alpha, self.delta)):
            raise ValueError(f"alpha {self.alpha} or delta {self.delta} outside [0, 1]")
        if self.target and not all(_positive(self.target.get(key)) for key in ("ppl", "validation_ppl")):
            raise ValueError(f"--target-ppl record without a finite, positive ppl and validation_ppl: {self.target}")
        keys = [(p.layer, p.module) for p in self.modules]
        if len(set(keys)) != len(keys):
            raise ValueError("a module is planned twice")

    def calibration(self, path: Path) -> CalibrationManifest:
        """The complete calibration this plan (at `path`) was made from; a plan that does not fit it is refused."""
        work = Path(self.work)
        if not (work / MANIFEST).is_file():
            raise SwiftSVDError(f"plan {path} names WORK '{self.work}', which holds no calibration: {self.REMEDY}")
        manifest = load_complete_manifest(work)
        if manifest.model.fingerprint != self.model.fingerprint:
            raise SwiftSVDError(f"plan {path} does not belong to the calibration in {self.work}")
        for p in self.modules:
            if p.layer >= manifest.model.num_layers or manifest.shapes.get(p.module) != (p.m, p.n):
                raise SwiftSVDError(
                    f"plan {path} names layer {p.layer} {p.module!r} ({p.m}x{p.n}), which the calibrated model "
                    f"({manifest.model.num_layers} layers) does not have: {self.REMEDY}"
                )
        return manifest

    def ranks(self, layers_path: str) -> dict[str, int]:
        """Full module name -> rank for every factored (non-dense) module."""
        return {f"{layers_path}.{p.layer}.{p.module}": p.rank for p in self.modules if not p.dense}

    def rank_map(self) -> dict[tuple[int, str], int]:
        """(layer, module path in the layer) -> rank, dense modules included."""
        return {(p.layer, p.module): p.rank for p in self.modules}

    @classmethod
    def load(cls, path: Path) -> RankPlan:
        return load_artifact(cls, path)
