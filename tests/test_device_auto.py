"""`--device auto`: in one process with several GPUs, the eigendecompositions are spread over all of them.

No GPU here: which devices `auto` picks is checked with a patched CUDA device count, and the spreading itself
with CPU stand-ins for the GPUs (one thread per device, as on GPUs): the same shards byte for byte as one
device, each layer decomposed once, the layers split between the devices by cost.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts.eigen import EigenIndex
from swiftsvd_cli.cli import app
from swiftsvd_cli.engine import eigen
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.loading import ModelSource, eigen_devices, resolve_device
from swiftsvd_cli.stages import allocate
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from tests.conftest import build_tiny_model

LAYERS = 5


def test_auto_takes_every_visible_gpu_of_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and eigen_devices("auto") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert resolve_device("auto") == "cuda"
    assert eigen_devices("auto") == ["cuda:0", "cuda:1", "cuda:2"]
    assert eigen_devices(None) == eigen_devices("cuda") == ["cuda"] and eigen_devices("cuda:1") == ["cuda:1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert eigen_devices("auto") == ["cuda"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # launched: one GPU per process, layers per process
    assert eigen_devices("auto") == [distributed.local_device("cuda")]
    result = CliRunner().invoke(app, ["allocate", "/nonexistent", "--ratio", "0.5", "--device", "gpu"])
    assert result.exit_code != 0 and "auto" in result.output


@pytest.fixture(scope="module")
def work(tiny_tokenizer, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """A calibrated WORK of a 5-layer tiny Llama (no eigenbases yet)."""
    model_dir = tmp_path_factory.mktemp("five-layers")
    build_tiny_model("llama", len(tiny_tokenizer), num_hidden_layers=LAYERS).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    work = tmp_path_factory.mktemp("work") / "work"
    source = ModelSource(str(model_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=work, data=str(tiny_text_file), samples=4, seqlen=32))
    return work


def eigen_shards(work: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((work / "eigen").glob("*.safetensors"))}


def copy_of(work: Path, to: Path) -> Path:
    shutil.copytree(work, to, ignore=shutil.ignore_patterns("eigen", "plans", ".lock"))
    return to


def test_stand_in_devices_share_the_layers_and_give_one_device_s_shards(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = copy_of(work, tmp_path / "one")
    run_allocate(AllocateOptions(work=one, ratio=0.5, strategy="uniform", device="cpu"))

    calls: list[tuple[int, str, str]] = []  # (layer, device, thread)
    real = eigen.layer_eigenbases

    def spy(streamed, spec, index, grams, device):  # noqa: ANN001, ANN202
        calls.append((index, device, threading.current_thread().name))
        return real(streamed, spec, index, grams, device)

    stand_ins = ["cpu", "cpu:0", "cpu"]  # three "GPUs"
    monkeypatch.setattr(allocate, "eigen_devices", lambda device: stand_ins)
    monkeypatch.setattr(eigen, "layer_eigenbases", spy)
    spread = copy_of(work, tmp_path / "spread")
    run_allocate(AllocateOptions(work=spread, ratio=0.5, strategy="uniform", device="auto"))

    assert sorted(layer for layer, _, _ in calls) == list(range(LAYERS))  # each layer once
    per_thread = {thread: [layer for layer, _, t in calls if t == thread] for _, _, thread in calls}
    assert len(per_thread) == 3 and sorted(map(len, per_thread.values())) == [1, 2, 2]  # equal costs: 2/2/1
    assert all(thread.startswith("eigen") for thread in per_thread)
    assert {device for _, device, _ in calls} == set(stand_ins)
    assert eigen_shards(spread) == eigen_shards(one) and len(eigen_shards(one)) == LAYERS
    assert EigenIndex.load(spread).layers.keys() == EigenIndex.load(one).layers.keys()


def test_a_failure_on_one_device_is_one_line_and_keeps_the_finished_layers(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = eigen.layer_eigenbases

    def failing(streamed, spec, index, grams, device):  # noqa: ANN001, ANN202
        if index == 1:
            raise SwiftSVDError("layer 1 attn_in: the eigendecomposition did not converge (stand-in)")
        return real(streamed, spec, index, grams, device)

    monkeypatch.setattr(allocate, "eigen_devices", lambda device: ["cpu", "cpu"])
    monkeypatch.setattr(eigen, "layer_eigenbases", failing)
    failed = copy_of(work, tmp_path / "failed")
    result = CliRunner().invoke(app, ["allocate", str(failed), "--ratio", "0.5", "--strategy", "uniform"])
    assert result.exit_code == 1 and "did not converge (stand-in)" in result.output, result.output
    assert "Traceback" not in result.output
    finished = EigenIndex.load(failed).layers
    assert 1 not in finished and set(finished) <= set(range(LAYERS))
    monkeypatch.setattr(eigen, "layer_eigenbases", real)  # the rerun resumes: only the missing layers
    resumed = CliRunner().invoke(app, ["allocate", str(failed), "--ratio", "0.5", "--strategy", "uniform"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(EigenIndex.load(failed).layers) == list(range(LAYERS))
