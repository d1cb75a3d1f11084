"""Latent KV cache on tiny random GQA models: every generated step's logits equal a full forward of the factored
model without any cache (RoPE at every position, left padding, each family), and the cache holds latents."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from swiftsvd_cli.metrics.speed import cache_bytes
from swiftsvd_cli.model.hf import latent_kv
from swiftsvd_cli.model.hf.latent_kv import LatentLayer, install_latent_kv
from swiftsvd_cli.model.hf.lowrank import LowRankLinear, replace_module
from tests.conftest import TINY_SHAPE, build_tiny_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # qwen2: k/v biases; qwen3: k_norm before RoPE
RANK = 6  # k/v are 16 x 32 (2 KV heads of 8): break-even 10, dense cache 16 per token
PROMPT, NEW = 8, 40  # positions run to 47, far past the prompt
PADS = (0, 2, 5)  # left padding of the three rows


def factored(family: str, **overrides: Any) -> nn.Module:
    """A tiny model whose k/v are rank-RANK factorisations of its own weights (truncated SVD).

    Weights 10x larger than transformers' init give sharp attention, so a wrong key position shows in the logits.
    """
    model = build_tiny_model(family, vocab_size=64, **{"initializer_range": 0.2, **overrides})
    for layer in model.model.layers:
        for name in ("k_proj", "v_proj"):
            linear = layer.self_attn.get_submodule(name)
            U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
            bias = None if linear.bias is None else linear.bias.detach() + 0.1  # nonzero: folding must add it
            replace_module(
                layer.self_attn,
                name,
                LowRankLinear.from_factors(U[:, :RANK] * S[:RANK], Vh[:RANK], bias, torch.float32),
            )
    return model


def latent_copy(model: nn.Module) -> nn.Module:
    latent = copy.deepcopy(model)
    install_latent_kv(latent)
    return latent


def padded_prompt(pads: tuple[int, ...] = PADS) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (len(pads), PROMPT), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(PROMPT)[None] >= torch.tensor(pads)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int = NEW, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,  # no early stop on a random EOS
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **{"do_sample": False, **kwargs},
        )


def step_error(latent: nn.Module, reference: nn.Module, pads: tuple[int, ...] = PADS) -> float:
    """Max |logit| difference between the latent model's generation steps and a cache-free forward of `reference`."""
    ids, mask = padded_prompt(pads)
    out = generate(latent, ids, mask)
    full_mask = torch.cat([mask, torch.ones(len(pads), NEW, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # what generate gives every token
    with torch.no_grad():
        full = reference(out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    steps = torch.stack(out.logits, dim=1)  # (b, NEW, vocab): step t predicts token PROMPT + t
    return float((steps - full[:, PROMPT - 1 : -1]).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_equals_a_full_forward(family: str) -> None:
    overrides = {"sliding_window": 16} if family == "mistral" else {}  # a window shorter than the generation
    model = factored(family, **overrides)
    assert step_error(latent_copy(model), model) < 1e-4


@pytest.mark.parametrize("values", ["fold", "rebuild"])
def test_folded_and_rebuilt_values_are_both_exact(values: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latent_kv, "fold_is_cheaper", lambda *args: values == "fold")
    model = factored("qwen2")
    assert step_error(latent_copy(model), model) < 1e-4


def test_eager_attention_is_exact() -> None:
    model = factored("qwen3")
    model.config._attn_implementation = "eager"
    assert step_error(latent_copy(model), model, pads=(0, 0, 0)) < 1e-4  # eager NaNs on padded rows, both ways


def test_skipping_rope_on_cached_keys_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exactness check has teeth: keys rotated at position 0 (RoPE skipped) miss by far more than tolerance."""
    update = LatentLayer.update

    def without_positions(self: LatentLayer, *args: Any, positions: torch.Tensor, **kwargs: Any) -> Any:
        return update(self, *args, positions=torch.zeros_like(positions), **kwargs)

    model = factored("llama")
    latent = latent_copy(model)
    monkeypatch.setattr(LatentLayer, "update", without_positions)
    assert step_error(latent, model) > 0.1


def test_cache_holds_latents_and_positions() -> None:
    model = factored("llama")
    latent = latent_copy(model)
    ids, mask = padded_prompt()
    dense_out, latent_out = generate(model, ids, mask), generate(latent, ids, mask)
    assert torch.equal(dense_out.sequences, latent_out.sequences)
    cache = latent_out.cache
    length = PROMPT + NEW - 1  # the last token is sampled, never fed back
    for layer in cache.layers:
        assert isinstance(layer, LatentLayer)
        assert layer.keys.shape == layer.values.shape == (len(PADS), length, RANK)
        for row, pad in enumerate(PADS):  # each real token's own position, counted from its row's first token
            assert torch.equal(layer.positions[row, pad:], torch.arange(length - pad, dtype=torch.int32))
    layers, kv_width = TINY_SHAPE["num_hidden_layers"], 16
    assert cache_bytes(dense_out.cache) == layers * 2 * kv_width * 4 * len(PADS) * length
    assert cache_bytes(cache) == layers * (2 * RANK * 4 + 4) * len(PADS) * length  # float32 latents + int32 position


def test_sampling_and_beam_search_match_the_dense_cache() -> None:
    model = factored("qwen2")
    latent = latent_copy(model)
    ids, mask = padded_prompt()
    for kwargs in ({"do_sample": True, "top_k": 0}, {"num_beams": 3}, {"do_sample": True, "num_return_sequences": 2}):
        torch.manual_seed(0)
        expected = generate(model, ids, mask, new=12, **kwargs).sequences
        torch.manual_seed(0)
        assert torch.equal(generate(latent, ids, mask, new=12, **kwargs).sequences, expected), kwargs


def test_dense_kv_and_unsupported_models_are_refused() -> None:
    with pytest.raises(ValueError, match="k_proj is dense"):
        install_latent_kv(build_tiny_model("llama", vocab_size=64))
    gpt2 = build_tiny_model("gpt2", vocab_size=64)
    with pytest.raises(ValueError, match="architecture 'gpt2': supported are Llama, Mistral, Qwen2, Qwen3"):
        install_latent_kv(gpt2)
    dynamic = factored("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="'dynamic'"):
        install_latent_kv(dynamic)


def test_a_static_cache_is_refused() -> None:
    latent = latent_copy(factored("llama"))
    ids, mask = padded_prompt()
    with pytest.raises(ValueError, match="dynamic cache"):
        generate(latent, ids, mask, cache_implementation="static")
