"""One writer per WORK: `WORK/.lock` names the run that writes it (pid, host, start time).

A second run on a WORK in use is refused at once with a one-line error naming the holder (not made to wait:
in a shell pipeline a silent wait looks like a hang, and retrying is the caller's choice). A lock left by a
process that no longer exists on this host is stale: it is taken over with a warning. A lock from another host
cannot be checked from here, so the message says how to remove it. Under several processes only the main
process takes the lock; the others learn its outcome (swiftsvd_cli.distributed.main_decides).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from swiftsvd_cli import distributed
from swiftsvd_cli.artifacts.store import atomic_write_json, process_alive
from swiftsvd_cli.errors import SwiftSVDError

logger = logging.getLogger("swiftsvd")
LOCK = ".lock"


def _holder(path: Path) -> dict[str, object] | None:
    """The lock's content; None when it vanished meanwhile (its holder just finished)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _acquire(work: Path) -> Path | None:
    if not work.is_dir():
        return None  # nothing to protect yet; the stage reports the missing WORK its own way
    path = work / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    staging = work / f".lock.{me['host']}.{os.getpid()}"  # unique across the hosts sharing WORK
    atomic_write_json(staging, me)  # complete before it becomes the lock: a reader never sees a torn one
    try:
        while True:
            try:
                os.link(staging, path)  # atomic, and fails if a lock exists
                break
            except FileExistsError:
                holder = _holder(path)
                if holder is None:
                    continue
                pid = holder.get("pid")
                if holder.get("host") == me["host"] and isinstance(pid, int) and not process_alive(pid):
                    logger.warning(
                        "taking over the stale lock of %s (pid %s started %s is gone)",
                        work,
                        pid,
                        holder.get("started"),
                    )
                    path.unlink(missing_ok=True)
                    continue
                raise SwiftSVDError(_refusal(work, path, holder)) from None
    finally:
        staging.unlink(missing_ok=True)
    return path


def _refusal(work: Path, path: Path, holder: dict[str, object]) -> str:
    if not holder:
        return f"{work} is locked by an unreadable {path}: delete it if no swiftsvd run uses this WORK"
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
    return (
        f"{work} is in use by another swiftsvd run ({who}): wait for it to finish, or use another WORK "
        f"(delete {path} only if that run is gone)"
    )


@contextmanager
def work_lock(work: Path) -> Iterator[None]:
    """Hold WORK's lock for the block (main process); every process raises the same error when it is taken.

    A WORK that is not a directory yet is not locked: create it first (calibrate does).
    """
    path = distributed.main_decides(lambda: _acquire(work))
    try:
        yield
    finally:
        if path is not None and distributed.is_main():
            path.unlink(missing_ok=True)
