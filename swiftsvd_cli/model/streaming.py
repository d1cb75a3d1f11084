"""Streamed models: the meta skeleton plus its checkpoint, from which each step reads only what it needs.

`open_model` builds the model's skeleton on the meta device and reads tensors from the checkpoint only when a
step asks for them (`StreamedModel.loaded`): the embeddings, one decoder layer at a time (the next one read in
the background while this one computes), the head. Tensors are read in the checkpoint's dtype and cast to the
compute dtype one module at a time. Hub ids resolve to the hub cache's snapshot of the repository (safetensors,
config, tokenizer). GGUF files and repositories without safetensors fall back to loading the model whole once and
serving its tensors from memory (transformers has no partial reader for them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import arch_for
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype
from swiftsvd_cli.model.loading import (
    Resolved,
    fingerprint,
    is_factored_spec,
    load_whole,
    resolve,
    skeleton,
    tokenizer_of,
)
from swiftsvd_cli.model.weights import (
    SafetensorsSource,
    StateDictSource,
    WeightSource,
    assign_tensor,
    release,
    safetensors_files,
    tied_names,
    unique_state,
)

logger = logging.getLogger("swiftsvd")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swiftsvd-read")  # reads the next layer ahead


@dataclass
class StreamedModel:
    """A model whose tensors stay in the checkpoint until a step needs them, one module at a time."""

    skeleton: Any  # the CausalLM on the meta device
    weights: WeightSource
    tokenizer: Any
    spec: str
    model_id: str
    revision: str | None
    fingerprint: str
    dtype: torch.dtype  # compute dtype
    location: Path | None  # the directory holding config.json (None for GGUF)
    stored: dict[str, str]  # state name -> the name its tensor is stored under (tied weights)
    _ahead: dict[str, Future[dict[str, torch.Tensor]]] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> Any:
        return self.skeleton.config

    def tensor(self, name: str) -> torch.Tensor:
        """A state tensor as stored (its checkpoint dtype), on the CPU."""
        return self.weights.get(self.stored.get(name, name))

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.weights.dtype(self.stored.get(name, name))

    def state_names(self, prefix: str = "") -> list[str]:
        """Every stored state name under module path `prefix` (tied duplicates once)."""
        start = f"{prefix}." if prefix else ""
        return [name for name, target in self.stored.items() if name == target and name.startswith(start)]

    def _read(self, path: str) -> dict[str, torch.Tensor]:
        """The tensors the module at `path` lacks, read from the checkpoint and cast to the compute dtype (CPU)."""
        module: nn.Module = self.skeleton.get_submodule(path)
        prefix = f"{path}." if path else ""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if tensor.is_meta:
                value = self.tensor(prefix + name)
                # always a copy: safetensors hands out views of one memory map per file, so a step that edits a
                # weight in place (the α search's reconstructions, --merge) would change what the next read sees
                out[name] = value.to(self.dtype, copy=True) if value.is_floating_point() else value.clone()
        return out

    def prefetch(self, path: str) -> None:
        """Start reading the module at `path` in the background: the next layer's I/O overlaps this one's compute."""
        self._ahead[path] = _READER.submit(self._read, path)

    def materialize(self, path: str, device: torch.device | str) -> nn.Module:
        """Load the module at `path` from the checkpoint, in the compute dtype, on `device`."""
        ahead = self._ahead.pop(path, None)
        tensors = ahead.result() if ahead is not None else self._read(path)
        module: nn.Module = self.skeleton.get_submodule(path)
        for name, value in tensors.items():
            assign_tensor(module, name, value.to(device))
        return module

    @contextmanager
    def loaded(self, path: str, device: torch.device | str) -> Iterator[nn.Module]:
        """The module at `path` with real weights for the duration of the block, then meta placeholders again."""
        module = self.materialize(path, device)
        try:
            yield module
        finally:
            release(module)


def open_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> StreamedModel:
    """The model as a meta skeleton plus its checkpoint, nothing loaded yet (see the module docstring)."""
    if is_factored_spec(spec):
        raise SwiftSVDError(f"'{spec}' is already swiftsvd-compressed: calibrate and compress the original model")
    resolved = resolve(spec, revision, trust_remote_code)
    arch_for(resolved.config)  # an unsupported family is refused before anything is read
    torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(resolved.config))
    model = skeleton(resolved.config, torch_dtype)
    stored = tied_names(model)
    names = [name for name, target in stored.items() if name == target]
    directory = None if "gguf_file" in resolved.extra else _weights_directory(resolved, revision)
    weights: WeightSource | None = None
    if directory is not None and (files := safetensors_files(directory)):
        weights = SafetensorsSource(files)
        present = {name: weights.shape(name) for name in weights.keys()}
        state = model.state_dict(keep_vars=True)
        wrong = [name for name in names if present.get(name) != tuple(state[name].shape)]
        if wrong:
            logger.warning("%s: checkpoint tensors differ from the model's (%s): loading it whole", spec, wrong[0])
            weights = None
    if weights is None:  # GGUF, no safetensors, or other names: the whole model once, served from memory
        whole = load_whole(resolved, revision, torch_dtype, trust_remote_code)
        stored = tied_names(whole)
        weights = StateDictSource(dict(unique_state(whole)))
        names = weights.keys()
    try:
        tokenizer = tokenizer_of(resolved, revision, trust_remote_code)
    except (OSError, ValueError) as error:
        raise SwiftSVDError(f"cannot load the tokenizer of '{spec}': {str(error).splitlines()[0]}") from error
    return StreamedModel(
        skeleton=model,
        weights=weights,
        tokenizer=tokenizer,
        spec=spec,
        model_id=resolved.model_id,
        revision=revision,
        fingerprint=fingerprint(resolved.config, weights, names),
        dtype=torch_dtype,
        location=directory,
        stored=stored,
    )


def _weights_directory(resolved: Resolved, revision: str | None) -> Path | None:
    """The local directory of a model's files: the folder itself, or the hub cache's snapshot of the repository."""
    if resolved.is_local:
        return Path(resolved.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved.location, revision=revision, allow_patterns=HUB_FILES))
    except Exception as error:  # the hub raises many types for "offline" / "not found"
        raise SwiftSVDError(
            f"cannot download the weights of '{resolved.spec}' from the Hugging Face hub ({type(error).__name__}): "
            "download it elsewhere and pass the local directory instead"
        ) from error
