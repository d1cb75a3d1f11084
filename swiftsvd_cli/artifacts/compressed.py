"""The compressed-model section: what a compressed directory is, how it was made, and its rank per module.

A factored directory carries it as the `swiftsvd` object of `config.json` (the shipped modeling code reads
its `ranks`, `factor_dtype` and `int8_dense` to build the factored modules before the weights load, and its
`kv_cache` to switch on the latent KV cache); a
`--merge`d dense directory, whose config is the base model's, carries it as `swiftsvd.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from swiftsvd_cli.artifacts.format import MODULE_NAME, Artifact, Upgrade, load_artifact
from swiftsvd_cli.artifacts.provenance import Provenance

SECTION = "swiftsvd"  # key in config.json; also read by swiftsvd_cli/model/hf (keep the two in step)
MERGED_FILE = "swiftsvd.json"


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (swiftsvd 0.1 before the plain-transformers layout): the same facts, fewer of them."""
    return {
        "kind": "compressed",
        "format_version": 2,
        "merged": False,
        **{key: data[key] for key in ("method", "strategy", "alpha", "target_ratio", "achieved_ratio", "ranks")},
        **{key: data[key] for key in ("plan", "base_model", "base_fingerprint")},
        "options": {},
        "allocation": {},
        "calibration": {},
        "provenance": {
            "tool_version": data["tool_version"],
            "git_commit": None,
            "versions": {},
            "created": "unknown",
            "inputs": {"plan": data["plan_sha256"], "model": data["base_fingerprint"]},
        },
    }


def _from_version_2(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 had no validation record: eval can then flag only its calibration text."""
    return data | {"format_version": 3, "validation": {}}


def _from_version_3(data: dict[str, Any]) -> dict[str, Any]:
    """Format 3 had no compensation record: nothing before it was error-compensated."""
    return data | {"format_version": 4, "compensation": None}


def _from_version_4(data: dict[str, Any]) -> dict[str, Any]:
    """Format 4 had no KV-cache mode: every directory cached full keys and values."""
    return data | {"format_version": 5, "kv_cache": "dense", "kv_ratio": None}


@dataclass(frozen=True)
class CompressedSection(Artifact):
    KIND: ClassVar[str] = "compressed"
    FORMAT_VERSION: ClassVar[int] = 5  # 2: own model_type, shipped code, options, provenance; 3: validation;
    # 4: compensation; 5: KV cache mode
    TITLE: ClassVar[str] = "compressed-model section"
    REMEDY: ClassVar[str] = "compress the model again with this swiftsvd (`swiftsvd compress`)"
    UPGRADES: ClassVar[dict[int, Upgrade]] = {
        1: _from_version_1,
        2: _from_version_2,
        3: _from_version_3,
        4: _from_version_4,
    }

    method: str
    merged: bool  # True: a plain dense checkpoint (W' = A B written back), no factored modules
    strategy: str
    alpha: float | None
    target_ratio: float
    achieved_ratio: float
    ranks: dict[str, int]  # full module name -> rank, for every factored linear
    plan: str  # path of the plan it was made from
    base_model: str
    base_fingerprint: str
    options: dict[str, Any]  # the resolved compress options
    allocation: dict[str, Any]  # the resolved allocate options of the plan (ratio, strategy, delta, ...)
    calibration: dict[str, Any]  # the calibration settings of the plan's WORK (data, samples, seqlen, seed, ...)
    provenance: Provenance  # inputs: the plan and the base model
    validation: dict[str, Any]  # the plan's α-search record (text id + SHA-256, windows); {} without a search
    factor_dtype: str | None = None  # "int8": every target linear stored as int8 codes + float32 row scales
    int8_dense: list[str] = field(default_factory=list)  # with int8: the target linears left dense (full names)
    compensation: dict[str, Any] | None = None  # --compensate: objective, calibration, damping, seconds
    kv_cache: str = "dense"  # "latent": the attention caches the k/v latents B x, not keys and values
    kv_ratio: float | None = None  # the --kv-ratio cap on the k/v ranks, if one was given

    def __post_init__(self) -> None:
        """Refuse what no compress writes: the shipped modeling code builds modules from these names and ranks."""
        bad = [f"{name}: {rank}" for name, rank in self.ranks.items() if not MODULE_NAME.fullmatch(name) or rank < 0]
        bad += [name for name in self.int8_dense if not MODULE_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"not a module name and rank: {', '.join(bad[:3])}")
        if self.factor_dtype not in (None, "int8"):
            raise ValueError(f"unknown factor_dtype {self.factor_dtype!r}")
        ratios = (self.target_ratio, self.achieved_ratio, *(() if self.alpha is None else (self.alpha,)))
        if not all(math.isfinite(r) and 0 <= r <= 1 for r in ratios):
            raise ValueError(f"ratio or alpha outside [0, 1]: {ratios}")


def load_section(directory: Path) -> CompressedSection:
    """The section of a compressed directory, factored (config.json) or merged (swiftsvd.json)."""
    merged = directory / MERGED_FILE
    if merged.is_file():
        return load_artifact(CompressedSection, merged)
    return load_artifact(CompressedSection, directory / "config.json", key=SECTION)
