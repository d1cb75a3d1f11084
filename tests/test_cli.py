"""The command line as a user meets it: help, version, env, and the one-shot compress reusing its cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swiftsvd_cli import __version__
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.cli import app

runner = CliRunner()


def test_help_lists_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("calibrate", "allocate", "compress", "eval", "env"):
        assert command in result.output
    assert "KEPT" in runner.invoke(app, ["allocate", "-h"]).output  # the ratio convention is spelled out


def test_version_and_env() -> None:
    assert runner.invoke(app, ["--version"]).output.strip() == f"swiftsvd {__version__}"
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0 and "torch" in result.output and "transformers" in result.output


def test_one_shot_reuses_calibration_across_ratios(
    trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "cache"))
    common = [
        "--data",
        str(tiny_text_file),
        "--samples",
        "8",
        "--seqlen",
        "64",
        "--strategy",
        "uniform",
        "--device",
        "cpu",
    ]
    first = runner.invoke(
        app, ["compress", str(trained_llama_dir), "--ratio", "0.7", "--out", str(tmp_path / "a"), *common]
    )
    assert first.exit_code == 0, first.output
    works = list((tmp_path / "cache" / "work").iterdir())
    assert len(works) == 1
    manifest_before = (works[0] / "manifest.json").read_text()
    second = runner.invoke(
        app, ["compress", str(trained_llama_dir), "--ratio", "0.5", "--out", str(tmp_path / "b"), *common]
    )
    assert second.exit_code == 0, second.output
    manifest = CalibrationManifest.load(works[0])
    assert (works[0] / "manifest.json").read_text() == manifest_before  # nothing recalibrated or recomputed
    assert sorted(p.name for p in (works[0] / "plans").iterdir()) == [
        "ratio-0.50-uniform.json",
        "ratio-0.70-uniform.json",
    ]
    assert manifest.complete and (tmp_path / "a" / "config.json").exists() and (tmp_path / "b" / "config.json").exists()

    stale = json.loads((works[0] / "manifest.json").read_text()) | {"format_version": 1}  # an older swiftsvd's cache
    (works[0] / "manifest.json").write_text(json.dumps(stale))
    third = runner.invoke(
        app, ["compress", str(trained_llama_dir), "--ratio", "0.5", "--out", str(tmp_path / "c"), *common]
    )
    assert third.exit_code == 0, third.output  # the default WORK is a cache: rebuilt, not refused
    assert CalibrationManifest.load(works[0]).complete


def test_choices_are_listed_and_typos_rejected_by_the_parser() -> None:
    help_text = runner.invoke(app, ["compress", "-h"], env={"COLUMNS": "250"}).output
    for choices in ("dynamic|uniform", "swift|svd|asvd|svd-llm", "auto|float32|bfloat16|float16"):
        assert choices in help_text
    for arguments in (
        ["--strategy", "dynamc"],
        ["--method", "svdllm"],
        ["--dtype", "fp16"],
        ["--device", "gpu"],
        ["--factor-dtype", "int3"],
    ):
        result = runner.invoke(app, ["compress", "demo", "--ratio", "0.5", "--out", "x", *arguments])
        assert result.exit_code == 2 and "Invalid value" in result.output, arguments  # the parser, before any work


def test_one_shot_options_with_a_plan_are_one_line_errors(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    for option, value in (("--work", "w"), ("--strategy", "uniform"), ("--alpha", "0.5"), ("--data", "demo")) + (
        ("--samples", "8"),
        ("--seqlen", "64"),
    ):
        result = runner.invoke(app, ["compress", "demo", "--plan", str(plan), "--out", "x", option, value])
        assert result.exit_code == 1, (option, result.output)
        assert (
            result.output.strip()
            == f"error: {option} only apply to the one shot (--ratio, --bytes-ratio or --target-ppl), not to --plan"
        )


def test_model_from_nowhere_is_an_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["calibrate", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "give MODEL (or a --config recipe with a `model` key)" in result.output


def test_verbose_shows_the_debug_log(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    arguments = ["calibrate", str(tiny_llama_dir), "--data", str(tiny_text_file), "--samples", "2", "--seqlen", "16"]
    arguments += ["--device", "cpu"]
    quiet = runner.invoke(app, [*arguments, "--out", str(tmp_path / "a")], terminal_width=200)
    loud = runner.invoke(app, [*arguments, "--out", str(tmp_path / "b"), "--verbose"], terminal_width=200)
    assert quiet.exit_code == loud.exit_code == 0, loud.output
    assert "layer 1: 32 tokens" not in quiet.output and "layer 1: 32 tokens" in loud.output


def flat_help(*command: str) -> str:
    """A command's --help as one line of words: rich's panel borders and line wrapping removed."""
    output = runner.invoke(app, [*command, "-h"]).output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


def test_help_says_which_plan_a_baseline_gets_and_where_alpha_is_scored() -> None:
    compress_help = flat_help("compress")
    assert "svd-llm-fp64" in compress_help and "sensitivity-based rank search" in compress_help
    assert "SVD-LLM (W)" in compress_help and "Algorithm 2 plan" in compress_help
    allocate_help = flat_help("allocate")
    assert "never its test split" in allocate_help
    assert "SVD-LLM's get_calib_train_data" in flat_help("calibrate")


def test_sampler_is_recorded_and_a_change_is_refused(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    common = ["calibrate", str(tiny_llama_dir), "--out", str(work), "--data", str(tiny_text_file), "--device", "cpu"]
    sizes = ["--samples", "4", "--seqlen", "16"]
    done = runner.invoke(app, [*common, *sizes, "--sampler", "svd-llm"])
    assert done.exit_code == 0, done.output
    assert CalibrationManifest.load(work).settings.sampler == "svd-llm"
    refused = runner.invoke(app, [*common, *sizes])  # default sampler: tokens
    assert refused.exit_code == 1 and "sampler" in refused.output
    bogus = runner.invoke(app, [*common, *sizes, "--sampler", "bogus", "--force"])
    assert bogus.exit_code == 2 and "Invalid value" in bogus.output  # the parser refuses it, before any work
    assert CalibrationManifest.load(work).settings.sampler == "svd-llm"  # nothing destroyed
