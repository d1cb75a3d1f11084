"""One writer per WORK: a second run is refused while the first holds the lock; a dead run's lock is taken over.

Also: files in WORK are created with the permissions a plain open gives (group-readable under a 002/022 umask),
so a teammate can read a shared cache.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.lock import LOCK, work_lock
from swiftsvd_cli.cli import app
from swiftsvd_cli.errors import SwiftSVDError

HOLD = "import sys; from pathlib import Path; from swiftsvd_cli.artifacts.lock import work_lock\n" + (
    "with work_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.read()\n"
)


def test_second_run_on_a_locked_work_is_refused(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    """A real second process holds WORK: calibrate there fails at once with one line naming the holder."""
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = ["calibrate", str(tiny_llama_dir), "--data", str(tiny_text_file), "--samples", "2", "--seqlen", "16"]
        result = CliRunner().invoke(app, [*args, "--out", str(work), "--device", "cpu"])
        assert result.exit_code == 1
        assert "in use by another swiftsvd run" in result.output and f"pid {holder.pid} " in result.output
        assert "Traceback" not in result.output and not (work / "manifest.json").exists()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not (work / LOCK).exists()  # released on exit


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="swiftsvd"), work_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock of {tmp_path} (pid {pid} started yesterday is gone)" in caplog.text
    assert not lock.exists()


def test_lock_from_another_host_or_unreadable_is_refused(tmp_path: Path) -> None:
    """Whether a process on another host lives cannot be checked from here: refused, saying how to clear it."""
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "noon"}))
    with pytest.raises(SwiftSVDError, match=r"pid 1 on elsewhere since noon.*delete .*\.lock only if"):
        with work_lock(tmp_path):
            pass
    lock.write_text("{torn")
    with pytest.raises(SwiftSVDError, match="locked by an unreadable"):
        with work_lock(tmp_path):
            pass
    assert lock.read_text() == "{torn"  # a refused run leaves the lock alone


def test_work_files_honour_the_umask(tmp_path: Path) -> None:
    """Not the 0600 of a temp-file call: shards and JSON get what a plain open gives (0664 under umask 002)."""
    old = os.umask(0o002)
    try:
        shard = store.write_shard(tmp_path, "covariance/layer_000.safetensors", {"x": torch.zeros(2)})
        store.atomic_write_json(tmp_path / "manifest.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / shard.file).stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o664
