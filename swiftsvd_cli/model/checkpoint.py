"""Compressed model directories: write one shard by shard, and load a factored one back (`load_compressed`).

A factored directory is a Hugging Face model directory with a model_type of its own ("swiftsvd_llama", ...):
`config.json` is the base model's config plus the `swiftsvd` section (swiftsvd_cli.artifacts.compressed) and an
`auto_map` naming the modeling code copied next to the weights (swiftsvd_cli/model/hf); safetensors shards hold
`<module>.A.weight` / `<module>.B.weight` for each factored linear and the untouched weights as they were;
with `factor_dtype` "int8" in the section every target linear is an `Int8Linear` (`qweight` int8 codes + `scale`
float32 per row): the factors' A and B, and the weight of each target linear left dense (`int8_dense`).
Plain transformers loads it with `trust_remote_code=True` and refuses it without; `load_compressed` builds the
same classes from this package and never imports the code inside the directory. A `--merge`d directory is a
plain dense checkpoint with the section in `swiftsvd.json`. With `kv_cache` "latent" in the section the
attention caches the k/v latents instead of keys and values (swiftsvd_cli/model/hf/latent_kv.py, switched on by
the shipped modeling code, so plain transformers does the same).
Writing takes the tensors one at a time from an iterator and keeps at most one shard (`MAX_SHARD_BYTES`) in
memory; floating-point tensors keep the checkpoint's dtype (a bfloat16 model compressed on a CPU is written in
bfloat16).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from swiftsvd_cli.artifacts.compressed import MERGED_FILE, SECTION, CompressedSection
from swiftsvd_cli.artifacts.format import load_artifact
from swiftsvd_cli.artifacts.store import atomic_write_json, make_temp_dir, no_space_error, read_json
from swiftsvd_cli.config import DTYPE
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype
from swiftsvd_cli.model.hf import SHIPPED, SOURCE
from swiftsvd_cli.model.hf.configuration_swiftsvd import CONFIGS
from swiftsvd_cli.model.hf.latent_kv import LatentKVError
from swiftsvd_cli.model.hf.modeling_swiftsvd import MODELS
from swiftsvd_cli.model.weights import INDEX

_NOT_CONFIG = ("model_type", "auto_map", "architectures", "transformers_version")  # written per class, not copied
MAX_SHARD_BYTES = 1 << 30
"""Largest shard written (1 GiB): bounds the host memory of writing a checkpoint, whatever the model's size."""


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


class ShardWriter:
    """Safetensors shards of at most `max_bytes` (a larger tensor gets a shard of its own), then the index."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, str(self.directory / f"part-{len(self.parts):05d}.tmp"), metadata={"format": "pt"})
        self.parts.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending, give the shards their final names and write the index; the file names."""
        if self.pending or not self.parts:
            self._flush()
        count = len(self.parts)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for index, name in enumerate(names):
            (self.directory / f"part-{index:05d}.tmp").rename(self.directory / name)
        if count > 1:
            weight_map = {tensor: name for name, part in zip(names, self.parts, strict=True) for tensor in part}
            atomic_write_json(
                self.directory / INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )
        return names


def write_compressed(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: Any,
    tokenizer: Any,
    section: Callable[[], CompressedSection],
    source_dir: Path | None,
    size: int,
) -> None:
    """Build the directory in a temp folder beside `out` (tensors streamed into shards), then swap it in.

    `out` is never half-written. `config` is the base model's config (with the written dtype); `source_dir` is
    the original model's directory: its `generation_config.json` is kept when it has one. `size` (bytes, about)
    is what a full disk is reported to have needed. `section` is called once every tensor is written, so it can
    record what writing them measured (the compensation's numbers).
    """
    tmp = make_temp_dir(out.parent, out.name)
    try:
        with no_space_error(out, size):
            writer = ShardWriter(tmp, MAX_SHARD_BYTES)
            for name, tensor in tensors:
                writer.add(name, tensor)
            writer.close()
            tokenizer.save_pretrained(tmp)
            record = section()
            if record.merged:
                config.save_pretrained(tmp)
                record.save(tmp / MERGED_FILE)
            else:
                factored_config(config, record).save_pretrained(tmp)
                write_model_code(tmp)
            generation = None if source_dir is None else source_dir / "generation_config.json"
            if generation is not None and generation.is_file():
                shutil.copyfile(generation, tmp / generation.name)
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

    transformers builds the factored classes (the same ones plain transformers runs) and fills them from the
    memory-mapped safetensors shards. Directories of the previous format (the base model_type, no modeling code)
    load the same way.
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
