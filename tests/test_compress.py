"""allocate + compress on tiny models: exactness at ρ = 1, monotone perplexity, factored == merged, sizes, refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.eigen import EigenIndex
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.cli import app
from swiftsvd_cli.data.text import load_text, tokenize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.perplexity import perplexity
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import linear_inputs

SAMPLES, SEQLEN = 16, 64


@pytest.fixture(scope="module")
def work(trained_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("work")
    run_calibrate(
        CalibrateOptions(
            source=ModelSource(str(trained_llama_dir), device="cpu"),
            work=path,
            data=str(tiny_text_file),
            samples=SAMPLES,
            seqlen=SEQLEN,
        )
    )
    return path


def plan_for(work: Path, ratio: float, strategy: str = "uniform", **extra: object) -> Path:
    return run_allocate(
        AllocateOptions(work=work, ratio=ratio, strategy=strategy, device="cpu", force=True, **extra)
    ).path  # type: ignore[arg-type]


def compress_to(model_dir: Path, plan: Path, out: Path, merge: bool = False) -> Path:
    run_compress(CompressOptions(ModelSource(str(model_dir), "float32", "cpu"), out=out, plan=plan, merge=merge))
    return out


def text_ppl(model: torch.nn.Module, model_dir: Path, text_file: Path) -> float:
    ids = tokenize(AutoTokenizer.from_pretrained(model_dir), load_text(str(text_file), "train").text)
    return perplexity(model, ids, seqlen=SEQLEN).ppl


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 40).unsqueeze(0)).logits


def test_ratio_one_is_the_original(work: Path, trained_llama_dir: Path, tmp_path: Path) -> None:
    plan = RankPlan.load(plan_for(work, 1.0))
    assert all(module.dense for module in plan.modules) and plan.achieved_ratio == 1.0
    model, _ = load_compressed(compress_to(trained_llama_dir, plan_for(work, 1.0), tmp_path / "c"))
    original = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    assert torch.equal(logits(model), logits(original))


def test_perplexity_monotone_in_ratio(
    work: Path, trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    ppls = []
    for ratio in (1.0, 0.8, 0.6, 0.4, 0.2):
        model, _ = load_compressed(compress_to(trained_llama_dir, plan_for(work, ratio), tmp_path / f"r{ratio}"))
        ppls.append(text_ppl(model, trained_llama_dir, tiny_text_file))
    assert ppls == sorted(ppls), ppls
    assert ppls[-1] > 1.5 * ppls[0], ppls  # compression really bites


def test_factored_equals_merged_and_sizes_match_plan(work: Path, trained_llama_dir: Path, tmp_path: Path) -> None:
    plan_path = plan_for(work, 0.5, "dynamic", alpha=0.6)
    plan = RankPlan.load(plan_path)
    assert 0.5 - 0.05 < plan.achieved_ratio <= 0.5  # tiny dims: flooring costs up to a few %
    factored, _ = load_compressed(compress_to(trained_llama_dir, plan_path, tmp_path / "f"))
    merged = AutoModelForCausalLM.from_pretrained(
        compress_to(trained_llama_dir, plan_path, tmp_path / "m", merge=True), dtype=torch.float32
    )
    torch.testing.assert_close(logits(factored), logits(merged), rtol=1e-4, atol=1e-4)
    original = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    dense_total = sum(p.m * p.n for p in plan.modules)
    expected = sum(p.numel() for p in original.parameters()) - dense_total + sum(p.params for p in plan.modules)
    assert sum(p.numel() for p in factored.parameters()) == expected
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in original.parameters())
    section = json.loads((tmp_path / "f" / "config.json").read_text())["swiftsvd"]
    assert section["ranks"] == plan.ranks("model.layers")
    generated = factored.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_predicted_loss_matches_measured(
    work: Path, trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """The plan's Σ_{i>k} λ_i equals ‖WX − ABX‖² measured on the calibration inputs of a plain forward pass."""
    plan = RankPlan.load(plan_for(work, 0.4))
    compressed, _ = load_compressed(compress_to(trained_llama_dir, plan_for(work, 0.4), tmp_path / "c"))
    original = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    inputs = linear_inputs(trained_llama_dir, tiny_text_file, SAMPLES, SEQLEN)
    for module in plan.modules:
        path = f"model.layers.{module.layer}.{module.module}"
        W = original.get_submodule(path).weight.detach().double()
        low = compressed.get_submodule(path)
        W_k = low.A.weight.detach().double() @ low.B.weight.detach().double()
        measured = float((((W - W_k) @ inputs[path].T) ** 2).sum())
        assert measured == pytest.approx(module.predicted_loss, rel=1e-4, abs=1e-6), path


def test_dynamic_search_records_candidates(work: Path, tiny_text_file: Path) -> None:
    plan = RankPlan.load(plan_for(work, 0.6, "dynamic", val_samples=2))
    assert [c["alpha"] for c in plan.candidates] == [round(0.1 * i, 1) for i in range(11)]
    best = min(plan.candidates, key=lambda c: (c["val_ppl"], c["alpha"]))
    assert plan.alpha == best["alpha"]
    assert plan.achieved_ratio <= 0.6
    # a local calibration file has no validation split: alpha is scored on that file, and the plan says so
    validation = plan.validation
    assert (
        validation["text_sha256"] == store.sha256_file(tiny_text_file) and not validation["held_out_from_calibration"]
    )
    assert (validation["split"], validation["windows"], validation["seqlen"]) == ("validation", 2, SEQLEN)
    assert validation["tokens"] == 2 * SEQLEN


@pytest.fixture(scope="module")
def held_out_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import TINY_TEXT

    path = tmp_path_factory.mktemp("held-out") / "validation.txt"
    path.write_text(" ".join(reversed(TINY_TEXT.split(". "))))
    return path


def test_eval_flags_text_the_checkpoint_was_tuned_on(
    work: Path, trained_llama_dir: Path, tiny_text_file: Path, held_out_text: Path, tmp_path: Path
) -> None:
    from swiftsvd_cli.stages.evaluate import EvalOptions, evaluate
    from swiftsvd_cli.tables import render_table

    plan_path = plan_for(work, 0.6, "dynamic", val_data=str(held_out_text), val_samples=2, name="held-out")
    plan = RankPlan.load(plan_path)
    assert plan.validation["held_out_from_calibration"] and plan.validation["data"] == str(held_out_text)
    factored = compress_to(trained_llama_dir, plan_path, tmp_path / "factored")
    merged = compress_to(trained_llama_dir, plan_path, tmp_path / "merged", merge=True)
    other = tmp_path / "other.txt"
    other.write_text(held_out_text.read_text() + " And one more sentence.")
    texts = ",".join(str(path) for path in (tiny_text_file, held_out_text, other))
    targets = (str(trained_llama_dir), str(factored), str(merged))
    report = evaluate(EvalOptions(targets=targets, tasks=(texts,), seqlen=SEQLEN, limit=1, device="cpu"))
    original, *compressed = report.targets
    assert not any("tuned_on" in result for result in original.perplexity.values())
    for target in compressed:
        assert target.perplexity[str(tiny_text_file)]["tuned_on"] == ["calibration"]
        assert target.perplexity[str(held_out_text)]["tuned_on"] == ["validation"]
        assert "tuned_on" not in target.perplexity[str(other)]  # not byte-identical: not flagged
    assert "NOT HELD OUT: factored was tuned on" in str(render_table(report).caption)


def test_alpha_search_hashes_each_shard_once(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """11 candidates reconstruct every layer 11 times; the eigen shards must not be re-hashed each time."""
    hashed: Counter[str] = Counter()
    real = store.sha256_file

    def counting(path: Path) -> str:
        hashed[str(Path(path).resolve())] += 1
        return real(path)

    monkeypatch.setattr(store, "sha256_file", counting)
    plan_for(work, 0.5, "dynamic", val_samples=1)
    eigen = {str((work / record.shard.file).resolve()) for record in EigenIndex.load(work).layers.values()}
    # once each by the cache check, the spectra read and the first reconstruction; not once per candidate (13)
    assert eigen and all(1 <= hashed[name] <= 3 for name in eigen), hashed


def test_unverified_reread_still_checks_size(work: Path, tmp_path: Path) -> None:
    shard = EigenIndex.load(work).layers[0].shard
    copy = tmp_path / shard.file
    copy.parent.mkdir(parents=True)
    copy.write_bytes((work / shard.file).read_bytes())
    assert store.read_shard(tmp_path, shard, verify=False).keys()
    with copy.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(SwiftSVDError, match="corrupt shard"):
        store.read_shard(tmp_path, shard, verify=False)


def test_second_ratio_reuses_eigenbases(work: Path) -> None:
    plan_for(work, 0.7)
    assert (
        run_allocate(AllocateOptions(work=work, ratio=0.3, strategy="uniform", device="cpu", force=True)).eigen_computed
        == []
    )


def test_bad_inputs(work: Path, trained_llama_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    plan = plan_for(work, 0.5)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    empty_work = tmp_path / "empty-work"
    empty_work.mkdir()
    cases = {
        "ratio 0": (["allocate", str(work), "--ratio", "0"], "outside (0, 1]"),
        "ratio > 1": (["allocate", str(work), "--ratio", "1.5"], "outside (0, 1]"),
        "WORK without covariance": (["allocate", str(empty_work), "--ratio", "0.5"], "no calibration"),
        "plan from another model": (
            ["compress", str(tiny_llama_dir), "--plan", str(plan), "--out", str(tmp_path / "x"), "--device", "cpu"],
            "another model",
        ),
        "output exists": (["compress", str(trained_llama_dir), "--plan", str(plan), "--out", str(existing)], "exists"),
        "one-shot ratio outside": (
            ["compress", str(trained_llama_dir), "--ratio", "-1", "--out", str(tmp_path / "y")],
            "outside (0, 1]",
        ),
    }
    for case, (arguments, message) in cases.items():
        result = runner.invoke(app, arguments)
        assert result.exit_code == 1, (case, result.output)
        assert message in result.output and "Traceback" not in result.output, (case, result.output)
    assert (existing / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_checkpoint_dtype_reads_both_spellings() -> None:
    """transformers keeps config.dtype as a str or a torch.dtype; `auto` on a GPU must honour either."""
    from types import SimpleNamespace

    from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype

    assert checkpoint_dtype(SimpleNamespace(dtype="bfloat16")) == torch.bfloat16
    assert checkpoint_dtype(SimpleNamespace(dtype=torch.float16)) == torch.float16
    assert checkpoint_dtype(SimpleNamespace()) is None
    assert resolve_dtype("auto", "cuda", checkpoint_dtype(SimpleNamespace(dtype="bfloat16"))) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", torch.bfloat16) == torch.float32


def test_output_directory_has_plain_mkdir_permissions(work: Path, trained_llama_dir: Path, tmp_path: Path) -> None:
    """Built in a temp dir and renamed: it must not keep mkdtemp's 0700 (teammates could not read the model)."""
    from swiftsvd_cli.artifacts.store import umask

    out = compress_to(trained_llama_dir, plan_for(work, 0.6), tmp_path / "out")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_cached_eigenbases_need_no_model(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest records shapes and family: with the eigenbases cached, allocate and report never load the model."""
    from swiftsvd_cli.engine import eigen as engine
    from swiftsvd_cli.stages.report import ReportOptions, run_report

    plan_for(work, 0.7)  # computes (or finds) every eigenbasis
    model = AutoModelForCausalLM.from_pretrained(CalibrationManifest.load(work).model.spec)
    layer = model.model.layers[0]
    assert CalibrationManifest.load(work).shapes == {
        name: (layer.get_submodule(name).out_features, layer.get_submodule(name).in_features)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine, "open_model", no_load)
    uniform = RankPlan.load(plan_for(work, 0.4))
    fixed_alpha = RankPlan.load(plan_for(work, 0.4, "dynamic", alpha=0.5))
    assert uniform.achieved_ratio <= 0.4 and fixed_alpha.alpha == 0.5
    pytest.importorskip("matplotlib")
    result = run_report(ReportOptions(work=work, out=tmp_path / "report", device="cpu"))
    assert len(result.types) == 7


def test_an_eigenbasis_of_another_gram_is_recomputed(
    trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """eigen/index.json records the Gram each eigen shard came from: a layer whose Gram changed is redone, alone."""
    work = tmp_path / "work"
    source = ModelSource(str(trained_llama_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=work, data=str(tiny_text_file), samples=4, seqlen=SEQLEN))
    assert run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="uniform", device="cpu")).eigen_computed == [
        0,
        1,
    ]
    index = EigenIndex.load(work)
    stale = dataclasses.replace(index.layers[1], gram_sha256="0" * 64)  # as if computed from an earlier Gram
    index.with_layer(1, stale).save(work / "eigen" / "index.json")
    again = run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="uniform", device="cpu", force=True))
    assert again.eigen_computed == [1]
    assert EigenIndex.load(work).layers[1].gram_sha256 == CalibrationManifest.load(work).layers[1].shard.sha256
    index_file = work / "eigen" / "index.json"
    current = f'"format_version": {EigenIndex.FORMAT_VERSION}'
    index_file.write_text(index_file.read_text().replace(current, '"format_version": 0'))
    stale = run_allocate(AllocateOptions(work=work, ratio=0.5, strategy="uniform", device="cpu", force=True))
    assert stale.eigen_computed == [0, 1]  # a cache of another format is recomputed, not refused


def test_compress_refuses_an_eigenbasis_of_another_gram(work: Path, trained_llama_dir: Path, tmp_path: Path) -> None:
    plan = plan_for(work, 0.6)
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    index = EigenIndex.load(copy)
    index.with_layer(0, dataclasses.replace(index.layers[0], gram_sha256="0" * 64)).save(copy / "eigen" / "index.json")
    moved = RankPlan.load(plan)
    moved = dataclasses.replace(moved, work=str(copy))
    moved.save(tmp_path / "plan.json")
    with pytest.raises(SwiftSVDError, match="no eigenbasis of layer 0's current Gram"):
        compress_to(trained_llama_dir, tmp_path / "plan.json", tmp_path / "out")


def test_baseline_names_the_input_statistic_it_lacks(
    work: Path, trained_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WORK without input Grams (e.g. one keeping only output Grams) fails SVD-LLM with a clear message."""
    from swiftsvd_cli.engine.factors import FactorSource
    from swiftsvd_cli.model.architectures import LLAMA, decoder_layers, target_linears

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    linears = target_linears(decoder_layers(model, LLAMA)[0], LLAMA)
    weights = {name: linear.weight for name, linear in linears.items()}
    manifest = CalibrationManifest.load(work)
    with pytest.raises(SwiftSVDError, match="'svd-llm' needs input Grams.*--keep-input-grams"):
        FactorSource("svd-llm", work, manifest, EigenIndex.load(work), LLAMA, "cpu")  # output Grams for mlp_out
    manifest = dataclasses.replace(manifest, grams=dict.fromkeys(manifest.grams, "input"))  # as if all were kept
    for method, key in (("svd-llm", "attn_in.gram"), ("asvd", "attn_in.abs_sum")):
        source = FactorSource(method, work, manifest, EigenIndex.load(work), LLAMA, "cpu")
        monkeypatch.setattr(source, "_read", lambda shard, expect: {"tokens": torch.tensor(4)})
        with pytest.raises(SwiftSVDError, match=f"no '{key}'.*'{method}' needs: recalibrate with --keep-input-grams"):
            source(0, weights, {"self_attn.q_proj": 2})
