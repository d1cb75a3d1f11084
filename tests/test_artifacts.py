"""Every artifact format round-trips through `load_artifact`, and a stale or foreign file fails with a clear message."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swiftsvd_cli.artifacts.compressed import SECTION, CompressedSection, load_section
from swiftsvd_cli.artifacts.eigen import INDEX, EigenIndex, EigenRecord
from swiftsvd_cli.artifacts.eval_report import EvalReport, TargetReport
from swiftsvd_cli.artifacts.format import Artifact, VersionMismatchError, load_artifact
from swiftsvd_cli.artifacts.manifest import MANIFEST, CalibrationManifest, CalibrationSettings, LayerRecord, ModelInfo
from swiftsvd_cli.artifacts.plan import ModulePlan, RankPlan
from swiftsvd_cli.artifacts.provenance import Provenance, make_provenance
from swiftsvd_cli.artifacts.store import Shard
from swiftsvd_cli.errors import SwiftSVDError

MODEL = ModelInfo(spec="demo", model_id="demo", revision=None, fingerprint="ab" * 32, model_type="llama", num_layers=2)
SHARD = Shard(file="covariance/layer_000.safetensors", sha256="cd" * 32, bytes=1234)


def provenance() -> Provenance:
    return make_provenance(model=MODEL.fingerprint, data="ef" * 32)


def manifest() -> CalibrationManifest:
    settings = CalibrationSettings(
        "demo",
        "brown:train",
        "01" * 32,
        samples=8,
        seqlen=32,
        seed=3,
        dtype="torch.float32",
        gram_precision="float32",
        keep_input_grams=False,
    )
    return CalibrationManifest(
        model=MODEL,
        settings=settings,
        shapes={"self_attn.q_proj": (32, 32), "mlp.down_proj": (32, 48)},
        options={"work": "/tmp/work", "samples": 8, "source": {"model": "demo", "dtype": "auto"}},
        provenance=provenance(),
        grams={"attn_in": "input", "mlp_out": "output"},
        device="cpu",
        layers={0: LayerRecord(SHARD, tokens=256, importance=0.25), 1: LayerRecord(SHARD, tokens=256, importance=0.5)},
    )


def eigen() -> EigenIndex:
    return EigenIndex(fingerprint=MODEL.fingerprint, provenance=provenance(), layers={1: EigenRecord(SHARD, "cd" * 32)})


def plan() -> RankPlan:
    module = ModulePlan(0, "self_attn.q_proj", 32, 32, 8, False, 1.5, 0.1, 20.5, 0.64, 0.25)
    return RankPlan(
        work="/tmp/work",
        model=MODEL,
        strategy="dynamic",
        target_ratio=0.5,
        achieved_ratio=0.5,
        modules=[module, dataclasses.replace(module, layer=1, dense=True, rank=16)],
        options={"ratio": 0.5, "strategy": "dynamic", "alpha": None},
        provenance=provenance(),
        alpha=0.3,
        delta=0.5,
        candidates=[{"alpha": 0.0, "val_ppl": 12.5, "achieved_ratio": 0.5}],
        validation={"data": "demo", "windows": 4},
    )


def section() -> CompressedSection:
    return CompressedSection(
        method="swift",
        merged=False,
        strategy="uniform",
        alpha=None,
        target_ratio=0.5,
        achieved_ratio=0.49,
        ranks={"model.layers.0.self_attn.q_proj": 8},
        plan="/tmp/work/plans/ratio-0.50-uniform.json",
        base_model="demo",
        base_fingerprint=MODEL.fingerprint,
        options={"method": "swift", "merge": False},
        allocation={"ratio": 0.5, "strategy": "uniform"},
        calibration={"data": "demo", "samples": 8},
        provenance=provenance(),
        validation={"data_id": "demo:validation", "text_sha256": "0" * 64},
    )


def report() -> EvalReport:
    target = TargetReport("demo", "demo", None, MODEL.fingerprint, "float32", None, {"demo": {"ppl": 37.06}})
    return EvalReport(protocol={"device": "cpu"}, targets=[target], zero_shot_skipped={}, provenance=provenance())


def write_config(artifact: Artifact, directory: Path) -> Path:
    """A compressed section lives inside config.json."""
    path = directory / "config.json"
    path.write_text(json.dumps({"model_type": "swiftsvd_llama", SECTION: artifact.to_dict()}))
    return path


# (build, where it is written, how swiftsvd reads it back, the path holding the JSON object)
CASES: dict[str, tuple[Callable[[], Artifact], Callable[[Artifact, Path], Path], Callable[[Path], Artifact]]] = {
    "calibration": (manifest, lambda a, d: _save(a, d / MANIFEST), lambda d: CalibrationManifest.load(d)),
    "eigen": (eigen, lambda a, d: _save(a, d / INDEX), lambda d: EigenIndex.load(d)),
    "plan": (plan, lambda a, d: _save(a, d / "plan.json"), lambda d: RankPlan.load(d / "plan.json")),
    "compressed": (section, write_config, load_section),
    "eval": (report, lambda a, d: _save(a, d / "eval.json"), lambda d: EvalReport.load(d / "eval.json")),
}


def _save(artifact: Artifact, path: Path) -> Path:
    artifact.save(path)
    return path


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply `change` to the artifact's JSON object (the section, for config.json)."""
    data = json.loads(path.read_text())
    change(data[SECTION] if path.name == "config.json" else data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", CASES)
def test_round_trip(kind: str, tmp_path: Path) -> None:
    build, save, load = CASES[kind]
    artifact = build()
    path = save(artifact, tmp_path)
    assert json.loads(path.read_text()).get("kind", kind) == kind
    assert load(tmp_path) == artifact
    assert artifact.provenance.inputs and artifact.provenance.versions["torch"]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        artifact.provenance = provenance()  # type: ignore[misc]


@pytest.mark.parametrize("kind", CASES)
def test_wrong_version_names_file_found_and_supported(kind: str, tmp_path: Path) -> None:
    build, save, load = CASES[kind]
    artifact = build()
    path = save(artifact, tmp_path)
    found = artifact.FORMAT_VERSION + 1
    _edit(path, lambda data: data.update(format_version=found))
    with pytest.raises(VersionMismatchError) as error:
        load(tmp_path)
    message = str(error.value)
    assert str(path) in message and f"version {found}" in message
    assert f"reads version {artifact.FORMAT_VERSION}" in message and "\n" not in message


@pytest.mark.parametrize("kind", CASES)
def test_wrong_kind_is_refused(kind: str, tmp_path: Path) -> None:
    build, save, load = CASES[kind]
    path = save(build(), tmp_path)
    other = "eval" if kind != "eval" else "plan"
    _edit(path, lambda data: data.update(kind=other))
    with pytest.raises(SwiftSVDError, match=f"is a swiftsvd '{other}' artifact, not a"):
        load(tmp_path)


@pytest.mark.parametrize("kind", CASES)
def test_malformed_is_one_clear_error(kind: str, tmp_path: Path) -> None:
    build, save, load = CASES[kind]
    path = save(build(), tmp_path)
    _edit(path, lambda data: data.pop("provenance"))
    with pytest.raises(SwiftSVDError, match="malformed"):
        load(tmp_path)
    _edit(path, lambda data: data.update(provenance={**provenance().__dict__, "surprise": 1}))
    with pytest.raises(SwiftSVDError, match="unknown field"):
        load(tmp_path)


def test_formats_have_distinct_kinds() -> None:
    kinds = [build().KIND for build, _, _ in CASES.values()]
    assert kinds == list(CASES) and len(set(kinds)) == len(kinds)


def test_manifest_of_the_shared_format_1_asks_to_recalibrate(tmp_path: Path) -> None:
    """WORK directories written before the formats were split (one shared version 1) are refused, not misread."""
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "calibration", "format_version": 1, "model": {}}))
    with pytest.raises(VersionMismatchError, match="recalibrate"):
        CalibrationManifest.load(tmp_path)


def test_compressed_section_of_format_1_is_upgraded(tmp_path: Path) -> None:
    """Directories compressed before this format (no kind, no provenance) still describe themselves."""
    old = {
        "format_version": 1,
        "tool_version": "0.1.0",
        "method": "swift",
        "strategy": "uniform",
        "alpha": None,
        "target_ratio": 0.5,
        "achieved_ratio": 0.49,
        "ranks": {"model.layers.0.self_attn.q_proj": 8},
        "plan": "/w/plans/p.json",
        "plan_sha256": "12" * 32,
        "base_model": "demo",
        "base_fingerprint": MODEL.fingerprint,
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", SECTION: old}))
    upgraded = load_artifact(CompressedSection, tmp_path / "config.json", key=SECTION)
    assert upgraded.ranks == old["ranks"] and upgraded.merged is False
    assert upgraded.provenance.tool_version == "0.1.0" and upgraded.provenance.inputs["plan"] == old["plan_sha256"]


def test_a_json_that_is_no_artifact(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("[1, 2]")
    with pytest.raises(SwiftSVDError, match="is not a swiftsvd rank plan"):
        RankPlan.load(path)
    path.write_text("{not json")
    with pytest.raises(SwiftSVDError, match="corrupt"):
        RankPlan.load(path)
