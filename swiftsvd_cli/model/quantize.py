"""Quantising target linears for a compressed checkpoint, with torchao's round-to-nearest int8 weight-only scheme.

torchao (`Int8WeightOnlyConfig`, the `Int8Tensor` it makes) computes the codes: symmetric, one scale per
output row, codes in [-128, 127]. We keep its codes and scales as plain tensors (`Int8Linear`) instead of
torchao's tensor subclass: its safetensors support is a prototype that needs torchao to load, while plain
int8 + float32 tensors load with torch alone (also through the plain-transformers path). Only compression
imports torchao; loading never does.
"""

from __future__ import annotations

import torch
from torch import nn

from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.hf.lowrank import LowRankLinear
from swiftsvd_cli.model.hf.qlinear import Int8Linear, int8_lowrank


def import_torchao() -> None:
    """Import torchao, or say how to install it (`setup_logging` quiets its CPU-build warnings)."""
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        raise SwiftSVDError("int8 factors need torchao: pip install 'swiftsvd-cli[quant]'") from error


def int8_codes(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's int8 weight-only quantisation of W (out, in): codes (out, in) int8 and scales (out,) float32."""
    import_torchao()
    from torchao.quantization import Int8Tensor, PerRow

    quantized = Int8Tensor.from_hp(W.detach().to(torch.float32), PerRow())
    return quantized.qdata, quantized.scale.reshape(-1)


def int8_linear(W: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8Linear:
    return Int8Linear.from_codes(*int8_codes(W), bias, dtype)


def quantize_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The int8 version of a target linear: a dense `nn.Linear`, or both factors of a `LowRankLinear`."""
    if isinstance(module, LowRankLinear):
        quantized = int8_lowrank(
            module.in_features, module.out_features, module.rank, module.A.bias is not None, device="meta"
        )
        quantized.B = int8_linear(module.B.weight, None, dtype)  # type: ignore[assignment]
        quantized.A = int8_linear(module.A.weight, module.A.bias, dtype)  # type: ignore[assignment]
        return quantized
    if isinstance(module, nn.Linear):
        return int8_linear(module.weight, module.bias, dtype)
    raise TypeError(f"cannot quantise a {type(module).__name__}")
