"""Which torch dtype a model computes in: the `--dtype` names and what `auto` means on each device."""

from __future__ import annotations

from typing import Any

import torch

from swiftsvd_cli.errors import SwiftSVDError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """`auto` keeps the checkpoint's dtype on an accelerator and uses float32 on CPU (bf16 matmuls are slow there)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise SwiftSVDError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.startswith("cpu") or checkpoint_dtype is None:
        return torch.float32
    return checkpoint_dtype


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype a config says its weights are stored in (transformers keeps either a str or a torch.dtype)."""
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        return DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None
