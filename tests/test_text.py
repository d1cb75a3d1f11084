"""Text recipes on stub hub datasets (joiner, documents, shard, windows), split disjointness, SVD-LLM's sampler."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from swiftsvd_cli.data.text import RECIPES, load_text, sample_windows, spread_windows, svd_llm_windows, tokenize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.stages.allocate import validation_text
from swiftsvd_cli.stages.evaluate import EvalOptions, evaluate

DOCUMENTS = 3_000  # every stub split/shard holds this many rows


class StubRows:
    """The slice of `datasets.Dataset` the recipes use: len, column access, select."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> list[str]:
        return [row[column] for row in self.rows]

    def select(self, indices: range) -> StubRows:
        return StubRows([self.rows[i] for i in indices])


def stub_document(path: str, split: str, shard: str, index: int) -> str:
    """A short row naming its source (a checksum of dataset, split and shard) and its index."""
    return f"{zlib.crc32(f'{path}|{split}|{shard}'.encode()) % 997} {index}"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace `datasets.load_dataset` by rows that name where they came from; returns the calls made."""
    import datasets

    calls: list[dict[str, Any]] = []

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> StubRows:
        calls.append({"path": path, "name": name, **kwargs})
        split, files = kwargs["split"], kwargs.get("data_files")
        shard = files[split] if files else "-"
        column = "sentence" if path == "ptb_text_only" else "text"
        return StubRows([{column: stub_document(path, split, shard, i)} for i in range(DOCUMENTS)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def expected(path: str, split: str, shard: str, documents: int, joiner: str) -> str:
    return joiner.join(stub_document(path, split, shard, i) for i in range(documents))


C4_TEST_SHARD = "en/c4-validation.00000-of-00008.json.gz"


def test_eval_recipes_match_the_peers_code(hub: list[dict[str, Any]]) -> None:
    # SVD-LLM get_test_data: test splits joined by "\n\n"; C4 = first 2,000 documents of validation shard 00000
    assert load_text("wikitext2", "test").text == expected("wikitext", "test", "-", DOCUMENTS, "\n\n")
    assert hub[-1]["name"] == "wikitext-2-raw-v1"
    assert load_text("ptb", "test").text == expected("ptb_text_only", "test", "-", DOCUMENTS, "\n\n")
    assert hub[-1]["name"] == "penn_treebank"
    c4 = load_text("c4", "test")
    assert c4.text == expected("allenai/c4", "validation", C4_TEST_SHARD, 2_000, "\n\n") and c4.windows is None
    # GPTQ get_c4_new (--new-eval): first 1,100 documents of the same shard joined by " ", 256 windows
    gptq = load_text("c4-gptq", "test")
    assert gptq.text == expected("allenai/c4", "validation", C4_TEST_SHARD, 1_100, " ") and gptq.windows == 256
    assert {"documents": 1_100, "joiner": " ", "data_files": C4_TEST_SHARD, "windows": 256}.items() <= set(
        gptq.protocol.items()
    )
    assert gptq.protocol["dataset"] == "allenai/c4" and "revision" in gptq.protocol


def test_calibration_recipes(hub: list[dict[str, Any]]) -> None:
    # SVD-LLM get_calib_train_data joins train splits with "\n\n" (PTB too); C4 = the train shard's first 20,000
    assert load_text("ptb", "train").text == expected("ptb_text_only", "train", "-", DOCUMENTS, "\n\n")
    shard = "en/c4-train.00000-of-01024.json.gz"
    assert load_text("c4", "train").text == expected("allenai/c4", "train", shard, DOCUMENTS, "\n\n")  # stub < 20k
    assert RECIPES["c4"]["train"].documents == 20_000


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4", "c4-gptq"])
def test_validation_is_never_the_evaluation_text(hub: list[dict[str, Any]], name: str) -> None:
    validation, evaluation = load_text(name, "validation"), load_text(name, "test")
    assert validation.sha256 != evaluation.sha256
    assert not set(validation.text.split(RECIPES[name]["validation"].joiner)) & set(
        evaluation.text.split(RECIPES[name]["test"].joiner)
    )
    read = {(call["split"], str(call.get("data_files"))) for call in hub}
    assert len(read) == 2  # a different split, or for C4 a different validation shard
    assert validation.protocol["split"] == "validation"
    # what allocate scores alpha on, with --val-data NAME and by default after calibrating on NAME
    calibrated_on = SimpleNamespace(settings=SimpleNamespace(data=name, data_sha256=load_text(name, "train").sha256))
    for val_data in (name, None):
        scored = validation_text(val_data, calibrated_on)  # type: ignore[arg-type]
        assert scored.sha256 == validation.sha256 != evaluation.sha256


def test_c4_windows_are_capped_only_for_gptq(hub: list[dict[str, Any]], tiny_llama_dir: Path) -> None:
    options = EvalOptions(targets=(str(tiny_llama_dir),), tasks=("c4,c4-gptq",), seqlen=16, batch_size=64, device="cpu")
    report = evaluate(options)
    c4, gptq = report.targets[0].perplexity["c4"], report.targets[0].perplexity["c4-gptq"]
    assert c4["windows"] == c4["windows_total"] > 256  # SVD-LLM: every full window
    assert gptq["windows"] == 256 < gptq["windows_total"]  # GPTQ: the first 256
    datasets = report.protocol["perplexity"]["datasets"]
    assert datasets["c4"]["documents"] == 2_000 and datasets["c4"]["joiner"] == "\n\n"
    assert datasets["c4-gptq"]["documents"] == 1_100 and datasets["c4-gptq"]["data_files"] == C4_TEST_SHARD


def test_local_file_serves_every_split(tiny_text_file: Path) -> None:
    texts = {split: load_text(str(tiny_text_file), split) for split in ("train", "validation", "test")}
    assert len({source.sha256 for source in texts.values()}) == 1


def svd_llm_get_calib_train_data(tot_text: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> list[Any]:
    """SVD-LLM utils/data_utils.py get_calib_train_data (batch_size=1) after the text is joined, verbatim."""
    batch_size = 1
    random.seed(seed)
    nsamples += 1
    traindataset = []
    for s in range(nsamples):
        i = random.randint(0, len(tot_text) - seqlen - 1)
        j = i + seqlen * 10
        trainenc = tokenizer(tot_text[i:j], return_tensors="pt")
        if trainenc.input_ids.shape[1] < seqlen:
            s = s - 1  # noqa: PLW2901 (theirs: a no-op)
            continue
        if s % batch_size == 0:
            if s != 0:
                attention_mask = torch.ones_like(inp)  # noqa: F821
                traindataset.append({"input_ids": inp, "attention_mask": attention_mask})  # noqa: F821
            inp = trainenc.input_ids[:, :seqlen]
        else:
            inp = torch.cat((inp, trainenc.input_ids[:, :seqlen]), dim=0)
    return traindataset


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer: Any) -> Any:
    """The tiny tokenizer, adding a BOS to every call as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>")
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer


@pytest.mark.parametrize("seqlen,samples,seed", [(16, 12, 3), (40, 30, 0)])
def test_svd_llm_sampler_is_their_code_draw_for_draw(bos_tokenizer: Any, seqlen: int, samples: int, seed: int) -> None:
    from tests.conftest import TINY_TEXT

    text = TINY_TEXT[:3_000]  # short: some slices near the end have fewer than seqlen tokens and are skipped
    theirs = torch.cat(
        [batch["input_ids"] for batch in svd_llm_get_calib_train_data(text, bos_tokenizer, samples, seqlen, seed)]
    )
    ours = svd_llm_windows(bos_tokenizer, text, samples, seqlen, seed)
    assert torch.equal(ours, theirs)
    assert bool((ours[:, 0] == bos_tokenizer.bos_token_id).all())  # a BOS per window, unlike the token sampler
    assert torch.equal(sample_windows("svd-llm", bos_tokenizer, text, samples, seqlen, seed), ours)


def test_token_sampler_is_seeded_windows_of_the_whole_text(bos_tokenizer: Any) -> None:
    from tests.conftest import TINY_TEXT

    windows = sample_windows("tokens", bos_tokenizer, TINY_TEXT, 5, 16, 3)
    ids = tokenize(bos_tokenizer, TINY_TEXT)
    assert int((windows[:, 0] == bos_tokenizer.bos_token_id).sum()) <= 1  # one BOS for the whole text
    for window in windows:
        starts = [s for s in range(ids.numel() - 15) if torch.equal(ids[s : s + 16], window)]
        assert starts
    with pytest.raises(SwiftSVDError, match="unknown sampler 'nope'"):
        sample_windows("nope", bos_tokenizer, TINY_TEXT, 5, 16, 3)


def test_spread_windows_cover_the_text_evenly() -> None:
    ids = torch.arange(100)  # 10 windows of 10 tokens; the ragged tail of 0 is dropped
    picked = spread_windows(ids, 10, 4)
    assert [int(w[0]) for w in picked] == [0, 30, 60, 90]  # first and last window, evenly between
    assert torch.equal(spread_windows(ids, 10, 50), ids.view(10, 10))  # asking for more gives all of them
    with pytest.raises(SwiftSVDError, match="at least one window"):
        spread_windows(ids[:5], 10, 4)
