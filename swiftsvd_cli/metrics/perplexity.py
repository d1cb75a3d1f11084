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
    import torch.nn.functional as F

    check_seqlen(model, seqlen)
    if batch_size < 1:
        raise SwiftSVDError(f"--batch-size must be at least 1 (got {batch_size}).")
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
    device = next(model.parameters()).device
    batches = ids[: windows * seqlen].view(windows, seqlen)

    nll_sum = 0.0  # python float: float64 accumulation across windows
    with torch.inference_mode():
        for start in range(0, windows, batch_size):
            batch = batches[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (b, seqlen, vocab)
            # Upcast before log-softmax: bf16/fp16 log-probabilities lose digits the comparison needs.
            shift_logits = logits[:, :-1, :].float()
            shift_labels = batch[:, 1:]
            token_nll = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="none"
            ).view(batch.size(0), -1)  # (b, seqlen - 1)
            window_nll = token_nll.double().sum(dim=1).cpu()
            for offset, value in enumerate(window_nll.tolist()):
                if not math.isfinite(value):
                    index = start + offset
                    raise SwiftSVDError(
                        f"Non-finite loss ({value}) in perplexity window {index} (tokens {index * seqlen}.."
                        f"{(index + 1) * seqlen - 1}); the model gives inf/NaN logits; try --dtype float32."
                    )
                nll_sum += value
            if on_windows is not None:
                on_windows(batch.size(0))

    predicted = windows * (seqlen - 1)
    mean_nll = nll_sum / predicted
    return PerplexityResult(
        ppl=_ppl(mean_nll),
        nll=mean_nll,
        predicted_tokens=predicted,
        windows=windows,
        windows_total=windows_total,
        text_tokens=int(ids.numel()),
        seqlen=seqlen,
    )


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < _MAX_EXP else math.inf


def pooled(parts: list[PerplexityResult]) -> PerplexityResult:
    """One perplexity over disjoint window sets of one text (the shares of several processes): NLL sums added.

    A single part is returned as it is, so one process reports exactly what `perplexity` computed.
    """
    if len(parts) == 1:
        return parts[0]
    predicted = sum(part.predicted_tokens for part in parts)
    mean_nll = math.fsum(part.nll * part.predicted_tokens for part in parts) / predicted
    return PerplexityResult(
        ppl=_ppl(mean_nll),
        nll=mean_nll,
        predicted_tokens=predicted,
        windows=sum(part.windows for part in parts),
        windows_total=sum(part.windows_total for part in parts),
        text_tokens=sum(part.text_tokens for part in parts),
        seqlen=parts[0].seqlen,
    )
