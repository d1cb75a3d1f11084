"""Every row of the architecture table resolves on a tiny random model of that family; unknown ones are refused."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import ARCHITECTURES, arch_for, decoder_layers, target_linears
from tests.conftest import TINY_SHAPE


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_target_is_a_linear_with_shared_group_inputs(model_type: str) -> None:
    config = AutoConfig.for_model(model_type, vocab_size=64, head_dim=8, **TINY_SHAPE)
    model = AutoModelForCausalLM.from_config(config)
    spec = arch_for(model.config)
    layers = decoder_layers(model, spec)
    assert len(layers) == 2
    for layer in layers:
        linears = target_linears(layer, spec)
        assert set(linears) == set(spec.modules) and len(spec.modules) == 7
        assert all(isinstance(linear, nn.Linear) for linear in linears.values())
        for names in spec.groups.values():  # modules of one group must read tensors of one width
            assert len({linears[name].in_features for name in names}) == 1
    # GQA: k/v are narrower than q, and each has its own shape for rank computations
    attention = target_linears(layers[0], spec)
    assert attention["self_attn.k_proj"].out_features == 16 < attention["self_attn.q_proj"].out_features == 32


def test_unknown_architecture_lists_supported() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(SwiftSVDError, match="unsupported architecture 'gpt2'.*llama.*ARCHITECTURES"):
        arch_for(config)


def test_group_of() -> None:
    spec = ARCHITECTURES["llama"]
    assert spec.group_of("self_attn.v_proj") == "attn_in" and spec.group_of("mlp.down_proj") == "mlp_out"
