"""One loader for every stage: hub id, local HF directory, `.gguf` file, `demo`, or a swiftsvd-compressed directory.

Two ways to get a model. `ModelSource.open` (calibrate, allocate, compress, report; see `model.streaming`)
builds the model's skeleton on the meta device and reads tensors only when a step asks for them, one decoder
layer at a time. `load_model` (eval, which needs the whole model for its forward passes) loads everything.
Both resolve the spec and fingerprint the checkpoint the same way (`resolve`, `fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts.compressed import MERGED_FILE, load_section
from swiftsvd_cli.config import DTYPE, DType, check_device
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.checkpoint import is_factored, load_compressed
from swiftsvd_cli.model.dtypes import checkpoint_dtype, resolve_dtype
from swiftsvd_cli.model.weights import StateDictSource, WeightSource, unique_state

if TYPE_CHECKING:
    from swiftsvd_cli.model.streaming import StreamedModel

DEMO = "demo"
logger = logging.getLogger("swiftsvd")
FINGERPRINT_ROWS = 8


def resolve_device(device: str | None) -> str:
    """The device a stage computes on: the one asked for (checked), else (None or `auto`) cuda when available.

    Under a launcher, bare `cuda` is this process's own GPU (`cuda:LOCAL_RANK`).
    """
    asked = check_device(device)
    return distributed.local_device(
        asked if asked not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    )


def eigen_devices(device: str | None) -> list[str]:
    """Where eigendecompositions run: with `auto` in one process (no launcher), every visible GPU, each given a
    share of the layers balanced by cost; otherwise the compute device alone (a launcher's processes each own one
    GPU and share the layers between them instead)."""
    resolved = resolve_device(device)
    if device == "auto" and distributed.world_size() == 1 and resolved == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return [resolved]


def fingerprint(config: Any, weights: WeightSource, names: Iterable[str]) -> str:
    """SHA-256 over the config, every tensor's name and shape, and 8 evenly spaced rows of each tensor.

    Reads a few rows per tensor (seconds even for 70B, without loading the model) and still tells apart two
    checkpoints of one shape. Values are rounded to bfloat16 first, so one checkpoint read in float32 or bfloat16
    has one identity, whether it is streamed from safetensors or loaded whole.
    """
    digest = hashlib.sha256()
    ignored = {"transformers_version", "dtype", "_name_or_path"}  # where it was read from is not what it is
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ignored}
    digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name in sorted(names):
        shape = weights.shape(name)
        digest.update(f"{name}:{shape}".encode())
        rows = shape[0] if shape else 1
        picks = sorted({round(i * (rows - 1) / (FINGERPRINT_ROWS - 1)) for i in range(FINGERPRINT_ROWS)})
        for row in picks if len(shape) > 1 else [None]:
            sample = weights.get(name) if row is None else weights.rows(name, row, row + 1)
            digest.update(sample.reshape(-1).to(torch.bfloat16).to(torch.float32).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Resolved:
    """Where a model spec points: the from_pretrained location, its extra arguments, and its config."""

    spec: str
    location: str
    extra: dict[str, Any]
    config: Any
    is_local: bool

    @property
    def model_id(self) -> str:
        return self.spec if self.spec == DEMO or not self.is_local else str(Path(self.location).resolve())


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


def resolve(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> Resolved:
    """Find the model and read its config (only the config: enough for `calibrate --dry-run`)."""
    from transformers import AutoConfig

    location, extra = _source(spec)
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
    return Resolved(spec, location, extra, config, is_local)


def is_factored_spec(spec: str) -> bool:
    """Whether `spec` names a local factored swiftsvd directory (read by `load_compressed`, never streamed)."""
    directory = Path(_source(spec)[0])
    return directory.exists() and is_factored(directory)


def skeleton(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The model built on the meta device: every shape, no weight bytes (buffers such as RoPE tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.tie_weights()  # building on meta leaves tied weights (lm_head = embed_tokens) as two placeholders
    return model.eval()  # type: ignore[no-any-return]


@dataclass
class LoadedModel:
    """A whole model ready for a stage, with what a manifest needs to know about where it came from."""

    model: Any  # transformers PreTrainedModel (CausalLM), eval mode
    tokenizer: Any
    spec: str
    model_id: str
    revision: str | None
    fingerprint: str
    compressed: dict[str, Any] | None = field(default=None)


def tokenizer_of(resolved: Resolved, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolved.location, revision=revision, trust_remote_code=trust_remote_code, **resolved.extra
    )


def load_whole(resolved: Resolved, revision: str | None, torch_dtype: torch.dtype, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            revision=revision,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            **resolved.extra,
        )
    except (OSError, ValueError) as error:
        raise SwiftSVDError(f"cannot load '{resolved.spec}': {str(error).splitlines()[0]}") from error
    return model.eval()  # type: ignore[no-untyped-call]  # transformers' stubs leave eval untyped


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str = DTYPE,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a whole causal LM and its tokenizer on `device`; every failure is a one-line `SwiftSVDError`."""
    directory = Path(_source(spec)[0])
    if is_factored_spec(spec):  # its own model_type: AutoConfig would ask for remote code
        model, tokenizer = load_compressed(directory, dtype=dtype, device=device)
        model_id = spec if spec == DEMO else str(directory.resolve())
    else:
        resolved = resolve(spec, revision, trust_remote_code)
        torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(resolved.config))
        model = load_whole(resolved, revision, torch_dtype, trust_remote_code)
        try:
            tokenizer = tokenizer_of(resolved, revision, trust_remote_code)
        except (OSError, ValueError) as error:
            raise SwiftSVDError(f"cannot load the tokenizer of '{spec}': {str(error).splitlines()[0]}") from error
        model.to(device)
        model_id = resolved.model_id
    state = dict(unique_state(model))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        model_id=model_id,
        revision=revision,
        fingerprint=fingerprint(model.config, StateDictSource(state), state),
        compressed=_section(directory) if directory.exists() else None,
    )


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

    def load(self) -> LoadedModel:
        return load_model(
            self.model,
            revision=self.revision,
            dtype=self.dtype,
            device=self.compute_device,
            trust_remote_code=self.trust_remote_code,
        )

    def open(self) -> StreamedModel:
        from swiftsvd_cli.model.streaming import open_model

        return open_model(
            self.model,
            revision=self.revision,
            dtype=self.dtype,
            device=self.compute_device,
            trust_remote_code=self.trust_remote_code,
        )
