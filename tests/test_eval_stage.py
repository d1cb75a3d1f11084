"""The `eval` stage end to end on tiny saved models: report, JSON, table, and refusals before any load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from swiftsvd_cli.artifacts.eval_report import EvalReport
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages import evaluate as stage
from swiftsvd_cli.stages.evaluate import EvalOptions, evaluate, split_tasks
from swiftsvd_cli.tables import render_table
from tests.conftest import calibrated_plan


def test_split_tasks() -> None:
    assert split_tasks(("wikitext2, ptb", "piqa,,wikitext2")) == ["wikitext2", "ptb", "piqa"]


def test_two_targets_side_by_side(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "reports" / "eval.json"
    options = EvalOptions(
        targets=(str(tiny_llama_dir), str(tiny_llama_dir)),
        tasks=(str(tiny_text_file),),
        seqlen=32,
        limit=3,
        batch_size=2,
        device="cpu",
        bench=True,
        bench_prompt_len=8,
        bench_new_tokens=3,
        bench_repeats=1,
        output=output,
    )
    report = evaluate(options)
    first, second = report.targets
    ppl = first.perplexity[str(tiny_text_file)]
    assert ppl["windows"] == 3 and ppl["predicted_tokens"] == 3 * 31 and ppl["ppl"] > 1
    assert second.perplexity[str(tiny_text_file)]["ppl"] == ppl["ppl"]  # same model, deterministic
    assert first.fingerprint == second.fingerprint and first.compressed is None
    assert first.size["checkpoint_bytes"] > 0 and first.speed is not None
    assert report.protocol["perplexity"]["datasets"][str(tiny_text_file)]["id"].startswith("file:")
    assert report.provenance.versions["torch"] and report.provenance.inputs[f"target {tiny_llama_dir}"]

    data = json.loads(output.read_text())
    assert data["kind"] == "eval" and data["format_version"] == EvalReport.FORMAT_VERSION
    assert EvalReport.load(output) == report  # the written report reads back as it was
    assert data["targets"][1]["perplexity"][str(tiny_text_file)]["ppl"] == ppl["ppl"]
    assert not list(output.parent.glob("*.tmp"))  # atomic write leaves no temp file

    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert f"ppl {tiny_text_file.name}" in text and "(+0%)" in text and "decode tok/s" in text
    assert "KV cache per token" in text and first.speed["kv_cache_bytes_per_token"] > 0

    with pytest.raises(SwiftSVDError, match="--force"):
        evaluate(options)


def test_table_shows_relative_change() -> None:
    def target(name: str, ppl: float) -> stage.TargetReport:
        return stage.TargetReport(name, name, None, "f", "float32", None, perplexity={"wikitext2": {"ppl": ppl}})

    protocol = {"perplexity": {"seqlen": 2048}, "device": "cpu"}
    report = stage.EvalReport(protocol, [target("a", 10.0), target("b", 15.2)], {"piqa": "offline"}, "now")
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert "15.200 (+52%)" in text and "10.000" in text and "skipped: piqa" in text


def forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("swiftsvd_cli.model.loading.load_model", load_model)


def test_unknown_task_fails_before_loading(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> None:
    forbid_loading(monkeypatch)
    monkeypatch.setattr("swiftsvd_cli.metrics.zeroshot.lm_eval_version", lambda: None)  # no lm-eval index: fast
    with pytest.raises(SwiftSVDError, match="unknown task 'wikitxt2'.*wikitext2.*hellaswag"):
        evaluate(EvalOptions(targets=(str(tiny_llama_dir),), tasks=("wikitxt2",)))


def test_missing_text_file_fails_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    forbid_loading(monkeypatch)
    with pytest.raises(SwiftSVDError, match="text file not found"):
        evaluate(EvalOptions(targets=("x",), tasks=(str(tmp_path / "absent.txt"),)))


def test_seqlen_too_large_is_an_error(tiny_llama_dir: Path, tiny_text_file: Path) -> None:
    with pytest.raises(SwiftSVDError, match="max_position_embeddings"):
        evaluate(EvalOptions(targets=(str(tiny_llama_dir),), tasks=(str(tiny_text_file),), seqlen=4096))


def test_original_vs_compressed(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    """Through the real pipeline: the compressed target's size is counted from its factored modules."""
    from swiftsvd_cli.stages.compress import CompressOptions, run_compress

    work, out = tmp_path / "work", tmp_path / "compressed"
    plan = calibrated_plan(tiny_llama_dir, tiny_text_file, work, samples=8, seqlen=32, ratio=0.5)
    run_compress(CompressOptions(ModelSource(str(tiny_llama_dir), "float32", "cpu"), out=out, plan=plan))

    report = evaluate(
        EvalOptions(targets=(str(tiny_llama_dir), str(out)), tasks=(str(tiny_text_file),), seqlen=32, limit=2)
    )
    original, compressed = report.targets
    assert original.compressed is None and compressed.compressed is not None
    assert original.size["lowrank_modules"] == 0 and compressed.size["lowrank_modules"] > 0
    assert compressed.size["params_target_dense"] == original.size["params_target_linear"]
    assert compressed.size["target_kept_ratio"] == pytest.approx(compressed.compressed["achieved_ratio"], rel=1e-6)
    assert compressed.size["checkpoint_bytes"] < original.size["checkpoint_bytes"]
    assert original.fingerprint != compressed.fingerprint
