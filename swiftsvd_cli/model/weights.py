"""Where a model's tensors come from: safetensors shards read one tensor at a time, or an in-memory state dict.

Stages that walk a model layer by layer (calibrate, allocate, compress) ask a `WeightSource` for one tensor at a
time, in the dtype it is stored in, so host RAM holds one layer, never the model (7B in float32 is 27 GB, 70B in
bfloat16 140 GB). Safetensors files are memory-mapped one read at a time (`SafetensorsSource`).
The in-memory `StateDictSource` is the fallback for checkpoints without safetensors (GGUF files, `.bin`-only
repositories): they are loaded whole once, as transformers loads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from swiftsvd_cli.artifacts.store import SAFETENSORS_DTYPES
from swiftsvd_cli.errors import SwiftSVDError

INDEX = "model.safetensors.index.json"


class WeightSource(Protocol):
    """Read-only access to a checkpoint's tensors by name, each in its stored dtype, on the CPU."""

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory: those its index names, else every `*.safetensors` (none: [])."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SwiftSVDError(f"{index} is not a safetensors index ({error})") from error
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


@dataclass(frozen=True)
class _Stored:
    """Where a checkpoint tensor lives and what it is, from the file headers."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class SafetensorsSource:
    """Tensors of one or more safetensors files, read on demand.

    Each read opens its file, and the memory map safetensors reads through lives only as long as the tensor it
    returns. A handle kept open for the whole run would keep every page it ever served mapped into this process:
    the layers already done, and the rows the fingerprint samples, would count in its RSS (+0.4 GB per Llama-2-7B
    layer in bfloat16), so a layer-by-layer stage would look to grow with depth. Opening costs well under a
    millisecond; names, shapes and dtypes are read once here.
    """

    def __init__(self, files: list[Path]) -> None:
        self._stored: dict[str, _Stored] = {}
        for file in files:
            with self._open(file) as handle:
                for name in handle.keys():
                    meta = handle.get_slice(name)
                    self._stored[name] = _Stored(file, tuple(meta.get_shape()), SAFETENSORS_DTYPES[meta.get_dtype()])

    @staticmethod
    def _open(file: Path) -> Any:
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as error:
            raise SwiftSVDError(f"cannot read weights {file}: {error}") from error

    def _entry(self, name: str) -> _Stored:
        if name not in self._stored:
            raise SwiftSVDError(f"checkpoint has no tensor '{name}'")
        return self._stored[name]

    def keys(self) -> list[str]:
        return list(self._stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        with self._open(self._entry(name).file) as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return tensor

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._open(self._entry(name).file) as handle:
            tensor: torch.Tensor = handle.get_slice(name)[start:stop]
        return tensor


class StateDictSource:
    """The fallback: tensors of a model loaded whole (GGUF, `.bin` checkpoints)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = {name: tensor.detach() for name, tensor in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise SwiftSVDError(f"checkpoint has no tensor '{name}'")
        return self._tensors[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop]


def unique_state(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer, each shared (tied) tensor once, by its first name."""
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """Every state name -> the name its tensor is stored under (itself, or the first name of a tied tensor)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(tensor), name)
    return out


def assign_tensor(root: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` at state name `name` (a parameter or buffer) without copying: replaces a meta placeholder."""
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise SwiftSVDError(f"the model has no parameter or buffer '{name}'")


def release(module: torch.nn.Module) -> None:
    """Drop a module's parameters back to meta placeholders (buffers stay: they are not in checkpoints)."""
    for sub in module.modules():
        for leaf, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                sub._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
