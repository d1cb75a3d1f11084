"""Layer-by-layer execution: capture what the first decoder layer receives, then push it through layers one at a time.

Only one decoder layer needs to sit on the accelerator; the hidden states of all samples stay on the CPU
between layers, so models larger than one device's memory still calibrate on one device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first layer's inputs are known."""


@dataclass
class LayerInputs:
    """Per batch: the hidden states entering a layer (CPU) and the keyword arguments every layer gets."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts (position embeddings, masks) to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> LayerInputs:
    """Run the embeddings (on the CPU, where the model was loaded) and record what layer 0 receives."""
    captured = LayerInputs(hidden=[], kwargs=[])

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach().cpu())
        captured.kwargs.append({key: value for key, value in kwargs.items() if key != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in torch.split(windows, batch_size):
            try:
                model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's output hidden states (some families return a tuple)."""
    out = layer(hidden, **kwargs)
    hidden_out: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return hidden_out


def iterate_batches(
    inputs: LayerInputs, device: torch.device | str
) -> Iterator[tuple[int, torch.Tensor, dict[str, Any]]]:
    for index, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs, strict=True)):
        yield index, hidden.to(device), to_device(kwargs, device)
