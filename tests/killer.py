"""`python tests/killer.py MODULE FUNCTION N ARGS...`: `swiftsvd ARGS`, SIGKILLed at FUNCTION's N-th call.

Mid-write points (`_atomic_write`, `save_file`) first leave half of the temp file on disk. Under a launcher
with `KILL_RANK` set, only that rank's process is wrapped: the others run on and must notice that it died.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def killing(real: Callable[..., Any], name: str, n: int) -> Callable[..., Any]:
    """`real`, except that its n-th call kills the process (mid-write points: after half of the temp file)."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] != n:
            return real(*args, **kwargs)
        if name == "_atomic_write":  # mid-write: half of the temp file on disk, the target not yet replaced
            path, write, size = args
            return real(path, lambda tmp: (write(tmp), half(tmp), die()), size)
        if name == "save_file":  # mid-write of a checkpoint: half of a weight shard in the temp folder
            real(*args, **kwargs)
            half(Path(args[1]))
        die()

    return wrapper


def main(module: str, name: str, n: str, *arguments: str) -> None:
    rank = os.environ.get("RANK", "0")
    if os.environ.get("KILL_RANK", rank) == rank:
        target = importlib.import_module(module)
        setattr(target, name, killing(getattr(target, name), name, int(n)))
    from swiftsvd_cli.cli import app

    app(list(arguments))


if __name__ == "__main__":
    main(*sys.argv[1:])
