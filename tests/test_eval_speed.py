"""Size and speed measurements: counts from the modules in memory, positive finite throughput."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch import nn

from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.speed import checkpoint_bytes, measure_size, measure_speed
from swiftsvd_cli.model.hf.lowrank import LowRankLinear
from tests.conftest import build_tiny_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dense_target_params(model: nn.Module) -> int:
    return sum(
        module.weight.numel() for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS
    )


def test_size_of_a_dense_model() -> None:
    model = build_tiny_model("qwen2", vocab_size=100)  # qwen2: q/k/v carry biases
    size = measure_size(model)
    assert size.params_total == sum(p.numel() for p in model.parameters())
    assert size.weights_bytes >= 4 * size.params_total  # float32, plus buffers (rotary frequencies)
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    assert size.params_target_linear == size.params_target_dense == dense_target_params(model) + biases
    assert size.params_lowrank == size.lowrank_modules == 0
    assert size.target_kept_ratio == 1.0
    assert size.checkpoint_bytes is None


def test_size_counts_factored_modules() -> None:
    model = build_tiny_model("llama", vocab_size=100)
    dense = measure_size(model)
    attn = model.model.layers[1].self_attn
    q = attn.q_proj  # 32 -> 32
    attn.q_proj = LowRankLinear(q.in_features, q.out_features, 4, q.bias is not None)
    size = measure_size(model)
    assert size.lowrank_modules == 1
    assert size.params_lowrank == 4 * (32 + 32)
    assert size.params_target_linear == dense.params_target_linear - q.weight.numel() + 4 * 64
    assert size.params_target_dense == dense.params_target_dense
    assert size.target_kept_ratio is not None and size.target_kept_ratio < 1


def test_checkpoint_bytes_sums_safetensors(tiny_llama_dir: Path) -> None:
    files = list(tiny_llama_dir.glob("*.safetensors"))
    assert files
    assert checkpoint_bytes(tiny_llama_dir) == sum(f.stat().st_size for f in files)
    assert checkpoint_bytes(tiny_llama_dir / "absent") is None


def test_speed_numbers_are_positive_and_finite() -> None:
    model = build_tiny_model("llama", vocab_size=100)
    speed = measure_speed(model, prompt_len=8, new_tokens=4, warmup=1, repeats=2, rss_baseline=0)
    for value in (speed.prefill_tokens_per_s, speed.decode_tokens_per_s):
        assert value > 0 and math.isfinite(value)
    assert speed.peak_memory_bytes > 0 and speed.peak_memory_kind == "cpu_rss_delta"


def test_speed_refuses_a_single_new_token() -> None:
    with pytest.raises(SwiftSVDError, match="bench-new-tokens"):
        measure_speed(build_tiny_model("llama", vocab_size=100), new_tokens=1)
