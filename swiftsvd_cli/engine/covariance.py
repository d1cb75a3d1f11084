"""One decoder layer's calibration statistics: what is stored per input group, how it is summed, packed and read back.

Per input group (q/k/v share one, gate/up share one, o and down their own) a covariance shard holds either the
input Gram `G = Σ x xᵀ` or, for a single-consumer input whose outputs are narrower (down_proj: 4096 of 11008),
each consumer's output Gram `C = W G Wᵀ = Σ y yᵀ`, a seventh of the bytes and all Swift-SVD needs
(`--keep-input-grams` keeps every G, for SVD-LLM). Both are float64, stored as packed upper triangles. Beside
them: Σ|x| per input channel (ASVD's scaling) and the token count. `LayerStats` holds plain sums, so processes
that calibrate disjoint windows can add theirs (an all-reduce) before `pack` writes the shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from swiftsvd_cli.core.grams import (
    GramPrecision,
    accumulate_gram,
    accumulate_output_gram,
    all_finite,
    make_empty_gram,
    output_gram_is_smaller,
    pack_upper,
    unpack_upper,
)
from swiftsvd_cli.model.architectures import ArchSpec, target_linears

GramForm = Literal["input", "output"]
FAST_FLOAT64_GPUS = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
"""CUDA capabilities with full-rate float64 (P100, V100, A100, H100/H200, B200); others run it at 1/32-1/64."""


def gram_forms(shapes: Mapping[str, tuple[int, int]], spec: ArchSpec, keep_input_grams: bool) -> dict[str, GramForm]:
    """Per input group: keep its input Gram, or its consumers' output Grams where those are smaller."""
    forms: dict[str, GramForm] = {}
    for group, names in spec.groups.items():
        smaller = output_gram_is_smaller(shapes[names[0]][1], tuple(shapes[name][0] for name in names))
        forms[group] = "output" if smaller and not keep_input_grams else "input"
    return forms


def auto_gram_precision(device: str) -> GramPrecision:
    """float64 products on data-centre GPUs (full-rate float64); float32 products on short chunks elsewhere.

    On CPUs float64 runs at half the float32 rate and would cost more than the forward pass itself; on consumer
    GPUs at 1/32-1/64. The float32 route's bound is in `swiftsvd_cli.core.grams`.
    """
    fast = device.startswith("cuda") and torch.cuda.is_available()
    if fast and torch.cuda.get_device_capability(device) in FAST_FLOAT64_GPUS:
        return "float64"
    return "float32"


class LayerStats:
    """Hooks on one decoder layer's target linears that add every batch's statistics to float64 sums.

    A batch's inputs (and, on the float32 route, its narrow outputs) are held until its forward pass ends, then
    added by `commit` only if every one is finite (`finite`): a batch that overflows anywhere in the layer leaves
    no trace in any group's statistics (`discard`).
    """

    def __init__(
        self, layer: nn.Module, spec: ArchSpec, forms: Mapping[str, GramForm], precision: GramPrecision, device: str
    ) -> None:
        self.linears = target_linears(layer, spec)
        self.groups, self.forms, self.precision = dict(spec.groups), dict(forms), precision
        self.sums: dict[str, torch.Tensor] = {"tokens": torch.zeros((), dtype=torch.int64, device=device)}
        self.pending: dict[str, torch.Tensor] = {}  # this batch: group -> input, module -> output (float32 route)
        self._abs_sums: dict[str, torch.Tensor] = {}  # this batch's Σ|x| per group, from `finite`
        self._weights: dict[str, torch.Tensor] = {}  # output-Gram weights in the product's precision, once per layer
        self.handles = []
        for group, names in spec.groups.items():
            n = self.linears[names[0]].in_features
            self.sums[f"{group}.abs_sum"] = torch.zeros(n, dtype=torch.float64, device=device)
            if forms[group] == "input":
                self.sums[f"{group}.gram"] = make_empty_gram(n, device)
            else:
                for name in names:
                    self.sums[f"{name}.output_gram"] = make_empty_gram(self.linears[name].out_features, device)
                    self.handles.append(self.linears[name].register_forward_hook(self._output_hook(name)))
            self.handles.append(self.linears[names[0]].register_forward_pre_hook(self._input_hook(group)))

    def _input_hook(self, group: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.pending[group] = args[0].detach()

        return hook

    def _output_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.precision == "float32" and output.dtype == torch.float32:
                bias = self.linears[name].bias
                self.pending[name] = output.detach() if bias is None else output.detach() - bias.detach()

        return hook

    def finite(self) -> bool:
        """Whether the held batch is free of NaN and Inf; computes its Σ|x| per group on the way, for `commit`.

        A float64 sum of float32/bfloat16 magnitudes cannot overflow, so Σ|x| is finite exactly when every input
        is: checking the inputs costs nothing beyond their statistic. Held outputs are checked on their own.
        """
        for group in self.groups:
            x = self.pending[group]
            self._abs_sums[group] = x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)
        inputs_finite = all(bool(torch.isfinite(total).all()) for total in self._abs_sums.values())
        return inputs_finite and all(all_finite(x) for key, x in self.pending.items() if key not in self.groups)

    def discard(self) -> None:
        self.pending.clear()
        self._abs_sums.clear()

    def commit(self) -> None:
        """Add the held batch, found `finite`, to the sums."""
        for position, (group, names) in enumerate(self.groups.items()):
            flat = self.pending[group].reshape(-1, self.pending[group].shape[-1])
            self.sums[f"{group}.abs_sum"] += self._abs_sums.pop(group)
            if position == 0:
                self.sums["tokens"] += flat.shape[0]
            if self.forms[group] == "input":
                accumulate_gram(self.sums[f"{group}.gram"], flat, self.precision)
                continue
            for name in names:
                C = self.sums[f"{name}.output_gram"]
                if name in self.pending:
                    accumulate_gram(C, self.pending[name], "float32")  # the forward's own float32 product W x
                    continue
                if name not in self._weights:
                    dtype = torch.float64 if self.precision == "float64" else torch.float32
                    self._weights[name] = self.linears[name].weight.detach().to(device=C.device, dtype=dtype)
                accumulate_output_gram(C, flat, self._weights[name], self.precision)
        self.pending.clear()

    def remove(self) -> dict[str, torch.Tensor]:
        """Detach the hooks; the sums (Grams with their upper triangles filled, Σ|x|, tokens)."""
        for handle in self.handles:
            handle.remove()
        return self.sums


def pack(sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard tensors of a layer's sums: Grams as packed upper triangles, on the CPU."""
    return {name: (pack_upper(value) if name.endswith("gram") else value).cpu() for name, value in sums.items()}


def input_gram(tensors: Mapping[str, torch.Tensor], group: str) -> torch.Tensor:
    """The full symmetric input Gram of `group` from a covariance shard that keeps it."""
    return unpack_upper(tensors[f"{group}.gram"])


def output_gram(tensors: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
    return unpack_upper(tensors[f"{module}.output_gram"])
