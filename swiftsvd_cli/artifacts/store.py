"""The artifact store: atomic writes, checksummed safetensors shards and JSON reading for every artifact.

Every reader validates before it trusts a byte, and every writer writes a temp file beside the target and
renames it, so a killed run never leaves a torn file.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import human_bytes

logger = logging.getLogger("swiftsvd")


def umask() -> int:
    """The process umask (readable only by setting it), so temp files get the permissions a plain open gives."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner() -> str:
    """What temp names carry to say who writes them: this host and process (".x.<host>-<pid>.<random>")."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


def owned_temp_name(stem: str) -> str:
    """A temp file name that carries its writer (".stem.<host>-<pid>.tmp"), for files written in place."""
    return f".{stem}.{_owner()}.tmp"


OWNED_TEMP = re.compile(r"\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+(\.tmp)?")
"""A temp file or folder name written by `_atomic_write` or `make_temp_dir`, with its writer's host and pid."""


def remove_stale_temps(candidates: Iterable[Path]) -> list[Path]:
    """Delete the temp files and folders among `candidates` left by a killed process of this host; return them.

    A temp of a live process (a concurrent run) or of another host (a shared file system) is kept: only a
    writer that is gone can no longer rename its temp into place.
    """
    host = _owner().rpartition("-")[0]
    removed = []
    for path in candidates:
        match = OWNED_TEMP.fullmatch(path.name)
        if match is None or match["host"] != host or process_alive(int(match["pid"])):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.info("removed %d temp file(s) of a killed run: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a dead one's temps and locks are stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def make_temp_dir(parent: Path, name: str) -> Path:
    """A temp folder beside `parent / name` to build a directory in before renaming it into place.

    Created with the permissions a plain mkdir gives (mkdtemp's 0700 would hide a shared model from teammates).
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.{_owner()}."))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def _atomic_write(path: Path, write: Any, size: int) -> None:
    """Call `write(tmp_path)` on a temp file in the target's folder, then rename it over the target.

    `size` (bytes, about) is what a full disk is reported to have needed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_owner()}.", suffix=".tmp")
    os.close(fd)
    try:
        with no_space_error(path, size):
            write(Path(tmp))
            # after the write: mkstemp's 0600 (and safetensors' own re-created file) would hide artifacts from teammates
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def no_space_error(path: Path, size: int) -> Iterator[None]:
    """A full disk (or quota) while writing `path` as a one-line error saying how much space it needed."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise SwiftSVDError(
            f"no space left on the device to write {path}: it needs about {size / 2**30:.2f} GiB ({size:,} bytes), "
            f"{free / 2**30:.2f} GiB are free there; free some space or write elsewhere (nothing was replaced)"
        ) from error


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), len(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SwiftSVDError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SwiftSVDError(f"{what} is corrupt (not JSON): {path}") from error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SHA256 = re.compile(r"[0-9a-f]{64}")
SAFETENSORS_DTYPES = {  # a safetensors header's dtype names
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TensorSpec = tuple[torch.dtype, tuple[int | None, ...]]
"""What a shard's tensor must be: its dtype and shape (None: any size along that dimension)."""


@dataclass(frozen=True)
class Shard:
    """One tensor file of an artifact, relative to the artifact's root, with its checksum."""

    file: str
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        """A manifest names files inside its own artifact only: never `/etc/x`, never `../x`."""
        relative = PurePosixPath(self.file)
        if not self.file or relative.is_absolute() or ".." in relative.parts or "\\" in self.file:
            raise ValueError(f"shard path {self.file!r} is not a plain path inside the artifact")
        if not SHA256.fullmatch(self.sha256):
            raise ValueError(f"shard {self.file}: {self.sha256!r} is not a SHA-256")
        if self.bytes < 0:
            raise ValueError(f"shard {self.file}: negative size {self.bytes}")


def write_shard(root: Path, relative: str, tensors: dict[str, torch.Tensor]) -> Shard:
    path = root / relative
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    size = sum(tensor.numel() * tensor.element_size() for tensor in contiguous.values())
    _atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)), size)
    return Shard(file=relative, sha256=sha256_file(path), bytes=path.stat().st_size)


def shard_bytes(tensors: Mapping[str, TensorSpec]) -> int:
    """Bytes of a safetensors file holding tensors of these dtypes and (fully known) shapes: data plus header."""
    data, header = 0, 16
    for name, (dtype, shape) in tensors.items():
        if None in shape:
            raise ValueError(f"{name}: a size estimate needs every dimension, got {shape}")
        data += math.prod(size or 0 for size in shape) * torch.empty(0, dtype=dtype).element_size()
        header += len(name) + 60 + len(str(list(shape)))
    return data + header


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def require_disk(path: Path, needed: int, what: str) -> None:
    """Refuse, before any work, a run whose artifacts cannot fit the free disk, with the numbers."""
    free = free_bytes(path)
    if needed > free:
        raise SwiftSVDError(
            f"{what} needs {human_bytes(needed)} in {path}, but only {human_bytes(free)} is free there: "
            "free some space or choose another location"
        )


def check_shard(root: Path, shard: Shard, *, verify: bool = True) -> Path:
    """The shard's path, once it is known to be the file the manifest recorded (size, then SHA-256).

    `verify=False` checks only the size: for re-reads of a shard already hashed in the same run (hashing
    multi-GB eigenbases on every α candidate would cost more than the search itself).
    """
    path = root / shard.file
    if not path.is_file():
        raise SwiftSVDError(f"missing shard {path}: rerun the stage that writes it")
    if path.stat().st_size != shard.bytes or (verify and sha256_file(path) != shard.sha256):
        raise SwiftSVDError(f"corrupt shard {path} (size or checksum mismatch): delete it and rerun to recompute it")
    return path


def shard_is_valid(root: Path, shard: Shard) -> bool:
    try:
        check_shard(root, shard)
    except SwiftSVDError:
        return False
    return True


def read_shard(
    root: Path, shard: Shard, *, verify: bool = True, expect: Mapping[str, TensorSpec] | None = None
) -> dict[str, torch.Tensor]:
    """Load a shard after `check_shard`; with `expect`, holding exactly the tensors it names, each as specified."""
    path = check_shard(root, shard, verify=verify)
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise SwiftSVDError(f"corrupt shard {path}: {error}") from error
    if expect is None:
        return tensors
    missing, extra = sorted(expect.keys() - tensors.keys()), sorted(tensors.keys() - expect.keys())
    if missing or extra:
        raise SwiftSVDError(
            f"corrupt shard {path}: missing tensors {missing}, unexpected tensors {extra}: delete it and rerun"
        )
    for name, spec in expect.items():
        check_tensor(path, name, tensors[name], spec)
    return tensors


def check_tensor(path: Path, name: str, tensor: torch.Tensor, spec: TensorSpec) -> None:
    """Refuse a tensor of another dtype or shape than `spec`, or a floating one holding NaN or Inf.

    The checksum proves a shard is the file its manifest recorded, not that the manifest's writer was sane:
    a hand-edited or foreign manifest can checksum any file.
    """
    dtype, shape = spec
    fits = len(tensor.shape) == len(shape) and all(
        want in (None, got) for want, got in zip(shape, tensor.shape, strict=False)
    )
    if tensor.dtype != dtype or not fits:
        wanted = "x".join("*" if size is None else str(size) for size in shape)
        raise SwiftSVDError(
            f"corrupt shard {path}: {name} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} [{wanted}]: "
            "delete it and rerun"
        )
    if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
        raise SwiftSVDError(f"shard {path}: {name} holds NaN or Inf: delete it and rerun the stage that wrote it")


def differences(old: Any, new: Any) -> list[str]:
    """Field names whose values differ between two dataclass instances of one type."""
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
