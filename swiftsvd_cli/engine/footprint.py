"""What a run will need, from the model's config alone: disk, host RAM and device memory, and the free-disk check.

Disk is exact up to safetensors headers: it is the byte count of the tensors the stages will write (their shapes
follow from the config and the settings). Memory is an estimate of the peak (one decoder layer and its prefetched
successor, the calibration hidden states, the float64 accumulators, one batch's activations); `scripts/
scale_probe.py` measures it beside the estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from swiftsvd_cli.artifacts.eigen import eigen_tensor_specs
from swiftsvd_cli.artifacts.manifest import covariance_tensors
from swiftsvd_cli.artifacts.store import shard_bytes
from swiftsvd_cli.core.grams import GramPrecision
from swiftsvd_cli.engine.covariance import GramForm
from swiftsvd_cli.log import human_bytes
from swiftsvd_cli.model.architectures import ArchSpec, decoder_layers

RUNTIME_BYTES = 700 * 2**20
"""Python, torch and transformers themselves (measured: ~0.7 GiB resident after import and tokenizer load)."""


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Footprint:
    """Bytes a calibration (and the eigenbases `allocate` adds to the same WORK) will need."""

    layers: int
    covariance_layer_bytes: int
    eigen_layer_bytes: int
    hidden_bytes: int  # calibration hidden states: host RAM, or a temp file in WORK with --offload-hidden disk
    offload: bool
    host_bytes: int
    device_bytes: int  # 0 when the device is the CPU (everything is host RAM)

    @property
    def covariance_bytes(self) -> int:
        return self.layers * self.covariance_layer_bytes

    @property
    def eigen_bytes(self) -> int:
        return self.layers * self.eigen_layer_bytes

    def summary(self) -> str:
        """One line: what the run needs (the first line every calibration logs)."""
        hidden = f"; hidden states {human_bytes(self.hidden_bytes)} on disk while it runs" if self.offload else ""
        device = f", device memory ~{human_bytes(self.device_bytes)}" if self.device_bytes else ""
        return (
            f"needs: disk {human_bytes(self.covariance_bytes)} of Grams ({human_bytes(self.covariance_layer_bytes)} "
            f"per layer) + {human_bytes(self.eigen_bytes)} of eigenbases at allocate{hidden}; "
            f"host RAM ~{human_bytes(self.host_bytes)}{device}"
        )


def calibration_footprint(
    model: nn.Module,
    spec: ArchSpec,
    shapes: Mapping[str, tuple[int, int]],
    forms: Mapping[str, GramForm],
    *,
    samples: int,
    seqlen: int,
    batch_size: int,
    dtype: torch.dtype,
    device: str,
    precision: GramPrecision,
    offload: bool,
) -> Footprint:
    """The footprint of calibrating `model` (a meta skeleton is enough) with these settings."""
    config: Any = model.config
    layer_params = _numel(decoder_layers(model, spec)[0])
    width = int(config.hidden_size)
    element = torch.empty(0, dtype=dtype).element_size()
    tokens = samples * seqlen
    head_dim = int(getattr(config, "head_dim", None) or width // config.num_attention_heads)
    hidden = tokens * width * element
    rope = tokens * head_dim * 2 * element  # cos and sin per batch, kept beside the hidden states
    embeddings = int(config.vocab_size) * width * element
    accumulators = sum(
        n * n * 8 if forms[group] == "input" else sum(shapes[name][0] ** 2 * 8 for name in names)
        for group, names in spec.groups.items()
        for n in [shapes[names[0]][1]]
    )
    output_weights = sum(
        shapes[name][0] * shapes[name][1] * (8 if precision == "float64" else 4)
        for group, names in spec.groups.items()
        if forms[group] == "output"
        for name in names
    )
    batch_tokens = min(batch_size, samples) * seqlen
    widest = max(n for _, n in shapes.values())
    intermediate = max(m for m, _ in shapes.values())
    activations = batch_tokens * (4 * width + 3 * intermediate) * element + batch_tokens * widest * 8
    covariance = shard_bytes(covariance_tensors(shapes, spec.groups, forms))
    on_device = 2 * layer_params * element + accumulators + output_weights + activations
    host = RUNTIME_BYTES + max(embeddings, 0) + rope + (0 if offload else hidden) + covariance
    return Footprint(
        layers=len(decoder_layers(model, spec)),
        covariance_layer_bytes=covariance,
        eigen_layer_bytes=shard_bytes(eigen_tensor_specs(shapes, spec.modules, tokens)),
        hidden_bytes=hidden,
        offload=offload,
        host_bytes=host + (on_device if device == "cpu" else layer_params * element),
        device_bytes=0 if device == "cpu" else on_device + 2 * batch_tokens * width * element,
    )
