"""Non-finite numbers: overflowing calibration windows, NaN Grams, eigensolvers that fail, NaN perplexity.

The overflow is real, not patched in: one token's embedding row is NaN, so exactly the calibration windows
that contain it go non-finite from layer 0 on, and a NaN lm_head leaves the Grams finite but every logit NaN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.cli import app
from swiftsvd_cli.config import Sampler
from swiftsvd_cli.core.grams import unpack_upper
from swiftsvd_cli.data.text import load_text, sample_windows
from swiftsvd_cli.engine import eigen
from tests.test_distributed import TORCHRUN, launch

SAMPLES, SEQLEN, SEED = 6, 24, 0


def windows_of(model_dir: Path, text: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sample_windows(Sampler.TOKENS, tokenizer, load_text(str(text), "train").text, SAMPLES, SEQLEN, SEED)


@pytest.fixture(scope="module")
def poisoned_token(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(a copy of the tiny Llama whose embedding of a token found in exactly one window is NaN, that window)."""
    windows = windows_of(tiny_llama_dir, tiny_text_file)
    counts = {int(t): sum(int(t) in w.tolist() for w in windows) for t in windows.unique()}
    token = min(t for t, count in counts.items() if count == 1)
    window = next(i for i, w in enumerate(windows) if token in w.tolist())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    path = tmp_path_factory.mktemp("nan-token")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path, window


def calibrate(model_dir: Path, text: Path, work: Path, *extra: str):  # noqa: ANN201
    arguments = ["calibrate", str(model_dir), "--out", str(work), "--data", str(text), "--samples", str(SAMPLES)]
    arguments += ["--seqlen", str(SEQLEN), "--seed", str(SEED), "--batch-size", "1", "--device", "cpu", *extra]
    return CliRunner().invoke(app, arguments)


def test_an_overflowing_window_is_named_or_skipped_and_recorded(
    poisoned_token: tuple[Path, int], tiny_text_file: Path, tmp_path: Path
) -> None:
    model_dir, window = poisoned_token
    result = calibrate(model_dir, tiny_text_file, tmp_path / "refused")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"layer 0: NaN or Inf activations in calibration samples {window}..{window}" in result.output
    assert "--skip-nonfinite" in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "refused").glob("covariance/*"))  # no Gram holds any of it

    work = tmp_path / "skipped"
    result = calibrate(model_dir, tiny_text_file, work, "--skip-nonfinite", "--gram-precision", "float64")
    assert result.exit_code == 0, result.output
    manifest = CalibrationManifest.load(work)
    assert [record.skipped for record in manifest.layers.values()] == [[window]] * manifest.model.num_layers
    # the Grams are those of the other windows alone, by a plain full-model forward of just those windows
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kept = torch.cat(
        [windows_of(model_dir, tiny_text_file)[:window], windows_of(model_dir, tiny_text_file)[window + 1 :]]
    )
    inputs: list[torch.Tensor] = []
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(kept)
    X = torch.cat(inputs).reshape(-1, inputs[0].shape[-1]).double()
    shard = store.read_shard(work, manifest.layers[1].shard)
    assert manifest.layers[1].tokens == kept.numel() == int(shard["tokens"])
    G = unpack_upper(shard["attn_in.gram"])
    assert float((G - X.T @ X).norm() / (X.T @ X).norm()) < 1e-10


def test_the_one_shot_refuses_or_skips_an_overflowing_window(
    poisoned_token: tuple[Path, int], tiny_text_file: Path, tmp_path: Path
) -> None:
    """`compress --ratio` passes --skip-nonfinite to its calibration: refused without it (no OUT written),
    compressed with it, the skipped window recorded in the WORK as by `calibrate --skip-nonfinite`. (Uniform
    ranks: a validation window holding the poisoned token would make the α search's perplexity NaN.)"""
    model_dir, window = poisoned_token
    arguments = ["compress", str(model_dir), "--ratio", "0.6", "--data", str(tiny_text_file), "--samples"]
    arguments += [str(SAMPLES), "--seqlen", str(SEQLEN), "--seed", str(SEED), "--batch-size", "1", "--device", "cpu"]
    arguments += ["--strategy", "uniform", "--work", str(tmp_path / "work")]  # no α search: the model gives NaN
    refused = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit), refused.output
    assert f"NaN or Inf activations in calibration samples {window}..{window}" in refused.output
    assert not (tmp_path / "refused").exists()

    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "out"), "--skip-nonfinite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()
    manifest = CalibrationManifest.load(tmp_path / "work")
    assert [record.skipped for record in manifest.layers.values()] == [[window]] * manifest.model.num_layers
    assert calibrate(model_dir, tiny_text_file, tmp_path / "alone", "--skip-nonfinite").exit_code == 0
    alone = CalibrationManifest.load(tmp_path / "alone")
    # the one shot's Grams are bit-identical to `calibrate --skip-nonfinite`'s
    assert [r.shard.sha256 for r in manifest.layers.values()] == [r.shard.sha256 for r in alone.layers.values()]


def test_two_processes_check_their_own_windows_and_record_every_skip(
    poisoned_token: tuple[Path, int], tiny_text_file: Path, tmp_path: Path
) -> None:
    """Under torchrun each process checks its share before the Grams are summed: the poisoned window (in one
    process's share) is named and refused, or skipped and recorded for every layer, Grams as in one process."""
    model_dir, window = poisoned_token
    arguments = ["calibrate", str(model_dir), "--data", str(tiny_text_file), "--samples", str(SAMPLES)]
    arguments += ["--seqlen", str(SEQLEN), "--seed", str(SEED), "--batch-size", "1", "--device", "cpu"]
    refused = launch(TORCHRUN, *arguments, "--out", str(tmp_path / "refused"), check=False)
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and len(errors) == 1, refused.stdout + refused.stderr
    assert f"layer 0: NaN or Inf activations in calibration samples {window}..{window}" in errors[0]
    assert not list((tmp_path / "refused").glob("covariance/*"))

    one, two = tmp_path / "one", tmp_path / "two"
    assert calibrate(model_dir, tiny_text_file, one, "--skip-nonfinite").exit_code == 0
    launch(TORCHRUN, *arguments, "--out", str(two), "--skip-nonfinite")
    single, pair = CalibrationManifest.load(one), CalibrationManifest.load(two)
    assert [r.skipped for r in pair.layers.values()] == [[window]] * pair.model.num_layers
    for index, record in single.layers.items():
        expected, got = store.read_shard(one, record.shard), store.read_shard(two, pair.layers[index].shard)
        assert int(got["tokens"]) == int(expected["tokens"]) == record.tokens
        for name, tensor in expected.items():
            difference, size = float((got[name] - tensor).double().norm()), float(tensor.double().norm())
            assert difference <= 1e-12 * max(size, 1.0), name


@pytest.fixture(scope="module")
def work(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("work")
    assert calibrate(tiny_llama_dir, tiny_text_file, path).exit_code == 0
    return path


def test_allocate_refuses_a_gram_with_nan(work: Path, tmp_path: Path) -> None:
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    shard = copy / "covariance" / "layer_001.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    tensors["mlp_in.gram"][7] = float("nan")  # a packed upper triangle
    save_file(tensors, str(shard))
    manifest = json.loads((copy / "manifest.json").read_text())  # re-signed: only the content check can catch it
    manifest["layers"]["1"]["shard"] |= {"sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["allocate", str(copy), "--ratio", "0.5", "--strategy", "uniform"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"shard {shard}: mlp_in.gram holds NaN or Inf" in result.output
    assert not (copy / "plans").exists()


def test_eigh_that_does_not_converge_falls_back_to_float64_on_the_cpu(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    allocate = ["allocate", str(work), "--ratio", "0.5", "--strategy", "uniform", "--device", "cpu", "--force"]
    runner = CliRunner()
    assert runner.invoke(app, allocate).exit_code == 0
    reference = (work / "eigen" / "layer_001.safetensors").read_bytes()
    real = eigen.group_eigenbases
    calls: list[torch.dtype] = []

    def fails_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs.get("precision", torch.float64))
        if len(calls) == 1:  # what a GPU solver raises on a matrix it cannot handle
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(*args, **kwargs)

    shutil.rmtree(work / "eigen")
    monkeypatch.setattr(eigen, "group_eigenbases", fails_once)
    with caplog.at_level(logging.WARNING, logger="swiftsvd"):
        assert runner.invoke(app, allocate).exit_code == 0
    assert "layer 0 attn_in: eigh did not converge on cpu" in caplog.text and "float64 on the CPU" in caplog.text
    assert (work / "eigen" / "layer_001.safetensors").read_bytes() == reference  # the fallback changes nothing else

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    shutil.rmtree(work / "eigen")
    monkeypatch.setattr(eigen, "group_eigenbases", never)
    result = runner.invoke(app, allocate)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "layer 0 attn_in: the eigendecomposition did not converge" in result.output
    monkeypatch.setattr(eigen, "group_eigenbases", real)
    assert runner.invoke(app, allocate).exit_code == 0  # and the WORK is still good for the next run


def test_a_nan_perplexity_ends_the_one_shot_without_a_model(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")  # decoder layers (and so the Grams) stay finite; every logit is NaN
    model_dir = tmp_path / "nan-head"
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(model_dir)
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    arguments = ["compress", str(model_dir), "--ratio", "0.5", "--out", str(out), "--data", str(tiny_text_file)]
    arguments += ["--samples", "4", "--seqlen", "32", "--val-samples", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "perplexity window 0" in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
