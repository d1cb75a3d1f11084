"""`compress --kv-cache latent [--kv-ratio]` on a tiny trained Llama: ranks, the recorded config, generation through
`load_compressed` equal to the same factored model with a dense cache, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.cli import app
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.speed import measure_speed
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.hf import latent_kv
from swiftsvd_cli.model.hf.latent_kv import LatentLayer, uninstall_latent_kv
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import calibrated_plan

KV = ("self_attn.k_proj", "self_attn.v_proj")
KV_WIDTH = 16  # 2 KV heads x head_dim 8


@pytest.fixture(scope="module")
def plans(trained_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("kv-work")
    plan = calibrated_plan(trained_llama_dir, tiny_text_file, work, samples=8, seqlen=64, ratio=0.6)
    from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate

    dense = run_allocate(AllocateOptions(work=work, ratio=1.0, strategy="uniform", device="cpu")).path
    return {"0.6": plan, "1.0": dense}


def compress(model_dir: Path, plan: Path, out: Path, **kv: object) -> Path:
    run_compress(CompressOptions(ModelSource(str(model_dir), "float32", "cpu"), out=out, plan=plan, **kv))
    return out


def test_latent_directory_generates_like_the_factored_model(
    plans: dict[str, Path], trained_llama_dir: Path, tmp_path: Path
) -> None:
    out = compress(trained_llama_dir, plans["0.6"], tmp_path / "latent", kv_cache="latent", kv_ratio=0.25)
    section = json.loads((out / "config.json").read_text())["swiftsvd"]
    assert section["kv_cache"] == "latent" and section["kv_ratio"] == 0.25
    plan = RankPlan.load(plans["0.6"])
    cap = int(0.25 * KV_WIDTH)
    for module in plan.modules:
        expected = min(module.rank, cap) if module.module in KV else module.rank
        assert section["ranks"][f"model.layers.{module.layer}.{module.module}"] == expected

    model, tokenizer = load_compressed(out)
    reference = load_compressed(out)[0]
    uninstall_latent_kv(reference)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.unk_token
    batch = tokenizer(
        ["The quick brown fox", "A stitch", "Knowledge is power. Practice"], return_tensors="pt", padding=True
    )
    assert (batch.attention_mask == 0).any()  # really left padded
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        latent_out = model.generate(**batch, **kwargs, return_dict_in_generate=True)
        assert torch.equal(latent_out.sequences, reference.generate(**batch, **kwargs))
    layer = latent_out.cache.layers[0]
    assert isinstance(layer, LatentLayer) and layer.keys.shape[-1] == layer.values.shape[-1] == cap

    dense_kv = measure_speed(reference, prompt_len=8, new_tokens=2, repeats=1).kv_cache_bytes_per_token
    latent_kv_bytes = measure_speed(model, prompt_len=8, new_tokens=2, repeats=1).kv_cache_bytes_per_token
    layers = len(model.model.layers)
    assert dense_kv == layers * 2 * KV_WIDTH * 4  # float32 keys and values
    assert latent_kv_bytes == layers * (2 * cap * 4 + 4)  # float32 latents and an int32 position


def test_a_plan_with_dense_kv_needs_a_kv_ratio(plans: dict[str, Path], trained_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SwiftSVDError, match="keeps 4 dense"):
        compress(trained_llama_dir, plans["1.0"], tmp_path / "refused", kv_cache="latent")
    assert not (tmp_path / "refused").exists()
    out = compress(trained_llama_dir, plans["1.0"], tmp_path / "kv-only", kv_cache="latent", kv_ratio=0.5)
    ranks = json.loads((out / "config.json").read_text())["swiftsvd"]["ranks"]
    assert set(ranks) == {f"model.layers.{i}.{name}" for i in range(2) for name in KV}  # only k/v factored
    assert set(ranks.values()) == {8}


def test_kv_options_are_one_line_errors(
    plans: dict[str, Path], trained_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    factored, dense = ["--plan", str(plans["0.6"])], ["--plan", str(plans["1.0"])]
    cases = {
        "ratio without latent": ([*factored, "--kv-ratio", "0.5"], "only saves memory with --kv-cache latent"),
        "latent and merge": ([*factored, "--kv-cache", "latent", "--merge"], "cannot be combined with --merge"),
        "ratio outside": ([*factored, "--kv-cache", "latent", "--kv-ratio", "0"], "outside (0, 1]"),
        "dense k/v": ([*dense, "--kv-cache", "latent"], "needs factored k/v"),
        "unsupported": ([*factored, "--kv-cache", "latent"], "does not support architecture 'llama'"),
    }
    supported = tuple(c for c in latent_kv.SUPPORTED_ATTENTION if c.__name__ != "LlamaAttention")
    monkeypatch.setattr(latent_kv, "SUPPORTED_ATTENTION", supported)  # as if Llama had no latent support
    for case, (extra, message) in cases.items():
        result = runner.invoke(
            app, ["compress", str(trained_llama_dir), "--out", str(tmp_path / "x"), "--device", "cpu", *extra]
        )
        assert result.exit_code == 1, (case, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (case, result.output)
    assert not (tmp_path / "x").exists()
    typo = runner.invoke(app, ["compress", str(trained_llama_dir), "--out", str(tmp_path / "x"), "--kv-cache", "paged"])
    assert typo.exit_code == 2 and "dense" in typo.output and "latent" in typo.output  # Typer lists the choices
    with pytest.raises(SwiftSVDError, match="unknown kvcache 'paged': use one of dense, latent"):
        compress(trained_llama_dir, plans["0.6"], tmp_path / "x", kv_cache="paged")  # the API gets the same check


def test_latent_kv_bench_script_runs(
    plans: dict[str, Path], trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """scripts/latent_kv_bench.py at toy sizes: it writes what it promises, and the latent cache is exact."""
    import latent_kv_bench

    weights = compress(trained_llama_dir, plans["0.6"], tmp_path / "w")
    latent = compress(trained_llama_dir, plans["0.6"], tmp_path / "l", kv_cache="latent", kv_ratio=0.25)
    sizes = ["--seqlen", "32", "--windows", "2", "--batch", "2", "--prompt-len", "8", "--new-tokens", "3"]
    result = latent_kv_bench.main(
        [
            *("--original", str(trained_llama_dir), "--weights", str(weights), "--latent", str(latent)),
            *("--data", str(tiny_text_file), "--greedy-tokens", "4", "--values-new-tokens", "2"),
            *("--out", str(tmp_path / "out"), *sizes),
        ]
    )
    assert (tmp_path / "out" / "latent_kv.json").is_file() and (tmp_path / "out" / "latent_kv.png").is_file()
    exact = result["exactness"]
    assert exact["max_token_nll_difference"] < 1e-4 and exact["greedy_identical_rows"] == exact["greedy_prompts"]
    kv = [target["speed"]["kv_cache_bytes_per_token"] for target in result["eval"]["targets"]]
    assert kv[0] == kv[1] > kv[2]  # weights-only compression leaves the cache alone; latents shrink it
    assert set(result["values"]["decode_tokens_per_s"]) == {"fold", "rebuild", "auto"}
