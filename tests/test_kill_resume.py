"""Kill and resume: each stage is SIGKILLed at chosen points, rerun, and must end bit-identical to a clean run.

The killed run is a real subprocess (`swiftsvd` with one function wrapped so that its n-th call kills the
process: mid-layer, mid-eigendecomposition, mid-α-search, mid-factorisation, or mid-write, after half of a
temp file is written and before it is renamed). The rerun must take no partial or temp file for a finished
one, delete the temp files the killed run left, and every artifact of the finished pipeline (tensor files
byte for byte, JSON apart from creation times) must equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from swiftsvd_cli.cli import app

KILLER = Path(__file__).with_name("killer.py")
WRITE = ("swiftsvd_cli.artifacts.store", "_atomic_write")
POINTS: dict[str, list[tuple[tuple[str, str], int]]] = {  # stage -> (function whose n-th call kills, n)
    "calibrate": [
        (("swiftsvd_cli.stages.calibrate", "layer_output"), 1),  # mid-layer 0
        (("swiftsvd_cli.stages.calibrate", "layer_output"), 3),  # mid-layer 1, layer 0 done
        (WRITE, 1),  # the first manifest
        (WRITE, 2),  # layer 0's Gram shard
        (WRITE, 3),  # the manifest listing layer 0
        (WRITE, 4),  # layer 1's Gram shard
    ],
    "allocate": [
        (("swiftsvd_cli.engine.eigen", "group_eigenbases"), 1),  # mid-layer 0 (attention inputs)
        (("swiftsvd_cli.engine.eigen", "group_eigenbases"), 4),  # mid-layer 1 (3 input-Gram groups a layer)
        (WRITE, 1),  # layer 0's eigen shard
        (WRITE, 2),  # the eigen index
        (WRITE, 5),  # the plan
        (("swiftsvd_cli.engine.scoring", "layer_output"), 2),  # mid-α-search (all candidates layer by layer)
        (("swiftsvd_cli.engine.scoring", "layer_output"), 15),
    ],
    "compress": [
        (("swiftsvd_cli.engine.factors", "factorize"), 1),  # mid-layer 0
        (("swiftsvd_cli.engine.factors", "factorize"), 9),  # mid-layer 1
        (("swiftsvd_cli.model.checkpoint", "save_file"), 1),  # mid-checkpoint write
    ],
}
QUICK = {"calibrate": 3, "allocate": 5, "compress": 2}  # one point per stage in the default run: the index


def commands(root: Path, text: Path) -> dict[str, list[str]]:
    plan = root / "work" / "plans" / "ratio-0.50-dynamic.json"
    calibration = ["--data", str(text), "--samples", "4", "--seqlen", "32", "--batch-size", "2"]
    return {
        "calibrate": ["calibrate", str(root / "model"), "--out", str(root / "work"), *calibration, "--device", "cpu"],
        "allocate": ["allocate", str(root / "work"), "--ratio", "0.5", "--val-samples", "2", "--device", "cpu"],
        "compress": [
            "compress",
            str(root / "model"),
            "--plan",
            str(plan),
            "--out",
            str(root / "out"),
            "--device",
            "cpu",
        ],
    }


STAMPED = ("manifest", "eigen", "plan")
"""Provenance inputs that are digests of upstream JSON artifacts, which carry their creation time."""


def without_times(value: Any) -> Any:
    """A JSON artifact minus creation times (and digests of files holding one): identical in two clean runs."""
    if isinstance(value, dict):
        return {
            key: {k: v for k, v in item.items() if k not in STAMPED} if key == "inputs" else without_times(item)
            for key, item in value.items()
            if key != "created"
        }
    if isinstance(value, list):
        return [without_times(item) for item in value]
    return value


def artifacts(root: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(root / "model")):
        name = str(path.relative_to(root))
        found[name] = without_times(json.loads(path.read_text())) if path.suffix == ".json" else path.read_bytes()
    return found


@pytest.fixture(scope="module")
def reference(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """The root every run uses (artifacts record their paths), with the state before each stage kept beside it
    (before-<stage>), and the artifacts of the uninterrupted pipeline."""
    root = tmp_path_factory.mktemp("kill") / "root"
    shutil.copytree(tiny_llama_dir, root / "model")
    runner = CliRunner()
    for stage, arguments in commands(root, tiny_text_file).items():
        shutil.copytree(root, root.parent / f"before-{stage}")
        result = runner.invoke(app, arguments)
        assert result.exit_code == 0, result.output
    return root, artifacts(root)


def kill_and_resume(
    reference: tuple[Path, dict[str, Any]], text: Path, stage: str, point: tuple[str, str], n: int
) -> None:
    root, expected = reference
    shutil.rmtree(root)
    shutil.copytree(root.parent / f"before-{stage}", root)
    steps = commands(root, text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    killed = subprocess.run(
        [sys.executable, str(KILLER), *point, str(n), *steps[stage]], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, (stage, point, n, killed.stderr[-2000:])
    runner = CliRunner()
    for later in list(steps)[list(steps).index(stage) :]:
        result = runner.invoke(app, steps[later])
        assert result.exit_code == 0, (stage, point, n, later, result.output)
    assert not [p for p in root.rglob(".*")], (stage, point, n, "temp files survived the rerun")
    resumed = artifacts(root)
    assert resumed.keys() == expected.keys(), (stage, point, n)
    different = [name for name in expected if resumed[name] != expected[name]]
    assert not different, (stage, point, n, different)


@pytest.mark.parametrize("stage", list(POINTS))
def test_a_killed_stage_resumes_to_identical_artifacts(
    reference: tuple[Path, dict[str, Any]], tiny_text_file: Path, stage: str
) -> None:
    point, n = POINTS[stage][QUICK[stage]]
    kill_and_resume(reference, tiny_text_file, stage, point, n)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(POINTS))
def test_every_kill_point_resumes_to_identical_artifacts(
    reference: tuple[Path, dict[str, Any]], tiny_text_file: Path, stage: str
) -> None:
    for index, (point, n) in enumerate(POINTS[stage]):
        if index != QUICK[stage]:
            kill_and_resume(reference, tiny_text_file, stage, point, n)


def test_a_rank_killed_mid_layer_stops_the_launch_and_the_next_resumes_to_identical_artifacts(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """Under torchrun (2 processes, gloo), rank 1 is SIGKILLed in layer 1 while rank 0 runs on: the launch ends
    (no hang, non-zero exit), and a second launch on the same WORK resumes to the WORK of an uninterrupted
    launch, byte for byte, with no temp file or lock left."""
    from tests.test_distributed import TORCHRUN, launch

    root = tmp_path / "root"
    arguments = ["calibrate", str(tiny_llama_dir), "--out", str(root / "work"), "--data", str(tiny_text_file)]
    arguments += ["--samples", "4", "--seqlen", "32", "--batch-size", "1", "--device", "cpu"]
    launch(TORCHRUN, *arguments)
    expected = artifacts(root)
    shutil.rmtree(root)
    point = ("swiftsvd_cli.stages.calibrate", "layer_output", "3")  # rank 1's windows: 2 per layer, 1 per batch
    killed = launch(TORCHRUN, *arguments, check=False, program=(str(KILLER), *point), env={"KILL_RANK": "1"})
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "Signals.SIGKILL" in killed.stderr or "exitcode  : -9" in killed.stderr, killed.stderr[-4000:]
    launch(TORCHRUN, *arguments)
    assert not [p for p in root.rglob(".*")], "temp files or the lock survived the resumed launch"
    resumed = artifacts(root)
    assert resumed.keys() == expected.keys()
    assert [name for name in expected if resumed[name] != expected[name]] == []


def test_only_temps_of_dead_writers_of_this_host_are_removed(tmp_path: Path) -> None:
    from swiftsvd_cli.artifacts import store

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = store._owner().rpartition("-")[0]
    names = {
        f".layer_000.safetensors.{host}-{dead.stdout.strip()}.abc123.tmp": False,  # killed writer: removed
        f".out.{host}-{dead.stdout.strip()}.k2j3h": False,
        f".manifest.json.{host}-{os.getpid()}.xyz.tmp": True,  # a live writer (a concurrent run): kept
        f".manifest.json.otherhost-{dead.stdout.strip()}.xyz.tmp": True,  # another host's: cannot tell, kept
        f".out.{host}-{dead.stdout.strip()}.k2j3h.replaced": True,  # a replaced output mid-swap: never a temp
        ".gitignore": True,
    }
    for name in names:
        if name.startswith(".out"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("x")
    removed = store.remove_stale_temps(tmp_path.iterdir())
    assert sorted(p.name for p in removed) == sorted(name for name, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, kept in names.items() if kept)
