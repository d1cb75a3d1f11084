"""Knowing before starting: the dry-run footprint against the bytes really written, and the free-disk refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.cli import app
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, dry_run, run_calibrate
from swiftsvd_cli.stages.compress import CompressOptions, run_compress


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def calibrate_options(model: str, work: Path, text: str, samples: int, seqlen: int) -> CalibrateOptions:
    return CalibrateOptions(ModelSource(model, device="cpu"), work, text, samples, seqlen)


@pytest.mark.parametrize("samples", [2, 16])  # fewer tokens than the break-even rank, and more
def test_dry_run_disk_estimate_matches_what_is_written(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path, samples: int
) -> None:
    options = calibrate_options(str(tiny_model_dir), tmp_path / "work", str(tiny_text_file), samples, 16)
    footprint = dry_run(options)
    assert not options.work.exists()  # a dry run writes nothing
    run_calibrate(options)
    run_allocate(AllocateOptions(work=options.work, ratio=0.5, strategy="uniform", device="cpu"))
    covariance, eigen = folder_bytes(options.work / "covariance"), folder_bytes(options.work / "eigen")
    assert footprint.covariance_bytes == pytest.approx(covariance, rel=0.02)
    assert footprint.eigen_bytes == pytest.approx(eigen, rel=0.02)
    assert footprint.host_bytes > footprint.hidden_bytes > 0 and footprint.device_bytes == 0


@pytest.mark.slow
def test_dry_run_within_ten_percent_on_the_demo(tmp_path: Path) -> None:
    """The demo's real disk use (30 layers of covariance and eigenbases) against the estimate from its config."""
    options = calibrate_options("demo", tmp_path / "work", "demo", 2, 256)
    footprint = dry_run(options)
    run_calibrate(options)
    run_allocate(AllocateOptions(work=options.work, ratio=0.8, strategy="uniform", device="cpu"))
    written = folder_bytes(options.work / "covariance") + folder_bytes(options.work / "eigen")
    assert footprint.covariance_bytes + footprint.eigen_bytes == pytest.approx(written, rel=0.10)


def test_dry_run_cli_prints_the_footprint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["calibrate", str(tiny_llama_dir), "--out", str(work), "--dry-run"])
    assert result.exit_code == 0, result.output
    for words in ("disk: Grams", "eigenbases", "hidden states", "host RAM", "free disk"):
        assert words in result.output
    assert not work.exists()


def test_full_disk_is_refused_before_any_work(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    options = calibrate_options(str(tiny_llama_dir), work, str(tiny_text_file), 4, 16)
    monkeypatch.setattr(store, "free_bytes", lambda path: 1000)
    with pytest.raises(SwiftSVDError, match=r"calibrating 2 layers needs .* only 1000 B is free"):
        run_calibrate(options)
    assert not (work / "covariance").exists()
    arguments = ["calibrate", str(tiny_llama_dir), "--out", str(work), "--data", str(tiny_text_file)]
    result = CliRunner().invoke(app, [*arguments, "--samples", "4", "--seqlen", "16", "--device", "cpu"])
    assert result.exit_code == 1 and "is free" in result.output and "Traceback" not in result.output
    monkeypatch.undo()
    run_calibrate(options)
    monkeypatch.setattr(store, "free_bytes", lambda path: 1000)
    with pytest.raises(SwiftSVDError, match="eigenbases of 2 layers needs"):
        run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="uniform", device="cpu"))
    assert not (work / "eigen").exists()
    monkeypatch.undo()
    plan = run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="uniform", device="cpu")).path
    monkeypatch.setattr(store, "free_bytes", lambda path: 1000)
    with pytest.raises(SwiftSVDError, match="compressed checkpoint .* needs"):
        run_compress(CompressOptions(ModelSource(str(tiny_llama_dir), device="cpu"), tmp_path / "out", plan))
    assert not (tmp_path / "out").exists()
