"""scripts/ppl_splits.py: its three perplexities against a direct Hugging Face loss on the same windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ppl_splits
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftsvd_cli.config import Sampler
from swiftsvd_cli.data.text import load_text, sample_windows
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate

SAMPLES, SEQLEN, SEED, WINDOWS = 4, 16, 3, 2


@torch.no_grad()
def direct_ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean token loss Hugging Face computes with labels = inputs."""
    return math.exp(float(model(windows, labels=windows).loss))


def test_splits_equal_a_direct_loss(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    source = ModelSource(str(tiny_llama_dir), device="cpu")
    options = CalibrateOptions(source=source, work=work, data=str(tiny_text_file), samples=SAMPLES, seqlen=SEQLEN)
    run_calibrate(options)
    out = tmp_path / "splits.json"
    assert ppl_splits.main([str(work), str(tiny_llama_dir), "--windows", str(WINDOWS), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["ppl"][str(tiny_llama_dir)]

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = load_text(str(tiny_text_file), "train").text  # a file is its own train, validation and test split
    calibration = sample_windows(Sampler.TOKENS, tokenizer, text, SAMPLES, SEQLEN, SEED)[:WINDOWS]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    first = ids[: WINDOWS * SEQLEN].view(WINDOWS, SEQLEN)
    assert got["calibration"] == pytest.approx(direct_ppl(model, calibration), rel=1e-5)
    assert got["validation"] == got["test"] == pytest.approx(direct_ppl(model, first), rel=1e-5)
    assert got["calibration"] != pytest.approx(got["test"], rel=1e-3)  # different windows, different numbers


def test_a_missing_model_is_one_line(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    work = tmp_path / "work"
    source = ModelSource(str(tiny_llama_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=work, data=str(tiny_text_file), samples=2, seqlen=SEQLEN))
    assert ppl_splits.main([str(work), str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().out.count("\n") == 1
