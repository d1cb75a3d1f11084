"""`Int8Linear`: a linear layer stored as int8 codes with one float32 scale per output row (W ≈ q · s).

Shipped next to the weights of int8 checkpoints (see swiftsvd_cli/model/hf/__init__.py): imports only torch
and its sibling `lowrank`. The codes are plain tensors:
`qweight` (out, in) int8 and `scale` (out,) float32 go into safetensors as they are, never pickled, and
loading them needs no quantisation library. Which library computed them is the compressor's business
(`swiftsvd_cli.model.quantize` uses torchao's int8 weight-only quantisation, bit for bit).

Forward: on CPU with 16-bit activations and an input width that is a multiple of 64, torch's int8
weight-only kernel (`aten._weight_int8pack_mm`, which reads the int8 codes directly; measured with torch
2.13 on an AVX-512 CPU, it crashes or returns garbage when the width is not a multiple of 16, e.g. a
factor's rank); otherwise the codes are cast to the activation dtype for one matmul and the output
rescaled, as torchao's own int8 weight-only linear does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lowrank import LowRankLinear, replace_module

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_WIDTH = 64  # input widths the CPU kernel gets: a margin over the 16 it needs on AVX-512
_KERNEL_ALIGN = 64  # byte alignment of the codes it gets: codes memory-mapped from a safetensors file at an
# offset off 16 bytes make it segfault (measured with torch 2.13: offsets 1 and 8 crash, 0/16/32 do not)


class Int8Linear(nn.Module):
    """y = (x qᵀ) · s + b with int8 codes q (out, in) and float32 scales s (out,)."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_codes(
        cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> Int8Linear:
        """Wrap codes (out, in) int8 and scales (out,) computed elsewhere; the bias is kept in `dtype`."""
        if qweight.dtype != torch.int8 or scale.shape != qweight.shape[:1]:
            raise ValueError(f"need int8 codes (out, in) and (out,) scales, got {qweight.dtype} {tuple(scale.shape)}")
        module = cls(qweight.shape[1], qweight.shape[0], bias is not None, device=qweight.device, dtype=dtype)
        module.qweight = qweight.contiguous()
        module.scale = scale.to(torch.float32).contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(dtype).clone())
        return module

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with."""
        return self.qweight.to(torch.float32) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(x.dtype)
        if (
            x.device.type == "cpu"
            and x.dtype in _KERNEL_DTYPES
            and self.in_features % _KERNEL_WIDTH == 0
            and self.qweight.data_ptr() % _KERNEL_ALIGN == 0
        ):
            flat = x.reshape(-1, self.in_features).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, scale).reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * scale
        out: torch.Tensor = y if self.bias is None else y + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_lowrank(
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LowRankLinear:
    """An empty `LowRankLinear` whose B and A are `Int8Linear`s (same state-dict names, int8 codes)."""
    module = LowRankLinear(in_features, out_features, rank, bias, device="meta", dtype=dtype)
    module.B = Int8Linear(in_features, rank, False, device=device, dtype=dtype)  # type: ignore[assignment]
    module.A = Int8Linear(rank, out_features, bias, device=device, dtype=dtype)  # type: ignore[assignment]
    return module


def int8_modules(model: nn.Module, ranks: dict[str, int], dense: list[str]) -> None:
    """Swap in empty int8 modules by a checkpoint's maps: each linear of `ranks` (full name -> rank) becomes an
    int8 `LowRankLinear`, each of `dense` an `Int8Linear`, on the replaced weight's device and dtype (the meta
    device inside `from_pretrained`; the dtype is the biases'), so that loading the state dict fills them."""
    for name in (*ranks, *dense):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear to quantise")
        shape, bias = (linear.in_features, linear.out_features), linear.bias is not None
        device, dtype = linear.weight.device, linear.weight.dtype
        if name in ranks:
            replace_module(model, name, int8_lowrank(*shape, ranks[name], bias, device=device, dtype=dtype))
        else:
            replace_module(model, name, Int8Linear(*shape, bias, device=device, dtype=dtype))


def weight_count(module: nn.Module) -> int:
    """Parameters plus quantised codes (integer buffers): the weights a module holds, in any storage."""
    codes = sum(int(b.numel()) for b in module.buffers() if not b.is_floating_point())
    return sum(int(p.numel()) for p in module.parameters()) + codes
