"""`--target-ppl` and `--strategy global` through the allocate stage and the CLI on a tiny trained model.

The validation perplexities are recomputed here from the plan's ranks (and from the compressed checkpoint),
not read back from what the search recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.cli import app
from swiftsvd_cli.config import VAL_SAMPLES
from swiftsvd_cli.core.allocation import parameter_count
from swiftsvd_cli.core.linalg import uniform_rank
from swiftsvd_cli.data.text import load_text, spread_windows, tokenize
from swiftsvd_cli.engine.eigen import load_eigen_index
from swiftsvd_cli.engine.factors import FactorSource
from swiftsvd_cli.metrics.perplexity import perplexity
from swiftsvd_cli.model.architectures import LLAMA
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.loading import ModelSource, load_model
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from tests.test_streaming import reconstructed

SEQLEN = 64
runner = CliRunner()


@pytest.fixture(scope="module")
def work(trained_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("target") / "work"
    source = ModelSource(str(trained_llama_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=path, data=str(tiny_text_file), samples=16, seqlen=SEQLEN))
    return path


def validation_windows(work: Path, tokenizer: Any) -> torch.Tensor:
    """The default validation split (a local file has none: the whole file), VAL_SAMPLES windows spread over it."""
    text = load_text(CalibrationManifest.load(work).settings.data, "validation").text
    return spread_windows(tokenize(tokenizer, text), SEQLEN, VAL_SAMPLES)


def validation_ppl(work: Path, ranks: dict[tuple[int, str], int]) -> float:
    """Validation perplexity of the plan `ranks` (dense reconstruction), scored from scratch."""
    manifest = CalibrationManifest.load(work)
    loaded = load_model(manifest.model.spec, dtype="float32", device="cpu")  # whole: the reference path
    factors = FactorSource("swift", work, manifest, load_eigen_index(work, manifest), LLAMA, "cpu")
    windows = validation_windows(work, loaded.tokenizer)
    with reconstructed(loaded.model, LLAMA, ranks, factors):
        return perplexity(loaded.model, windows.reshape(-1), seqlen=SEQLEN).ppl


@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_target_ppl_finds_the_smallest_ratio(work: Path, strategy: str) -> None:
    original = validation_ppl(work, {})
    target = original * 1.5
    result = run_allocate(AllocateOptions(work=work, target_ppl=target, strategy=strategy, device="cpu", force=True))
    plan = result.plan
    assert result.path.name == f"target-ppl-{target:g}-{strategy}.json"
    ranks = {(p.layer, p.module): p.rank for p in plan.modules}
    found = validation_ppl(work, ranks)
    assert found <= target and found == pytest.approx(plan.target["validation_ppl"], rel=1e-5)
    assert plan.validation["split"] == "validation" and plan.validation["windows"] == VAL_SAMPLES
    assert 0 < plan.target_ratio < 1 and plan.target["ratio"] == plan.target_ratio
    steps = {step["ratio"]: step["val_ppl"] for step in plan.target["steps"]}
    assert len(steps) <= 8 and steps[1.0] == pytest.approx(original, rel=1e-5)
    below = round(plan.target_ratio - 0.01, 2)
    assert below == 0.0 or steps[below] > target  # the grid point just below was tried and missed the target


def test_dynamic_target_runs_the_alpha_grid_at_the_ratio_found(work: Path) -> None:
    target = validation_ppl(work, {}) * 2
    plan = run_allocate(AllocateOptions(work=work, target_ppl=target, device="cpu", force=True)).plan
    assert plan.strategy == "dynamic" and len(plan.candidates) == 11
    assert plan.target["alpha_during_search"] == 0.5
    assert plan.target["validation_ppl"] == min(c["val_ppl"] for c in plan.candidates) <= target


def test_unreachable_target_is_one_line(work: Path) -> None:
    result = runner.invoke(app, ["allocate", str(work), "--target-ppl", "1.0", "--strategy", "uniform"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "unreachable" in errors[0]
    assert "Traceback" not in result.output and result.output.count("validation ppl") == 1  # stopped at ρ = 1.0
    refusals = {
        "none": ([], "give one of --ratio"),
        "ratio too": (["--ratio", "0.5", "--target-ppl", "10"], "--ratio and --target-ppl each choose the ratio"),
        "bytes too": (["--bytes-ratio", "0.5", "--target-ppl", "10"], "--bytes-ratio and --target-ppl each choose"),
        "below 1": (["--target-ppl", "0.5"], "not a perplexity"),
        "int8": (["--target-ppl", "10", "--factor-dtype", "int8"], "16-bit factors"),
    }
    for case, (args, message) in refusals.items():
        bad = runner.invoke(app, ["allocate", str(work), *args])
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output, (case, bad.output)


def test_global_plan_respects_budget_and_floor(work: Path) -> None:
    plan = run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="global", device="cpu", force=True)).plan
    assert plan.strategy == "global" and plan.delta == 0.5 and plan.alpha is None
    assert plan.achieved_ratio <= 0.5
    assert sum(p.params for p in plan.modules) <= 0.5 * sum(p.m * p.n for p in plan.modules)
    assert all(p.rank >= uniform_rank(p.m, p.n, 0.25) for p in plan.modules)  # ⌊δ k̄⌋ with δ = 0.5
    assert len({p.rank for p in plan.modules}) > len({p.kind for p in plan.modules})  # not uniform per type
    assert all(p.params == parameter_count(p.m, p.n, p.rank) for p in plan.modules)


def test_one_shot_target_ppl_compresses(
    trained_llama_dir: Path, tiny_text_file: Path, work: Path, tmp_path: Path
) -> None:
    target = validation_ppl(work, {}) * 1.5
    out = tmp_path / "c"
    common = ["--data", str(tiny_text_file), "--samples", "16", "--seqlen", str(SEQLEN), "--device", "cpu"]
    result = runner.invoke(
        app,
        ["compress", str(trained_llama_dir), "--target-ppl", f"{target}", "--strategy", "uniform", "--work", str(work)]
        + ["--out", str(out), *common],
    )
    assert result.exit_code == 0, result.output
    assert "target-ppl" in result.output
    model, tokenizer = load_compressed(out, dtype="float32")
    windows = validation_windows(work, tokenizer)
    assert perplexity(model, windows.reshape(-1), seqlen=SEQLEN).ppl <= target * (1 + 1e-4)
    plan = RankPlan.load(work / "plans" / f"target-ppl-{target:g}-uniform.json")
    assert plan.target["ppl"] == pytest.approx(target)
