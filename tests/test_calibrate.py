"""Calibration: Grams, token counts and importance against independent full-model computations; resume; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.data.text import calibration_windows, load_text, tokenize
from swiftsvd_cli.engine.covariance import input_gram, output_gram
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import LLAMA
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.calibrate import CalibrateOptions, importance_sum, run_calibrate, shard_name

SAMPLES, SEQLEN = 6, 24


def options(model_dir: Path, work: Path, text: Path, **overrides: object) -> CalibrateOptions:
    settings: dict[str, object] = dict(
        source=ModelSource(str(model_dir), device="cpu"),
        work=work,
        data=str(text),
        samples=SAMPLES,
        seqlen=SEQLEN,
        batch_size=4,
    )
    settings.update(overrides)
    return CalibrateOptions(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("work")
    run_calibrate(options(tiny_model_dir, work, tiny_text_file, gram_precision="float64"))
    return work


def reference_activations(model_dir: Path, text: Path) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor, object]:
    """Inputs and outputs of every target linear, from one plain full-model forward (no layer-by-layer code)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenize(tokenizer, load_text(str(text), "train").text), SAMPLES, SEQLEN, 3)
    captured: dict[str, list[torch.Tensor]] = {}
    for index, layer in enumerate(model.model.layers):
        for name in LLAMA.modules:

            def hook(_m: object, args: tuple[torch.Tensor], out: torch.Tensor, key: str = f"{index}.{name}") -> None:
                captured.setdefault(f"{key}:in", []).append(args[0].reshape(-1, args[0].shape[-1]).double())
                captured.setdefault(f"{key}:out", []).append(out.reshape(-1, out.shape[-1]).double())

            layer.get_submodule(name).register_forward_hook(hook)
        layer.register_forward_hook(
            lambda _m, _a, out, i=index: captured.setdefault(f"{i}:layer_out", []).append(out.double())
        )
    with torch.no_grad():
        outputs = model(windows, output_hidden_states=True)
    return captured, windows, (model, outputs)


def test_grams_match_full_forward(calibrated: Path, tiny_model_dir: Path, tiny_text_file: Path) -> None:
    captured, windows, (model, outputs) = reference_activations(tiny_model_dir, tiny_text_file)
    manifest = CalibrationManifest.load(calibrated)
    assert manifest.complete and manifest.settings.gram_precision == "float64"
    # tiny shapes: hidden 32, MLP 48, so down_proj (32 x 48) keeps its smaller output Gram, as at 7B (4096 x 11008)
    assert manifest.grams == {"attn_in": "input", "attn_out": "input", "mlp_in": "input", "mlp_out": "output"}
    for index, record in manifest.layers.items():
        shard = store.read_shard(calibrated, record.shard)
        assert record.tokens == windows.numel() == int(shard["tokens"])
        for group, names in LLAMA.groups.items():
            for name in names:  # every module of the group really reads the same input
                X = torch.cat(captured[f"{index}.{name}:in"])
                G = X.T @ X  # float64 reference from the plain forward's inputs
                W = model.model.layers[index].get_submodule(name).weight.detach().double()
                if manifest.grams[group] == "input":
                    error = (input_gram(shard, group) - G).norm() / G.norm()
                    C = W @ input_gram(shard, group) @ W.T
                else:  # the output-Gram route equals W G Wᵀ formed from the input Gram
                    C = output_gram(shard, name)
                    error = (C - W @ G @ W.T).norm() / (W @ G @ W.T).norm()
                assert error < 1e-10, (index, name, float(error))
                assert torch.allclose(shard[f"{group}.abs_sum"], X.abs().sum(0), rtol=1e-10)
                # the paper's Algorithm 1 hooks outputs: C = Σ y yᵀ must equal W G Wᵀ
                # (y comes out of the float32 layer, hence float32 tolerance)
                Y = torch.cat(captured[f"{index}.{name}:out"])
                assert float((C - Y.T @ Y).norm() / (Y.T @ Y).norm()) < 1e-5
        # importance against hidden states taken from the plain forward
        h_in = outputs.hidden_states[index].double()
        h_out = torch.cat(captured[f"{index}:layer_out"])
        bi = (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).mean()
        assert record.importance == pytest.approx(float(bi), rel=1e-9)
        if index + 1 < len(manifest.layers):  # the last hidden state HF returns is after the final norm
            assert torch.allclose(h_out, outputs.hidden_states[index + 1].double(), atol=1e-5)
    assert json.loads((calibrated / "importance.json").read_text()) == manifest.importance()


def test_resume_recomputes_only_missing_layer(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    run_calibrate(options(tiny_llama_dir, work, tiny_text_file))
    kept, deleted = work / shard_name(0), work / shard_name(1)
    before = (kept.stat().st_mtime_ns, store.sha256_file(deleted))
    deleted.unlink()
    result = run_calibrate(options(tiny_llama_dir, work, tiny_text_file))
    assert result.computed_layers == [1]
    assert kept.stat().st_mtime_ns == before[0]
    assert store.sha256_file(deleted) == before[1]  # deterministic recomputation
    assert run_calibrate(options(tiny_llama_dir, work, tiny_text_file)).computed_layers == []


def test_mismatching_settings_refused_then_forced(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    run_calibrate(options(tiny_llama_dir, work, tiny_text_file))
    manifest_bytes = (work / "manifest.json").read_bytes()
    with pytest.raises(SwiftSVDError, match="samples"):
        run_calibrate(options(tiny_llama_dir, work, tiny_text_file, samples=SAMPLES + 1))
    assert (work / "manifest.json").read_bytes() == manifest_bytes
    result = run_calibrate(options(tiny_llama_dir, work, tiny_text_file, samples=SAMPLES + 1, force=True))
    assert result.manifest.settings.samples == SAMPLES + 1 and result.computed_layers == [0, 1]


def test_corrupt_shard_is_named(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    manifest = run_calibrate(options(tiny_llama_dir, work, tiny_text_file)).manifest
    path = work / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(SwiftSVDError, match="layer_001.safetensors"):
        store.read_shard(work, manifest.layers[1].shard)
    # a rerun notices it too and recomputes exactly that layer
    assert run_calibrate(options(tiny_llama_dir, work, tiny_text_file)).computed_layers == [1]


def test_windows_are_reproducible_and_bounded() -> None:
    ids = torch.arange(1000)
    first = calibration_windows(ids, 5, 100, seed=3)
    assert torch.equal(first, calibration_windows(ids, 5, 100, seed=3))
    assert not torch.equal(first, calibration_windows(ids, 5, 100, seed=4))
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 100)) for row in first)
    with pytest.raises(SwiftSVDError, match="fewer than"):
        calibration_windows(ids, 11, 100, seed=3)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def foreign_work(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    run_calibrate(options(tiny_llama_dir, work, tiny_text_file))
    return work


def test_bad_inputs_are_one_line_errors_and_touch_nothing(
    foreign_work: Path, tiny_text_file: Path, tmp_path: Path, tiny_tokenizer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    from transformers import GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    from swiftsvd_cli.cli import app
    from tests.conftest import save_tiny_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    other_model = save_tiny_model("qwen2", tmp_path / "other", tiny_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    before = snapshot(foreign_work)
    cases = {  # name: (MODEL, extra options (later ones win in click), expected words in the error)
        "missing model path": (str(tmp_path / "nope"), [], "not found"),
        "unknown hub id offline": ("no-such-org/no-such-model", [], "hub"),
        "unsupported architecture": (str(gpt2), [], "unsupported architecture 'gpt2'"),
        "zero samples": (str(other_model), ["--samples", "0"], "--samples"),
        "empty text": (str(other_model), ["--data", str(empty)], "empty"),
        "another model's WORK": (str(other_model), [], "model"),
    }
    runner = CliRunner()
    for case, (model, extra, message) in cases.items():
        arguments = [
            "calibrate",
            model,
            "--out",
            str(foreign_work),
            "--samples",
            str(SAMPLES),
            "--seqlen",
            str(SEQLEN),
            "--data",
            str(tiny_text_file),
            "--device",
            "cpu",
            *extra,
        ]
        result = runner.invoke(app, arguments)
        assert result.exit_code == 1, (case, result.output)
        assert message in result.output, (case, result.output)
        assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, (case, result.output)
        assert snapshot(foreign_work) == before, case


def test_older_format_work_is_refused_then_replaced_with_force(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    run_calibrate(options(tiny_llama_dir, work, tiny_text_file))
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["format_version"] = 1
    (work / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SwiftSVDError, match="format version 1.*--force"):
        run_calibrate(options(tiny_llama_dir, work, tiny_text_file))
    assert run_calibrate(options(tiny_llama_dir, work, tiny_text_file, force=True)).computed_layers == [0, 1]


def test_importance_sum_equals_cosine_similarity_including_zero_states() -> None:
    g = torch.Generator().manual_seed(0)
    h_in = torch.randn(3, 10, 16, generator=g)
    h_out = h_in + 0.2 * torch.randn(3, 10, 16, generator=g)
    h_in[0, 0], h_out[1, 1], h_out[2, 2], h_in[2, 2] = 0.0, 0.0, 0.0, 0.0  # zero states have cosine 0 there too
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
    assert importance_sum(h_in, h_out) == pytest.approx(float((1 - cos).sum()), rel=1e-13)
