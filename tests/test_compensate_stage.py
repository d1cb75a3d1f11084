"""`compress --compensate` on a tiny model: every factor reaches the reduced-rank-regression minimum for the inputs
the saved compressed model really feeds it (and the original inputs, weighted by γ), it beats the one-pass factors
there, and WORK is left untouched.

The inputs X (original model) and X̂ (the compressed checkpoint, loaded back) are captured here with hooks on
freshly drawn calibration windows, independently of the engine's layer-by-layer pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.cli import app
from swiftsvd_cli.core.compensation import ORIGINAL_WEIGHT
from swiftsvd_cli.data.text import calibration_windows, load_text, tokenize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import LLAMA
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.hf.lowrank import LowRankLinear
from swiftsvd_cli.model.hf.qlinear import Int8Linear
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import calibrated_plan
from tests.test_compensation import reference_minimum

SAMPLES, SEQLEN, RATIO = 16, 64, 0.5


@pytest.fixture(scope="module")
def setup(trained_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compensate")
    plan = calibrated_plan(trained_llama_dir, tiny_text_file, root / "work", SAMPLES, SEQLEN, RATIO)
    before = tree_digest(root / "work")
    dirs = {}
    for name, compensate in (("one_pass", False), ("compensated", True)):
        options = CompressOptions(
            ModelSource(str(trained_llama_dir), "float32", "cpu"), out=root / name, plan=plan, compensate=compensate
        )
        run_compress(options)
        dirs[name] = root / name
    assert tree_digest(root / "work") == before  # ratio-specific: nothing written into the calibration cache
    return {"work": root / "work", "plan": plan, "model": trained_llama_dir, **dirs}


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@torch.no_grad()
def module_inputs(model: torch.nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """(tokens, n) float64 inputs of each named module over all windows."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for name in names
    ]
    for batch in windows.split(4):
        model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def objective(W_k: torch.Tensor, Y: torch.Tensor, X: torch.Tensor, X_hat: torch.Tensor) -> float:
    """The compensated objective ‖Y − W' X̂‖² + γ ‖Y − W' X‖² (inputs as (N, n) rows)."""
    return float(((Y - W_k @ X_hat.T) ** 2).sum() + ORIGINAL_WEIGHT * ((Y - W_k @ X.T) ** 2).sum())


def stacked_minimum(Y: torch.Tensor, X: torch.Tensor, X_hat: torch.Tensor, k: int) -> float:
    """Its brute-force minimum over rank k: the plain problem for inputs [X̂, √γ X] and targets [Y, √γ Y]."""
    root = ORIGINAL_WEIGHT**0.5
    return reference_minimum(torch.cat([Y, root * Y], dim=1), torch.cat([X_hat.T, root * X.T], dim=1), k)


def test_factors_reach_the_minimum_on_the_compressed_paths_inputs(setup: dict[str, Path]) -> None:
    manifest = CalibrationManifest.load(setup["work"])
    original = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    compensated, tokenizer = load_compressed(setup["compensated"], dtype="float32")
    one_pass, _ = load_compressed(setup["one_pass"], dtype="float32")
    settings = manifest.settings
    ids = tokenize(tokenizer, load_text(settings.data, "train").text)
    windows = calibration_windows(ids, settings.samples, settings.seqlen, settings.seed)
    plan = RankPlan.load(setup["plan"])
    names = [f"{LLAMA.layers}.{p.layer}.{p.module}" for p in plan.modules if not p.dense]
    X = module_inputs(original, windows, names)
    X_hat = module_inputs(compensated, windows, names)
    record = json.loads((setup["compensated"] / "config.json").read_text())["swiftsvd"]["compensation"]
    damped = {f"{LLAMA.layers}.{key}" for key in record["damping"]}
    assert len(damped) < len(names) / 2
    gains = []
    for name in names:
        W = original.get_submodule(name).weight.detach().double()
        Y = W @ X[name].T  # (m, N)
        module, baseline = compensated.get_submodule(name), one_pass.get_submodule(name)
        assert isinstance(module, LowRankLinear) and isinstance(baseline, LowRankLinear)

        def loss(factored: LowRankLinear, Y: torch.Tensor = Y, name: str = name) -> float:
            W_k = factored.A.weight.detach().double() @ factored.B.weight.detach().double()
            return objective(W_k, Y, X[name], X_hat[name])

        if name not in damped:  # a damped Ĝ is the ridge problem's optimum, not this one's
            assert loss(module) == pytest.approx(stacked_minimum(Y, X[name], X_hat[name], module.rank), rel=1e-4), name
        assert loss(module) <= loss(baseline) * (1 + 1e-4), name
        gains.append(loss(module) / loss(baseline))
    first_layer_qkv = [
        g for name, g in zip(names, gains, strict=True) if ".0.self_attn." in name and "o_proj" not in name
    ]
    assert first_layer_qkv and all(g == pytest.approx(1.0, rel=1e-4) for g in first_layer_qkv)  # X̂ = X: Swift-SVD
    assert min(gains) < 0.9  # later matrices really are compensated


def test_record_in_the_compressed_directory(setup: dict[str, Path]) -> None:
    section = json.loads((setup["compensated"] / "config.json").read_text())["swiftsvd"]
    record = section["compensation"]
    assert record["ratio_specific"] is True and record["tokens"] == SAMPLES * SEQLEN
    assert record["calibration"]["samples"] == SAMPLES
    assert all(0 < value <= 1 for value in record["damping"].values())
    assert json.loads((setup["one_pass"] / "config.json").read_text())["swiftsvd"]["compensation"] is None
    assert section["ranks"] == RankPlan.load(setup["plan"]).ranks(LLAMA.layers)


def test_merged_compensated_equals_factored(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    run_compress(
        CompressOptions(
            ModelSource(str(setup["model"]), "float32", "cpu"), out, setup["plan"], merge=True, compensate=True
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    factored, _ = load_compressed(setup["compensated"], dtype="float32")
    tokens = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, factored(tokens).logits, atol=1e-4)
    assert json.loads((out / "swiftsvd.json").read_text())["compensation"]["ratio_specific"] is True


def test_refusals(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SwiftSVDError, match="compensate"):
        run_compress(
            CompressOptions(
                ModelSource(str(setup["model"]), "float32", "cpu"),
                tmp_path / "x",
                setup["plan"],
                "svd",
                compensate=True,
            )
        )
    result = CliRunner().invoke(app, ["compress", "--help"])
    assert "Ratio-specific" in result.output and "--compensate" in result.output


def test_int8_factors_are_fitted_to_the_int8_layers_inputs(setup: dict[str, Path], tmp_path: Path) -> None:
    """--compensate composes with --factor-dtype int8: every factor stored int8, and on the inputs the int8
    checkpoint really feeds each matrix its dequantised factors come within a few percent of the reduced-rank
    minimum, below the one-pass int8 factors' (up to 1.1x and more above it)."""
    source = ModelSource(str(setup["model"]), "float32", "cpu")
    for name, compensate in (("int8", True), ("int8_one_pass", False)):
        run_compress(
            CompressOptions(source, tmp_path / name, setup["plan"], compensate=compensate, factor_dtype="int8")
        )
    compensated, tokenizer = load_compressed(tmp_path / "int8", dtype="float32")
    one_pass, _ = load_compressed(tmp_path / "int8_one_pass", dtype="float32")
    original = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    settings = CalibrationManifest.load(setup["work"]).settings
    ids = tokenize(tokenizer, load_text(settings.data, "train").text)
    windows = calibration_windows(ids, settings.samples, settings.seqlen, settings.seed)
    plan = RankPlan.load(setup["plan"])
    names = [f"{LLAMA.layers}.{p.layer}.{p.module}" for p in plan.modules if not p.dense]
    X, X_hat = module_inputs(original, windows, names), module_inputs(compensated, windows, names)
    section = json.loads((tmp_path / "int8" / "config.json").read_text())["swiftsvd"]
    assert section["factor_dtype"] == "int8" and section["compensation"]["ratio_specific"] is True
    ratios = []
    for name in names:
        module, baseline = compensated.get_submodule(name), one_pass.get_submodule(name)
        assert isinstance(module.A, Int8Linear) and isinstance(module.B, Int8Linear), name
        Y = original.get_submodule(name).weight.detach().double() @ X[name].T

        def loss(factored: torch.nn.Module, Y: torch.Tensor = Y, name: str = name) -> float:
            W_k = factored.A.dequantize().double() @ factored.B.dequantize().double()
            return objective(W_k, Y, X[name], X_hat[name])

        minimum = stacked_minimum(Y, X[name], X_hat[name], int(module.rank))
        ratios.append((loss(module) / minimum, loss(baseline) / minimum))
    assert all(mine <= 1.05 for mine, _ in ratios)  # the rest: int8 rounding of the factors (and damping)
    assert all(mine < theirs for mine, theirs in ratios[3:])  # after layer 0's q/k/v, where X̂ = X
    assert max(theirs for _, theirs in ratios) > 1.1
