"""One loader for every stage: hub id, local HF directory, `.gguf` file, `demo`, or a swiftsvd-compressed directory."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts.compressed import MERGED_FILE, load_section
from swiftsvd_cli.config import DTYPE, DType, check_device
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.checkpoint import is_factored, load_compressed
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype

DEMO = "demo"
logger = logging.getLogger("swiftsvd")


@dataclass
class LoadedModel:
    """A model ready for a stage, with what a manifest needs to know about where it came from."""

    model: Any  # transformers PreTrainedModel (CausalLM), eval mode
    tokenizer: Any
    spec: str
    model_id: str
    revision: str | None
    fingerprint: str
    compressed: dict[str, Any] | None = field(default=None)


def resolve_device(device: str | None) -> str:
    """The device a stage computes on: the one asked for (checked), else cuda when available.

    Under a launcher, bare `cuda` is this process's own GPU (`cuda:LOCAL_RANK`).
    """
    return distributed.local_device(check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu"))


def fingerprint(model: torch.nn.Module, config: Any) -> str:
    """SHA-256 over the config, every tensor's name and shape, and a strided sample of its values.

    Sampling keeps this to seconds on 7B models while still telling apart two checkpoints of one shape.
    Values are rounded to bfloat16 first, so loading one checkpoint in float32 or bfloat16 gives one identity.
    """
    digest = hashlib.sha256()
    config_dict = {k: v for k, v in config.to_dict().items() if k not in {"transformers_version", "dtype"}}
    digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 1024)
        digest.update(flat[::stride].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def _source(spec: str) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should look, and extra keyword arguments (gguf_file)."""
    if spec == DEMO:
        from swiftsvd_cli.data.demo import demo_model_dir

        return str(demo_model_dir()), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SwiftSVDError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise SwiftSVDError(f"{path} is not a model directory (no config.json)")
        return str(path), {}
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SwiftSVDError(f"model path not found: {spec}")
    return spec, {}


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str = DTYPE,
    device: str = "cpu",
    trust_remote_code: bool = False,
    keep_on_cpu: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; every failure is a one-line `SwiftSVDError`.

    `device` is where the model will compute (it decides what `dtype="auto"` means); `keep_on_cpu`
    leaves the weights on the CPU for stages that move one decoder layer at a time to the device.
    """
    location, extra = _source(spec)
    is_local = Path(location).exists()
    if is_local and is_factored(Path(location)):
        model, tokenizer = load_compressed(location, dtype=dtype, device=device)
    else:
        model, tokenizer = _load_dense(spec, location, extra, revision, dtype, device, trust_remote_code)
        if not keep_on_cpu:
            model.to(device)
    compressed = _section(Path(location)) if is_local else None
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        model_id=spec if spec == DEMO or not is_local else str(Path(location).resolve()),
        revision=revision,
        fingerprint=fingerprint(model, model.config),
        compressed=compressed,
    )


def _load_dense(
    spec: str,
    location: str,
    extra: dict[str, Any],
    revision: str | None,
    dtype: str,
    device: str,
    trust_remote_code: bool,
) -> tuple[Any, Any]:
    """A plain transformers checkpoint (hub, local, GGUF) and its tokenizer, on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    is_local = Path(location).exists()
    try:
        config = AutoConfig.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except OSError as error:
        if is_local:
            raise SwiftSVDError(f"cannot read the model config at {location}: {error}") from error
        raise SwiftSVDError(
            f"cannot load '{spec}' from the Hugging Face hub (offline, or wrong id/revision?): "
            "download it elsewhere and pass the local directory instead"
        ) from error
    except ValueError as error:
        hint = " Pass --trust-remote-code only if you trust that code." if "custom code" in str(error) else ""
        raise SwiftSVDError(f"cannot load '{spec}': {error}".splitlines()[0] + hint) from error
    torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(config))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as error:
        raise SwiftSVDError(f"cannot load '{spec}': {str(error).splitlines()[0]}") from error
    return model, tokenizer


def _section(directory: Path) -> dict[str, Any] | None:
    """The compressed-model section of a swiftsvd directory, factored or merged; None for other models.

    A merged directory is a plain checkpoint first: an unreadable `swiftsvd.json` (older swiftsvd) costs only
    its description in reports, not the load.
    """
    if not ((directory / MERGED_FILE).is_file() or is_factored(directory)):
        return None
    try:
        return load_section(directory).to_dict()
    except SwiftSVDError as error:
        logger.warning("%s: reporting it as an uncompressed model", error)
        return None


@dataclass(frozen=True)
class ModelSource:
    """Which model a stage loads and how: the loading settings shared by calibrate, compress and one shot."""

    model: str  # hub id, local dir, .gguf file or 'demo'
    dtype: DType = DTYPE
    device: str | None = None  # None: cuda if available
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def compute_device(self) -> str:
        return resolve_device(self.device)

    def load(self, *, keep_on_cpu: bool = False) -> LoadedModel:
        return load_model(
            self.model,
            revision=self.revision,
            dtype=self.dtype,
            device=self.compute_device,
            trust_remote_code=self.trust_remote_code,
            keep_on_cpu=keep_on_cpu,
        )
