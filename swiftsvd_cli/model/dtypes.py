"""Which torch dtype a model computes in: the `--dtype` names and what `auto` means on each device."""

from __future__ import annotations

from typing import Any

import torch

from swiftsvd_cli.config import DType, choice

DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """`auto` keeps the checkpoint's dtype on an accelerator and uses float32 on CPU (bf16 matmuls are slow there)."""
    name = choice(DType, dtype)
    if name != DType.AUTO:
        return DTYPES[name]
    if device.startswith("cpu") or checkpoint_dtype is None:
        return torch.float32
    return checkpoint_dtype


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config says its weights are stored in (transformers keeps either a str or a torch.dtype)."""
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        return next((dtype for name, dtype in DTYPES.items() if name.value == value), None)
    return value if isinstance(value, torch.dtype) else None
