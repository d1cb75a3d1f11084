"""Compressed model directories: write one atomically, and load a factored one back (`load_compressed`).

A factored directory is a Hugging Face model directory with a model_type of its own ("swiftsvd_llama", ...):
`config.json` is the base model's config plus the `swiftsvd` section (swiftsvd_cli.artifacts.compressed) and an
`auto_map` naming the modeling code copied next to the weights (swiftsvd_cli/model/hf); `model.safetensors`
holds `<module>.A.weight` / `<module>.B.weight` for each factored linear and the untouched weights as they were;
with `factor_dtype` "int8" in the section every target linear is an `Int8Linear` (`qweight` int8 codes + `scale`
float32 per row): the factors' A and B, and the weight of each target linear left dense (`int8_dense`).
Plain transformers loads it with `trust_remote_code=True` and refuses it without; `load_compressed` builds the
same classes from this package and never imports the code inside the directory. A `--merge`d directory is a
plain dense checkpoint with the section in `swiftsvd.json`. With `kv_cache` "latent" in the section the
attention caches the k/v latents instead of keys and values (swiftsvd_cli/model/hf/latent_kv.py, switched on by
the shipped modeling code, so plain transformers does the same).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError

from swiftsvd_cli.artifacts.compressed import MERGED_FILE, SECTION, CompressedSection
from swiftsvd_cli.artifacts.format import load_artifact
from swiftsvd_cli.artifacts.store import make_temp_dir, no_space_error, read_json
from swiftsvd_cli.config import DTYPE
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype
from swiftsvd_cli.model.hf import SHIPPED, SOURCE
from swiftsvd_cli.model.hf.configuration_swiftsvd import CONFIGS
from swiftsvd_cli.model.hf.latent_kv import LatentKVError
from swiftsvd_cli.model.hf.modeling_swiftsvd import MODELS

_NOT_CONFIG = ("model_type", "auto_map", "architectures", "transformers_version")  # written per class, not copied


def factored_config(config: Any, section: CompressedSection) -> Any:
    """The base model's config as a config of its factored family, with the section and the `auto_map`."""
    family = config.model_type
    if family not in CONFIGS:
        raise SwiftSVDError(f"no factored checkpoint class for '{family}': supported are {', '.join(sorted(CONFIGS))}")
    config_class, model_class = CONFIGS[family], MODELS[family]
    values = {key: value for key, value in config.to_dict().items() if key not in _NOT_CONFIG}
    factored = config_class.from_dict({**values, SECTION: section.to_dict()})
    factored.architectures = [model_class.__name__]
    factored.auto_map = {
        "AutoConfig": f"{_module(config_class)}.{config_class.__name__}",
        "AutoModelForCausalLM": f"{_module(model_class)}.{model_class.__name__}",
    }
    return factored


def _module(cls: type) -> str:
    """The shipped file a class lives in, as `auto_map` names it ("modeling_swiftsvd")."""
    return cls.__module__.rpartition(".")[2]


def write_model_code(directory: Path) -> None:
    """Copy the shipped modeling code (swiftsvd_cli/model/hf, `SHIPPED`) next to a factored checkpoint's weights."""
    for name in SHIPPED:
        shutil.copyfile(SOURCE / name, directory / name)


def save_compressed(model: Any, tokenizer: Any, section: CompressedSection, out: Path) -> None:
    """Write a compressed directory into a temp dir beside `out`, then swap it in: `out` is never half-written."""
    tmp = make_temp_dir(out.parent, out.name)
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    try:
        with no_space_error(out, size):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if section.merged:
                section.save(tmp / MERGED_FILE)
            else:
                factored_config(model.config, section).save_pretrained(tmp)  # replaces the base config.json
                write_model_code(tmp)
        if out.exists():  # only reached with --force: two renames, then the slow delete, so no kill loses both
            replaced = tmp.with_name(f"{tmp.name}.replaced")  # not a temp name: never swept as stale
            out.rename(replaced)
            tmp.rename(out)
            shutil.rmtree(replaced)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def is_factored(directory: Path) -> bool:
    """Whether a local model directory is a factored swiftsvd checkpoint (of any format version)."""
    config = directory / "config.json"
    if not config.is_file():
        return False
    raw = read_json(config, "model config")
    return isinstance(raw, dict) and isinstance(raw.get(SECTION), dict)


def load_compressed(path: str | Path, dtype: str = DTYPE, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a factored directory: a working transformers model with the true smaller size.

    Directories of the previous format (the base model_type, no modeling code) load the same way.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    load_artifact(CompressedSection, path / "config.json", key=SECTION)  # refuses unknown versions, upgrades old
    raw = read_json(path / "config.json", "model config")
    family = _family(raw.get("model_type"), path)
    values = {key: value for key, value in raw.items() if key not in _NOT_CONFIG}
    try:
        config = CONFIGS[family].from_dict(values)
        torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(config))
        loaded = MODELS[family].from_pretrained(path, config=config, dtype=torch_dtype, output_loading_info=True)
    except LatentKVError as error:
        raise SwiftSVDError(f"{path}: {error}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, SafetensorError) as error:
        # A damaged config.json or model.safetensors: say which directory, not where transformers tripped.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "ignore_mismatched_sizes" in reason:  # transformers points at a table it logged, not at the cause
            reason = "weights whose shapes differ from what config.json and its swiftsvd ranks describe"
        raise SwiftSVDError(f"cannot load the compressed model in {path} (corrupt?): {reason}") from error
    model, info = cast(tuple[Any, dict[str, Any]], loaded)
    for problem, keys in (
        ("lacks weights for", info["missing_keys"]),
        ("has unexpected weights", info["unexpected_keys"]),
    ):
        if keys:
            raise SwiftSVDError(f"{path} {problem} {sorted(keys)[0]} (and {len(keys) - 1} more): corrupt?")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SwiftSVDError(f"{path}: weight {name} holds NaN or Inf: compress the model again")
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, config=config)  # no AutoConfig: it would ask for remote code


def _family(model_type: Any, path: Path) -> str:
    """The base family of a factored directory's model_type ("swiftsvd_llama", or "llama" in format 1)."""
    families = {config_class.model_type: family for family, config_class in CONFIGS.items()} | {f: f for f in CONFIGS}
    if model_type not in families:
        raise SwiftSVDError(f"{path} has model_type '{model_type}', which no swiftsvd checkpoint class reads")
    return families[model_type]
