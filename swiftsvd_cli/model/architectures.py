"""Architecture adapters as data: where the decoder layers live and which linears share an input.

Every supported family is one `ArchSpec` row in `ARCHITECTURES`, keyed by `config.model_type`.
To add a family: check that its decoder layers sit at one attribute path and that each layer has
the seven projections below (or list its own), then add a row (or an alias to an existing row) and
run `pytest tests/test_architectures.py`, which checks every target resolves to an `nn.Linear`.
Modules that read the same tensor form one *input group*: they share one Gram `G = Σ x xᵀ`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from swiftsvd_cli.errors import SwiftSVDError


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder layers are and the target linears of one layer, grouped by shared input.

    `embeddings`, `final_norm` and `head` are what a layer-by-layer pass needs around the layers: what runs
    before layer 0 and, for perplexity, logits = head(final_norm(h)) after the last one.
    """

    layers: str
    groups: Mapping[str, tuple[str, ...]]
    kv: tuple[str, str]  # the key and value projections: their latents are what `--kv-cache latent` stores
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"

    @property
    def modules(self) -> tuple[str, ...]:
        """All target linears of one layer, in group order."""
        return tuple(name for names in self.groups.values() for name in names)

    def group_of(self, module: str) -> str:
        return next(group for group, names in self.groups.items() if module in names)


LLAMA = ArchSpec(
    layers="model.layers",
    groups={
        "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn_out": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": ("mlp.down_proj",),
    },
    kv=("self_attn.k_proj", "self_attn.v_proj"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
}


def arch_for(config: Any) -> ArchSpec:
    """The adapter for a transformers config; an unknown family is a user-facing error."""
    return arch_for_type(getattr(config, "model_type", None))


FACTORED_PREFIX = "swiftsvd_"
"""A factored checkpoint's model_type is its family's with this prefix ("swiftsvd_llama"; see model/hf)."""


def family_of(model_type: str | None) -> str | None:
    """The architecture family of a `config.model_type`, factored checkpoints included ("swiftsvd_llama" -> "llama")."""
    return model_type.removeprefix(FACTORED_PREFIX) if model_type else model_type


def arch_for_type(model_type: str | None) -> ArchSpec:
    """The adapter for a `config.model_type` (as a calibration manifest records it)."""
    model_type = family_of(model_type)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise SwiftSVDError(
            f"unsupported architecture '{model_type}': supported are {supported} "
            "(add a row to ARCHITECTURES in swiftsvd_cli/model/architectures.py)"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    layers = model.get_submodule(spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise SwiftSVDError(f"'{spec.layers}' is not a list of decoder layers in this model")
    return layers


def target_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """The seven target linears of one decoder layer, by their path inside the layer."""
    found: dict[str, nn.Linear] = {}
    for name in spec.modules:
        module = layer.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise SwiftSVDError(f"'{name}' is a {type(module).__name__}, not nn.Linear")
        found[name] = module
    return found


def module_shapes(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """module path in a layer -> (m, n), read from a model or its meta skeleton (the same in every layer)."""
    linears = target_linears(decoder_layers(model, spec)[0], spec)
    return {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
