"""Layer-by-layer execution: capture what the first decoder layer receives, then push it through layers one at a time.

Only one decoder layer needs to sit on the accelerator; the hidden states of all samples wait on the CPU between
layers (`HiddenStates`), in RAM or, when RAM is short, in a memory-mapped file (`--offload-hidden disk`), so
models larger than one device's memory still calibrate on one device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first layer's inputs are known."""


class HiddenStates:
    """One (batch, seq, hidden) tensor per batch, read and overwritten layer after layer.

    With `path`, all batches live in one memory-mapped file there (deleted by `close`): the OS pages them in and
    out, so host RAM need not hold every calibration token's hidden state (7B, 256 x 2048: 4.3 GB in bfloat16).
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, path: Path | None = None) -> None:
        self.shapes, self.dtype, self.path = list(shapes), dtype, path
        self._tensors: list[torch.Tensor | None] = [None] * len(shapes)
        if path is not None:
            total = sum(torch.Size(shape).numel() for shape in shapes)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                handle.truncate(total * torch.empty(0, dtype=dtype).element_size())
            flat = torch.from_file(str(path), shared=True, size=total, dtype=dtype)
            offset = 0
            for index, shape in enumerate(shapes):
                numel = torch.Size(shape).numel()
                self._tensors[index] = flat[offset : offset + numel].view(shape)
                offset += numel

    @classmethod
    def for_windows(
        cls, windows: torch.Tensor, batch_size: int, width: int, dtype: torch.dtype, path: Path | None = None
    ) -> HiddenStates:
        """Room for the hidden states of `windows` (samples, seq) split into batches of `batch_size`."""
        shapes = [(len(batch), windows.shape[1], width) for batch in torch.split(windows, batch_size)]
        return cls(shapes, dtype, path)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        tensor = self._tensors[index]
        if tensor is None:
            raise IndexError(f"hidden states of batch {index} were never written")
        return tensor

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        if self.path is None:
            self._tensors[index] = value.detach().to("cpu", self.dtype)
        else:
            self[index].copy_(value.detach())

    def close(self) -> None:
        self._tensors = [None] * len(self.shapes)
        if self.path is not None and self.path.exists():
            os.unlink(self.path)


@dataclass
class LayerInputs:
    """Per batch: the hidden states entering a layer and the keyword arguments every layer gets."""

    hidden: HiddenStates
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
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, hidden: HiddenStates, device: torch.device | str
) -> LayerInputs:
    """Run the model up to layer 0 (its embeddings must be loaded, on `device`) and record what layer 0 receives.

    `hidden` has one slot per batch of `windows` (see `HiddenStates.for_windows`).
    """
    captured = LayerInputs(hidden=hidden, kwargs=[])

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden[len(captured.kwargs)] = states
        captured.kwargs.append({key: value for key, value in kwargs.items() if key != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        start = 0
        for shape in hidden.shapes:
            try:
                model(input_ids=windows[start : start + shape[0]].to(device), use_cache=False)
            except _Captured:
                pass
            start += shape[0]
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
    for index, kwargs in enumerate(inputs.kwargs):
        yield index, inputs.hidden[index].to(device), to_device(kwargs, device)
