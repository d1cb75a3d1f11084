"""Configurations of factored (Swift-SVD) checkpoints: the base family's config plus a `swiftsvd` section.

Shipped next to the weights (see swiftsvd_cli/model/hf/__init__.py): imports only transformers. Each family gets
its own `model_type` ("swiftsvd_llama", ...), so transformers without `trust_remote_code` refuses the directory
instead of building a dense model with randomly initialised projections. The `swiftsvd` section (written by
swiftsvd, see swiftsvd_cli/artifacts/compressed.py) is kept as an extra attribute; its `ranks` maps each factored
linear's full module name to its rank.
"""

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config


class SwiftSVDLlamaConfig(LlamaConfig):
    model_type = "swiftsvd_llama"


class SwiftSVDMistralConfig(MistralConfig):
    model_type = "swiftsvd_mistral"


class SwiftSVDQwen2Config(Qwen2Config):
    model_type = "swiftsvd_qwen2"


class SwiftSVDQwen3Config(Qwen3Config):
    model_type = "swiftsvd_qwen3"


CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": SwiftSVDLlamaConfig,
    "mistral": SwiftSVDMistralConfig,
    "qwen2": SwiftSVDQwen2Config,
    "qwen3": SwiftSVDQwen3Config,
}
"""Base family `model_type` -> the config class of its factored checkpoints."""
