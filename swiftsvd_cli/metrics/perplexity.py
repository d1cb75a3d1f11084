"""Token-level perplexity by the protocol of the SVD-LLM / Swift-SVD papers.

The metric, so that numbers line up with the peers' tables:

1. The whole test text is tokenised once by `swiftsvd_cli.data.text.tokenize` (`tokenizer(text)`), as the
   field's scripts do (SVD-LLM `get_test_data`, the Swift-SVD shell pipeline). For Llama-style tokenizers
   this prepends one BOS token to the *whole text*, not one per window; no other special tokens are added.
2. The ids are cut into non-overlapping windows of `seqlen` tokens; the ragged tail is dropped.
3. Each window is an independent forward pass (no carried state), predicting tokens 2..seqlen from their
   prefix: `seqlen - 1` predictions per window.
4. `ppl = exp(sum of NLL / number of predicted tokens)`, the NLL summed in float64.

Unlike the peers' scripts, a window with a non-finite loss is an error naming the window, never skipped:
silently dropping windows is one way published perplexities stop being reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swiftsvd_cli.errors import SwiftSVDError

if TYPE_CHECKING:
    import torch


_MAX_EXP = 709.0  # math.exp overflows above this; such a model's perplexity is reported as inf


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity number and the counts needed to audit it."""

    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    predicted_tokens: int  # windows * (seqlen - 1)
    windows: int  # windows evaluated
    windows_total: int  # windows the text holds (before `limit`)
    text_tokens: int  # tokens of the whole text, after tokenisation
    seqlen: int


def max_positions(model: Any) -> int | None:
    """The model's context length from its config (text sub-config for multimodal models), or None."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def check_seqlen(model: Any, seqlen: int) -> None:
    """Refuse window lengths the model cannot attend over, before any forward pass."""
    if seqlen < 2:
        raise SwiftSVDError(f"--seqlen must be at least 2 (got {seqlen}): a window needs one token to predict.")
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise SwiftSVDError(
            f"--seqlen {seqlen} exceeds the model's max_position_embeddings ({limit}); use --seqlen {limit} or less."
        )


def count_windows(n_tokens: int, seqlen: int) -> int:
    """Number of full non-overlapping windows (the ragged tail is dropped)."""
    return n_tokens // seqlen


def split_windows(input_ids: torch.Tensor, seqlen: int, limit: int | None = None) -> tuple[torch.Tensor, int]:
    """The first `limit` (default: all) non-overlapping windows (windows, seqlen) of the ids, and the text's total."""
    if limit is not None and limit < 1:
        raise SwiftSVDError(f"--limit must be at least 1 (got {limit}).")
    ids = input_ids.reshape(-1)
    windows_total = count_windows(ids.numel(), seqlen)
    if windows_total == 0:
        raise SwiftSVDError(
            f"The text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
            "use a longer text or a smaller --seqlen."
        )
    windows = windows_total if limit is None else min(limit, windows_total)
    return ids[: windows * seqlen].view(windows, seqlen), windows_total


def window_nll(logits: torch.Tensor, batch: torch.Tensor, first_window: int) -> list[float]:
    """Summed NLL (float64) of each window of `batch` (b, seqlen) predicting tokens 2..seqlen from `logits`.

    A non-finite window is an error naming it (`first_window` is the batch's first window index).
    """
    import torch.nn.functional as F

    seqlen = batch.shape[1]
    # Upcast before log-softmax: bf16/fp16 log-probabilities lose digits the comparison needs.
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch[:, 1:].to(shift_logits.device)
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="none"
    ).view(batch.size(0), -1)  # (b, seqlen - 1)
    values: list[float] = token_nll.double().sum(dim=1).cpu().tolist()
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            index = first_window + offset
            raise SwiftSVDError(
                f"Non-finite loss ({value}) in perplexity window {index} (tokens {index * seqlen}.."
                f"{(index + 1) * seqlen - 1}); the model gives inf/NaN logits; try --dtype float32."
            )
    return values


def perplexity_result(
    nll_sum: float, windows: int, windows_total: int, text_tokens: int, seqlen: int
) -> PerplexityResult:
    """exp(mean NLL per predicted token) and the counts that audit it."""
    predicted = windows * (seqlen - 1)
    mean_nll = nll_sum / predicted
    return PerplexityResult(
        ppl=math.exp(mean_nll) if mean_nll < _MAX_EXP else math.inf,
        nll=mean_nll,
        predicted_tokens=predicted,
        windows=windows,
        windows_total=windows_total,
        text_tokens=text_tokens,
        seqlen=seqlen,
    )


def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    *,
    seqlen: int,
    limit: int | None = None,
    batch_size: int = 1,
    on_windows: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` over `input_ids` (1-D, or (1, N)) in non-overlapping windows of `seqlen`.

    `limit` evaluates only the first `limit` windows (quick runs); `batch_size` windows go through the model
    at once. `on_windows(k)` is called after each batch with the number of windows just finished.
    """
    import torch

    check_seqlen(model, seqlen)
    if batch_size < 1:
        raise SwiftSVDError(f"--batch-size must be at least 1 (got {batch_size}).")
    batches, windows_total = split_windows(input_ids, seqlen, limit)
    device = next(model.parameters()).device
    nll_sum = 0.0  # python float: float64 accumulation across windows
    with torch.inference_mode():
        for start in range(0, batches.shape[0], batch_size):
            batch = batches[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (b, seqlen, vocab)
            nll_sum += sum(window_nll(logits, batch, start))
            if on_windows is not None:
                on_windows(batch.size(0))
    return perplexity_result(nll_sum, batches.shape[0], windows_total, int(input_ids.numel()), seqlen)


def pooled(parts: list[PerplexityResult]) -> PerplexityResult:
    """One perplexity over disjoint window sets of one text (the shares of several processes): NLL sums added.

    A single part is returned as it is, so one process reports exactly what `perplexity` computed.
    """
    if len(parts) == 1:
        return parts[0]
    return perplexity_result(
        math.fsum(part.nll * part.predicted_tokens for part in parts),
        sum(part.windows for part in parts),
        sum(part.windows_total for part in parts),
        sum(part.text_tokens for part in parts),
        parts[0].seqlen,
    )
