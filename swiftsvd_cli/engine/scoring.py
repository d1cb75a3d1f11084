"""Validation perplexity of several rank plans at once, one decoder layer at a time (the α search of Algorithm 2).

Every candidate's hidden states go through the same decoder layer before the next is read: a layer is loaded
from the checkpoint once, factored once at the largest rank any candidate gives a module (every method's factors
are nested: rank k is the first k columns of A and rows of B), and each candidate's dense reconstruction
W' = A_k B_k is swapped in while its batches run. Memory: one layer, each candidate's hidden states (candidates x
windows x seqlen x hidden, on the CPU) and one window's logits; never the whole model.
"""

from __future__ import annotations

import torch

from swiftsvd_cli.config import BATCH_SIZE
from swiftsvd_cli.core.allocation import is_dense
from swiftsvd_cli.engine.factors import FactorSource, RankMap
from swiftsvd_cli.log import progress
from swiftsvd_cli.metrics.perplexity import PerplexityResult, check_seqlen, perplexity_result, split_windows, window_nll
from swiftsvd_cli.model.architectures import ArchSpec, decoder_layers, target_linears
from swiftsvd_cli.model.layerwise import HiddenStates, capture_first_layer_inputs, layer_output, to_device
from swiftsvd_cli.model.streaming import StreamedModel


@torch.no_grad()
def candidate_perplexities(
    streamed: StreamedModel,
    spec: ArchSpec,
    ids: torch.Tensor,
    *,
    seqlen: int,
    limit: int | None = None,
    plans: list[RankMap],
    factors: FactorSource,
    device: str,
    batch_size: int = BATCH_SIZE,
) -> list[PerplexityResult]:
    """The perplexity of the model reconstructed by each plan, on the first `limit` (default: all) windows of `ids`."""
    check_seqlen(streamed.skeleton, seqlen)
    windows, windows_total = split_windows(ids, seqlen, limit)
    layers = decoder_layers(streamed.skeleton, spec)
    width = streamed.config.hidden_size
    first = HiddenStates.for_windows(windows, batch_size, width, streamed.dtype)
    with streamed.loaded(spec.embeddings, "cpu"):
        inputs = capture_first_layer_inputs(streamed.skeleton, layers, windows, first, "cpu")
    states = [HiddenStates(first.shapes, streamed.dtype) for _ in plans]
    with progress() as bar:
        task = bar.add_task(f"scoring {len(plans)} plans", total=len(layers))
        for index in range(len(layers)):
            with streamed.loaded(f"{spec.layers}.{index}", device) as layer:
                if index + 1 < len(layers):
                    streamed.prefetch(f"{spec.layers}.{index + 1}")
                shared = first if index == 0 else None
                _run_candidates(layer, index, plans, factors, inputs.kwargs, shared, states, device, spec)
            bar.advance(task)
    first.close()
    results: list[PerplexityResult] = []
    with streamed.loaded(spec.final_norm, device) as norm, streamed.loaded(spec.head, device) as head:
        for hidden in states:
            nll_sum, start = 0.0, 0
            for batch in range(len(hidden)):
                for h in hidden[batch]:  # one window's logits at a time: vocab x seqlen floats
                    logits = head(norm(h.unsqueeze(0).to(device)))
                    nll_sum += sum(window_nll(logits, windows[start : start + 1], start))
                    start += 1
            results.append(perplexity_result(nll_sum, windows.shape[0], windows_total, int(ids.numel()), seqlen))
            hidden.close()
    return results


def _run_candidates(
    layer: torch.nn.Module,
    index: int,
    plans: list[RankMap],
    factors: FactorSource,
    kwargs: list[dict[str, object]],
    shared_input: HiddenStates | None,
    states: list[HiddenStates],
    device: str,
    spec: ArchSpec,
) -> None:
    """Each candidate's batches through one decoder layer, with that candidate's reconstructed weights swapped in."""
    linears = target_linears(layer, spec)
    factored = {
        (c, name): plan[(index, name)]
        for c, plan in enumerate(plans)
        for name, linear in linears.items()
        if (index, name) in plan and not is_dense(linear.out_features, linear.in_features, plan[(index, name)])
    }
    largest: dict[str, int] = {}
    for (_, name), k in factored.items():
        largest[name] = max(largest.get(name, 0), k)
    full = factors(index, {name: linears[name].weight for name in largest}, largest)
    originals = {name: linears[name].weight.detach().clone() for name in largest}
    for c, hidden in enumerate(states):
        for name, original in originals.items():
            weight = linears[name].weight
            if (c, name) in factored:
                k = factored[(c, name)]
                A, B = full[name]
                weight.copy_((A[:, :k] @ B[:k]).to(weight))
            else:
                weight.copy_(original)
        source = shared_input if shared_input is not None else hidden
        for batch, batch_kwargs in enumerate(kwargs):
            hidden[batch] = layer_output(layer, source[batch].to(device), to_device(batch_kwargs, device))
