"""Latent KV cache: attention that caches the low-rank latents `B_k x`, `B_v x` instead of keys and values.

Once `k_proj ≈ A_k B_k` and `v_proj ≈ A_v B_v`, a decoder layer only needs to keep `h_k = B_k x` (r_k numbers
per token) and `h_v = B_v x` (r_v) instead of keys and values (num_kv_heads · head_dim each): the KV cache
shrinks by (r_k + r_v) / (2 · num_kv_heads · head_dim). Keys are rebuilt at every step from the latents of
all cached tokens, `k = A_k h_k`, then (Qwen3) `k_norm`, then RoPE with *each cached token's own position*
(stored beside the latents, so left padding and any position ids stay exact). Caching the pre-RoPE latent
and rotating on rebuild is Palu's recipe; rebuilding keys without re-applying RoPE (the Swift-SVD authors'
and SVD-LLM's KV code) is wrong at every position but 0.

Values are either rebuilt, `V = A_v h_v`, or folded per head: `softmax(q kᵀ) (H_v A_v,gᵀ + b_v,g) =
(softmax(q kᵀ) H_v) A_v,gᵀ + b_v,g` (rows of the attention sum to one), whichever costs fewer multiply-adds
for the call at hand (`fold_is_cheaper`): folding wins for decoding, rebuilding for long prompts.

Shipped next to the weights (see swiftsvd_cli/model/hf/__init__.py; imports only torch and transformers):
`modeling_swiftsvd` installs it when the config's `swiftsvd` section says `kv_cache: latent`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `load_compressed` run the same code.
The factors are read only through `down` and `up`, so int8 factors (`qlinear.int8_lowrank`, whose `.A` and
`.B` are `Int8Linear`s) run the latent cache unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

SUPPORTED_ATTENTION: tuple[type[nn.Module], ...] = (LlamaAttention, MistralAttention, Qwen2Attention, Qwen3Attention)
"""Attention classes whose transformers 5 forward `latent_attention` reproduces (exact types: a subclass may differ)."""

POSITION_ONLY_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE variants whose cos/sin depend on the position alone, so rotating a rebuilt key at any step is exact."""

FOLD_IMPLEMENTATIONS = ("eager", "sdpa")
"""Attention kernels that accept values of another width than keys (folding passes r_v-wide values)."""


class LatentKVError(ValueError):
    """A model the latent cache cannot run exactly (architecture, RoPE variant, dense k/v, cache kind)."""


def down(proj: Any, x: Tensor) -> Tensor:
    """The latent `B x` of a factored linear: what the cache stores."""
    out: Tensor = proj.B(x)
    return out


def up(proj: Any, h: Tensor) -> Tensor:
    """`A h + bias`: a linear's output rebuilt from its latent."""
    out: Tensor = proj.A(h)
    return out


def is_factored(proj: nn.Module) -> bool:
    return isinstance(getattr(proj, "A", None), nn.Module) and isinstance(getattr(proj, "B", None), nn.Module)


class LatentLayer(DynamicLayer):
    """One decoder layer's cache: `keys` = h_k (b, S, r_k), `values` = h_v (b, S, r_v), `positions` (b, S).

    Sequence on dim -2 and batch on dim 0, as in `DynamicLayer`, so its length, mask sizes and offloading
    work unchanged; every method that edits the tokens also edits their positions.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.positions: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.int32, device=self.device)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, positions: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append latents (b, q, r) and their positions (b, q); return all latents."""
        if positions is None:
            raise LatentKVError("a latent KV cache layer needs the positions of the tokens it stores")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None and self.positions is not None
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions.to(torch.int32)], dim=-1)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.positions is not None:
            self.positions = self.positions[:, : -abs(tokens_to_remove)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions[indices, ...]

    def offload(self) -> None:
        super().offload()
        if self.positions is not None:
            self.positions = self.positions.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        super().prefetch()
        if self.positions is not None:
            self.positions = self.positions.to(self.device, non_blocking=True)


def latent_layer(cache: Cache, index: int) -> LatentLayer:
    """Layer `index` of `cache` as a `LatentLayer`, put in place of the empty `DynamicLayer` generate made.

    `generate` and the model's forward build a `DynamicCache` from the config before any layer runs; swapping
    its still-empty layers here means callers need no special cache. Anything else (a static or quantised
    cache, or one already holding keys) cannot hold latents: a clear error.
    """
    if getattr(cache, "offloading", False):
        raise LatentKVError("the latent KV cache does not support offloading: it is already small")
    while len(cache.layers) <= index:  # a DynamicCache() without config grows its layers lazily
        cache.layers.append(LatentLayer())
    layer = cache.layers[index]
    if isinstance(layer, LatentLayer):
        return layer
    if not isinstance(layer, DynamicLayer) or layer.is_initialized:
        raise LatentKVError(
            f"a latent-KV model needs a dynamic cache (generate's default), "
            f"got {type(layer).__name__} in {type(cache).__name__}"
        )
    latent = LatentLayer()
    cache.layers[index] = latent
    return latent


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (b, heads, S, d) with cos/sin (b, S, d), as transformers' `apply_rotary_pos_emb`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def eager_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (the four families share it); `value` may be narrower than `key`."""
    groups = int(module.num_key_value_groups)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def fold_is_cheaper(heads: int, kv_heads: int, head_dim: int, queries: int, tokens: int, rank: int) -> bool:
    """Multiply-adds per sequence: folding A_v into the output vs rebuilding V for `tokens` cached positions.

    fold: P H_v for every head (heads · q · S · r) + A_v on every head's r-wide output (heads · q · r · G d);
    rebuild: A_v H_v (S · r · G d) + P V (heads · q · S · d). Decoding (q = 1) folds once S > heads.
    """
    fold = heads * queries * rank * (tokens + kv_heads * head_dim)
    rebuild = tokens * rank * kv_heads * head_dim + heads * queries * tokens * head_dim
    return fold < rebuild


def unfold_heads(full: Tensor, kv_heads: int) -> Tensor:
    """(b, q, H, G·d) `A_v` applied to every head's latent output -> (b, q, H, d), head h keeping group h // (H/G)."""
    b, q, heads, width = full.shape
    per_group = full.view(b, q, kv_heads, heads // kv_heads, kv_heads, width // kv_heads)
    diagonal = torch.diagonal(per_group, dim1=2, dim2=4)  # (b, q, H/G, d, G)
    return diagonal.permute(0, 1, 4, 2, 3).reshape(b, q, heads, width // kv_heads)


def latent_attention(
    attn: Any,
    rotary: nn.Module,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None,
    cache: Cache | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The forward of a Llama/Mistral/Qwen2/Qwen3 attention module with latent caching (same inputs and outputs)."""
    b, q_len = hidden_states.shape[:2]
    head_dim = int(attn.head_dim)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    query = attn.q_proj(hidden_states).view(b, q_len, -1, head_dim)
    if q_norm is not None:
        query = q_norm(query)
    query = apply_rope(query.transpose(1, 2), *position_embeddings)
    h_k, h_v = down(attn.k_proj, hidden_states), down(attn.v_proj, hidden_states)  # (b, q, r_k), (b, q, r_v)
    cos, sin = position_embeddings
    if cache is not None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise LatentKVError(
                "latent KV attention needs position_ids (the decoder layers of these families pass them)"
            )
        layer = latent_layer(cache, int(attn.layer_idx))
        h_k, h_v = layer.update(h_k, h_v, positions=position_ids.expand(b, -1))
        cos, sin = rotary(hidden_states, layer.positions)  # every cached token's own position
    tokens = h_k.shape[1]
    key = up(attn.k_proj, h_k).view(b, tokens, -1, head_dim)
    if k_norm is not None:
        key = k_norm(key)
    key = apply_rope(key.transpose(1, 2), cos, sin)  # (b, G, S, d)
    kv_heads = key.shape[1]
    heads = query.shape[1]
    implementation = attn.config._attn_implementation
    fold = implementation in FOLD_IMPLEMENTATIONS and fold_is_cheaper(
        heads, kv_heads, head_dim, q_len, tokens, h_v.shape[-1]
    )
    if fold:
        value = h_v.unsqueeze(1).expand(b, kv_heads, tokens, h_v.shape[-1])
    else:
        value = up(attn.v_proj, h_v).view(b, tokens, kv_heads, head_dim).transpose(1, 2)
    interface: Callable[..., tuple[Tensor, Tensor | None]] = ALL_ATTENTION_FUNCTIONS.get_interface(
        implementation, eager_attention
    )
    sliding = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    out, weights = interface(
        attn,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        sliding_window=sliding,
        **kwargs,
    )  # (b, q, H, d or r_v)
    if fold:
        out = unfold_heads(up(attn.v_proj, out), kv_heads)
    return attn.o_proj(out.reshape(b, q_len, -1).contiguous()), weights


def check_latent_kv_support(model: Any) -> list[Any]:
    """Every decoder layer's attention; a one-line LatentKVError unless the latent cache reproduces it exactly."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    if not attentions or any(type(attn) not in SUPPORTED_ATTENTION for attn in attentions):
        families = ", ".join(cls.__name__.removesuffix("Attention") for cls in SUPPORTED_ATTENTION)
        raise LatentKVError(
            f"--kv-cache latent does not support architecture '{model.config.model_type}': supported are {families}"
        )
    rope = getattr(model.config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else None
    if rope_type not in POSITION_ONLY_ROPE_TYPES:
        raise LatentKVError(
            f"--kv-cache latent needs RoPE whose angles depend on the position only "
            f"({', '.join(POSITION_ONLY_ROPE_TYPES)}), this model uses '{rope_type}'"
        )
    return attentions


def install_latent_kv(model: Any) -> None:
    """Switch every decoder layer's attention of a factored model to latent caching (weights untouched)."""
    attentions = check_latent_kv_support(model)
    rotary = model.get_submodule("model.rotary_emb")
    for attn in attentions:
        for name in ("k_proj", "v_proj"):
            if not is_factored(attn.get_submodule(name)):
                raise LatentKVError(
                    f"layer {attn.layer_idx} {name} is dense: a latent KV cache needs factored k_proj and v_proj"
                )
        # An instance attribute shadows the class forward; the rotary module is bound, not registered as a child.
        attn.forward = functools.partial(latent_attention, attn, rotary)


def uninstall_latent_kv(model: Any) -> None:
    """Back to transformers' own attention and a dense KV cache: the same factored model, for comparisons."""
    for layer in model.get_submodule("model").get_submodule("layers"):
        vars(layer.get_submodule("self_attn")).pop("forward", None)
