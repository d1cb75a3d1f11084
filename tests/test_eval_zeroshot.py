"""Zero-shot through lm-evaluation-harness, offline, on a multiple-choice task defined here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics import zeroshot
from swiftsvd_cli.stages.evaluate import classify_tasks
from tests.conftest import build_tiny_model

TASK = "swiftsvd_tiny_mc"
BROKEN = "swiftsvd_missing_data"
QUESTIONS = [f"Question {i}: the quick brown" if i % 2 else f"Proverb {i}: all that" for i in range(10)]
CHOICES = ["fox jumps", "lazy dog", "gold glitters"]
N_RIGHT = 6  # gold = the model's own favourite for the first 6 documents, another choice for the last 4


def choice_loglikelihoods(model: nn.Module, tokenizer, question: str) -> list[float]:  # noqa: ANN001
    """log p(" " + choice | question), computed here the way a causal LM scores a continuation."""
    scores = []
    context = tokenizer.encode(question)
    for choice in CHOICES:
        whole = tokenizer.encode(question + " " + choice)
        continuation = whole[len(context) :]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        positions = range(len(context) - 1, len(whole) - 1)
        scores.append(sum(logprobs[p, whole[p + 1]].item() for p in positions))
        assert len(continuation) == len(positions)
    return scores


def write_tasks(folder: Path, golds: list[int]) -> Path:
    docs = [{"question": q, "choices": CHOICES, "answer": g} for q, g in zip(QUESTIONS, golds, strict=True)]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    template = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    (folder / f"{TASK}.yaml").write_text(template.format(task=TASK, data=folder / "data.jsonl"))
    (folder / f"{BROKEN}.yaml").write_text(template.format(task=BROKEN, data=folder / "absent.jsonl"))
    return folder


@pytest.fixture(scope="module")
def tiny_task(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """A model, and a task folder whose expected accuracy under that model is exactly N_RIGHT / 10."""
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=1)
    golds = []
    for index, question in enumerate(QUESTIONS):
        scores = choice_loglikelihoods(model, tiny_tokenizer, question)
        best = max(range(len(CHOICES)), key=scores.__getitem__)
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-4, "near tie: the expected answer would be fragile"
        golds.append(best if index < N_RIGHT else (best + 1) % len(CHOICES))
    return model, write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"), golds)


needs_lm_eval = pytest.mark.skipif(zeroshot.lm_eval_version() is None, reason="lm-eval is not installed")


@needs_lm_eval
def test_accuracy_matches_the_models_own_preferences(tiny_task, tiny_tokenizer) -> None:  # noqa: ANN001
    model, folder = tiny_task
    prepared = zeroshot.prepare_tasks([TASK, BROKEN], include_path=folder)
    assert prepared.runnable == [TASK]
    assert "could not load" in prepared.skipped[BROKEN]
    results = zeroshot.run_zero_shot(model, tiny_tokenizer, prepared, batch_size=4)
    assert set(results) == {TASK}
    assert results[TASK]["acc"] == pytest.approx(N_RIGHT / len(QUESTIONS), abs=1e-12)
    assert results[TASK]["samples"] == len(QUESTIONS)
    assert "alias" not in results[TASK] and "sample_len" not in results[TASK]


@needs_lm_eval
def test_classify_accepts_include_path_tasks_and_aliases(tiny_task) -> None:  # noqa: ANN001
    _, folder = tiny_task
    ppl, zs = classify_tasks(["wikitext2", "arc_e", TASK], include_path=folder)
    assert ppl == ["wikitext2"] and zs == ["arc_easy", TASK]


def test_without_lm_eval_tasks_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zeroshot, "lm_eval_version", lambda: None)
    prepared = zeroshot.prepare_tasks(["piqa", "arc_c"])
    assert prepared.runnable == []
    assert set(prepared.skipped) == {"piqa", "arc_challenge"}
    assert all("lm-eval is not installed" in reason for reason in prepared.skipped.values())
    assert zeroshot.run_zero_shot(None, None, prepared) == {}
    with pytest.raises(SwiftSVDError, match="unknown task 'my_task'.*wikitext2.*piqa"):
        classify_tasks(["my_task"])


def test_unknown_task_lists_the_valid_names() -> None:
    with pytest.raises(SwiftSVDError, match="unknown task 'wikitext3'.*wikitext2, ptb, c4.*openbookqa"):
        classify_tasks(["wikitext3"], include_path=Path(__file__).parent)  # no YAMLs here: fast, exact


@needs_lm_eval
def test_stage_runs_zero_shot_next_to_perplexity(
    tiny_llama_dir: Path,
    tiny_text_file: Path,
    tiny_tokenizer,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    from swiftsvd_cli.model.loading import load_model
    from swiftsvd_cli.stages.evaluate import EvalOptions, evaluate

    model = load_model(str(tiny_llama_dir)).model
    golds = []
    for index, question in enumerate(QUESTIONS):
        scores = choice_loglikelihoods(model, tiny_tokenizer, question)
        best = max(range(len(CHOICES)), key=scores.__getitem__)
        golds.append(best if index < N_RIGHT else (best + 1) % len(CHOICES))
    folder = write_tasks(tmp_path, golds)
    report = evaluate(
        EvalOptions(
            targets=(str(tiny_llama_dir),),
            tasks=(f"{tiny_text_file},{TASK},{BROKEN}",),
            seqlen=32,
            limit=2,
            device="cpu",
            task_include_path=folder,
        )
    )
    (target,) = report.targets
    assert target.zero_shot[TASK]["acc"] == pytest.approx(N_RIGHT / len(QUESTIONS), abs=1e-12)
    assert set(report.zero_shot_skipped) == {BROKEN}
    assert target.perplexity[str(tiny_text_file)]["windows"] == 2
    assert report.protocol["zero_shot"]["tasks"] == [TASK, BROKEN]
