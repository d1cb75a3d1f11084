"""Compressed model directories: save one atomically, and load a factored one back (`load_compressed`).

A factored directory is `config.json` with a `swiftsvd` section (format version, rank per module, plan
provenance), the tokenizer, and `model.safetensors` holding `<module>.A.weight` / `<module>.B.weight` for
each factored linear. `load_compressed` builds the model without weights, swaps in `LowRankLinear` modules
by the rank map, then loads the tensors: the model in memory really is smaller.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli.artifacts.store import FORMAT_VERSION, make_temp_dir
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype
from swiftsvd_cli.model.lowrank import LowRankLinear, replace_module


def save_directory(model: Any, tokenizer: Any, out: Path) -> None:
    """save_pretrained into a temp dir beside `out`, then swap it in: `out` is never half-written."""
    tmp = make_temp_dir(out.parent, out.name)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # only reached with --force
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_compressed(path: str | Path, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a factored directory: a working transformers model with the true smaller size."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    section = getattr(config, "swiftsvd", None)
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        raise SwiftSVDError(f"{path} is not a swiftsvd-compressed directory of format {FORMAT_VERSION}")
    torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(config))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)  # type: ignore[no-untyped-call]
    for name, rank in section["ranks"].items():
        linear = model.get_submodule(name)
        replace_module(
            model,
            name,
            LowRankLinear(
                linear.in_features,
                linear.out_features,
                rank,
                linear.bias is not None,
                device="meta",
                dtype=torch_dtype,
            ),
        )
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(str(file))
    state = {key: value.to(torch_dtype) if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SwiftSVDError(f"{path} lacks weights for {missing[0]} (and {len(missing) - 1} more): corrupt checkpoint?")
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
