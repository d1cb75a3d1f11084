"""The scale probe's model builder and extrapolation (its measurements are runs, not tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import scale_probe
from safetensors import safe_open

from swiftsvd_cli.model.streaming import open_model


def test_probe_model_has_the_real_shapes_in_bfloat16(tiny_tokenizer: object, tmp_path: Path) -> None:
    tokenizer_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tokenizer_dir)  # type: ignore[attr-defined]
    model_dir = tmp_path / "model"
    shape = dict(scale_probe.SHAPES["llama-2-7b"], hidden_size=64, intermediate_size=172, vocab_size=300)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(scale_probe.SHAPES, "probe-test", shape)
        size = scale_probe.build_model("probe-test", 2, model_dir, tokenizer_dir)
    streamed = open_model(str(model_dir))
    layer = streamed.skeleton.model.layers
    assert len(layer) == 2 and layer[0].mlp.down_proj.weight.shape == (64, 172)
    files = sorted(model_dir.glob("*.safetensors"))
    assert len(files) == 3  # one shard per decoder layer, one for the rest
    dtypes = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            dtypes |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
            if "model.layers.1.mlp.up_proj.weight" in handle.keys():
                weight = handle.get_tensor("model.layers.1.mlp.up_proj.weight").float()
    assert dtypes == {"BF16"}
    assert weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert size == sum(file.stat().st_size for file in files)


def test_fit_separates_fixed_and_per_layer_costs() -> None:
    runs = [{"layers": 2, "value": 10.0 + 2 * 3.0}, {"layers": 4, "value": 10.0 + 4 * 3.0}]
    assert scale_probe.fit(runs, lambda run: run["value"]) == pytest.approx((10.0, 3.0))
    assert scale_probe.fit(runs[:1], lambda run: run["value"]) == pytest.approx((0.0, 8.0))  # upper bound
