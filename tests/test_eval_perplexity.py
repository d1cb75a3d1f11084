"""Perplexity against an independent window-by-window computation, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swiftsvd_cli.data.text import tokenize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.perplexity import perplexity
from tests.conftest import TINY_TEXT, build_tiny_model


@pytest.fixture(scope="module")
def model_and_ids(tiny_tokenizer):  # noqa: ANN001, ANN201
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    # A ragged length (not a multiple of the window sizes below) so the dropped tail is exercised.
    return model, tokenize(tiny_tokenizer, TINY_TEXT)[: 6 * 64 + 17]


def reference_ppl(model: nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """The straightforward loop: one window at a time, summed cross-entropy, exp of the mean."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = model(window).logits[0]
            total += F.cross_entropy(logits[:-1].double(), window[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return math.exp(total / count)


def test_tokenize_matches_the_fields_call(tiny_tokenizer) -> None:  # noqa: ANN001
    ids = tokenize(tiny_tokenizer, TINY_TEXT)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tiny_tokenizer(TINY_TEXT, return_tensors="pt").input_ids[0].tolist()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_independent_loop(model_and_ids, batch_size: int) -> None:  # noqa: ANN001
    model, ids = model_and_ids
    seqlen = 64
    result = perplexity(model, ids, seqlen=seqlen, batch_size=batch_size)
    windows = ids.numel() // seqlen  # ragged tail dropped
    assert result.windows == result.windows_total == windows == 6
    assert result.predicted_tokens == windows * (seqlen - 1)
    assert result.ppl == pytest.approx(reference_ppl(model, ids, seqlen, windows), rel=1e-6)
    assert math.log(result.ppl) == pytest.approx(result.nll, rel=1e-12)


def test_limit_uses_the_first_windows(model_and_ids) -> None:  # noqa: ANN001
    model, ids = model_and_ids
    result = perplexity(model, ids, seqlen=32, limit=3, batch_size=2)
    assert result.windows == 3 and result.windows_total == ids.numel() // 32
    assert result.ppl == pytest.approx(reference_ppl(model, ids, 32, 3), rel=1e-6)


class NaNLogits(nn.Module):
    """Wraps a model and poisons the logits of one window (by global window index)."""

    def __init__(self, inner: nn.Module, bad_window: int, batch_size: int) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.bad_window, self.batch_size, self.calls = bad_window, batch_size, 0

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        out = self.inner(**kwargs)
        first = self.calls * self.batch_size
        if first <= self.bad_window < first + kwargs["input_ids"].size(0):
            out.logits[self.bad_window - first, 5] = float("nan")
        self.calls += 1
        return out


@pytest.mark.parametrize("batch_size", [1, 2])
def test_non_finite_loss_names_the_window(model_and_ids, batch_size: int) -> None:  # noqa: ANN001
    model, ids = model_and_ids
    with pytest.raises(SwiftSVDError, match=r"window 3 \(tokens 96\.\.127\)"):
        perplexity(NaNLogits(model, bad_window=3, batch_size=batch_size), ids, seqlen=32, batch_size=batch_size)


def test_seqlen_beyond_the_context_is_refused(model_and_ids) -> None:  # noqa: ANN001
    model, ids = model_and_ids
    assert model.config.max_position_embeddings == 256
    with pytest.raises(SwiftSVDError, match="max_position_embeddings"):
        perplexity(model, ids, seqlen=257)
    perplexity(model, ids, seqlen=256, limit=1)  # the limit itself is fine


def test_text_shorter_than_a_window_is_refused(model_and_ids) -> None:  # noqa: ANN001
    model, ids = model_and_ids
    with pytest.raises(SwiftSVDError, match="fewer than one window"):
        perplexity(model, ids[:20], seqlen=32)
