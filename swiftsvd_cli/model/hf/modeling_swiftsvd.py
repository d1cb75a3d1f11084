"""Factored causal LMs: each family's own model class, with the planned linears replaced by `LowRankLinear`.

Shipped next to the weights (see swiftsvd_cli/model/hf/__init__.py): imports only torch, transformers and its
sibling modules. The family's `__init__` builds the dense skeleton (on the meta device inside `from_pretrained`),
then the ranks in `config.swiftsvd["ranks"]` swap in the factored modules, so the state dict matches the
checkpoint's `<module>.A.weight` / `<module>.B.weight` names and every weight loads as saved. With
`config.swiftsvd["factor_dtype"]` "int8" every target linear is an `Int8Linear` instead (`qweight` int8 codes +
`scale` float32 per row): both factors of a factored one, and the weight of each listed in `int8_dense`.
With `config.swiftsvd["kv_cache"]` "latent" the attention then caches the k/v latents (`latent_kv`), so plain
transformers and `load_compressed` run the same latent cache.
"""

from typing import Any

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, PreTrainedModel, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_swiftsvd import (
    SwiftSVDLlamaConfig,
    SwiftSVDMistralConfig,
    SwiftSVDQwen2Config,
    SwiftSVDQwen3Config,
)
from .latent_kv import install_latent_kv
from .lowrank import factor_modules
from .qlinear import int8_modules


class LowRankMixin(nn.Module):
    """Put before the family's CausalLM class: after its `__init__`, swap in the factored (or int8) linears and,
    for a latent-KV checkpoint, the latent attention (a `LatentKVError` if the model cannot run it exactly)."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # the family's CausalLM, next in the MRO
        section = config.swiftsvd
        if section.get("factor_dtype") == "int8":
            int8_modules(self, section["ranks"], section.get("int8_dense", []))
        else:
            factor_modules(self, section["ranks"])
        if section.get("kv_cache") == "latent":
            install_latent_kv(self)


class SwiftSVDLlamaForCausalLM(LowRankMixin, LlamaForCausalLM):
    config_class = SwiftSVDLlamaConfig


class SwiftSVDMistralForCausalLM(LowRankMixin, MistralForCausalLM):
    config_class = SwiftSVDMistralConfig


class SwiftSVDQwen2ForCausalLM(LowRankMixin, Qwen2ForCausalLM):
    config_class = SwiftSVDQwen2Config


class SwiftSVDQwen3ForCausalLM(LowRankMixin, Qwen3ForCausalLM):
    config_class = SwiftSVDQwen3Config


MODELS: dict[str, type[PreTrainedModel]] = {
    "llama": SwiftSVDLlamaForCausalLM,
    "mistral": SwiftSVDMistralForCausalLM,
    "qwen2": SwiftSVDQwen2ForCausalLM,
    "qwen3": SwiftSVDQwen3ForCausalLM,
}
"""Base family `model_type` -> the factored causal LM class."""
