"""A full disk, simulated by writers that write part of their file and then fail with ENOSPC.

Every stage must then exit with one line that says how much space the write needed, leave the previous
artifact byte for byte as it was, and leave no temp file behind; the same command afterwards succeeds.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from swiftsvd_cli.cli import app
from tests.conftest import calibrated_plan

NEEDS = re.compile(r"needs about [\d.]+ GiB \(([\d,]+) bytes\)")


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def fills_disk(write: Callable[..., Any], written: Callable[..., Path]) -> Callable[..., Any]:
    """`write` on a disk that fills up: half of the file it writes (`written(*args)`) lands, then ENOSPC."""

    def failing(*args: Any, **kwargs: Any) -> None:
        write(*args, **kwargs)
        path = written(*args)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return failing


@pytest.fixture
def work(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> Path:
    calibrated_plan(tiny_llama_dir, tiny_text_file, tmp_path / "work", samples=4, seqlen=32, ratio=0.5)
    return tmp_path / "work"


def needed(output: str) -> int:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and "Traceback" not in output, output
    match = NEEDS.search(errors[0])
    assert match, errors[0]
    return int(match.group(1).replace(",", ""))


def test_a_full_disk_keeps_every_artifact_and_says_how_much_space_was_needed(
    work: Path, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    runner = CliRunner()
    plan = work / "plans" / "ratio-0.50-uniform.json"
    out = tmp_path / "out"
    compress = ["compress", str(tiny_llama_dir), "--plan", str(plan), "--out", str(out), "--device", "cpu", "--force"]
    allocate = ["allocate", str(work), "--ratio", "0.5", "--strategy", "uniform", "--device", "cpu", "--force"]
    assert runner.invoke(app, compress).exit_code == 0
    eigen_shard = work / "eigen" / "layer_001.safetensors"
    real_write_text = Path.write_text

    def write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        if not self.name.startswith(f".{plan.name}."):  # only the plan's temp file hits the full disk (not WORK/.lock)
            return real_write_text(self, text, *args, **kwargs)
        return fills_disk(real_write_text, lambda path, _text: path)(self, text)  # type: ignore[no-any-return]

    cases = [  # what fails, its patch, the command, and the file whose size the message must state
        ("plan JSON", "pathlib.Path.write_text", write_text, allocate, plan),
        (
            "checkpoint",
            "swiftsvd_cli.model.checkpoint.save_file",  # the shard writer's
            fills_disk(save_file, lambda _tensors, path: Path(path)),
            compress,
            out / "model.safetensors",
        ),
        (
            "eigen shard",  # a missing eigenbasis: allocate computes it and writes its shard
            "swiftsvd_cli.artifacts.store.save_file",
            fills_disk(save_file, lambda _tensors, path: Path(path)),
            allocate,
            eigen_shard,
        ),
    ]
    for case, target, patch, arguments, written in cases:
        if case == "eigen shard":
            eigen_shard.unlink()
        before = digests(tmp_path)
        with monkeypatch.context() as patched:
            patched.setattr(target, patch)
            result = runner.invoke(app, arguments)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (case, result.output)
        size = needed(result.output)
        assert digests(tmp_path) == before, case  # the previous artifact as it was; no partial or temp file
        assert runner.invoke(app, arguments).exit_code == 0, case  # with space again, the same command succeeds
        assert 0.8 * written.stat().st_size <= size <= 1.05 * written.stat().st_size, (case, size)
    assert not list(tmp_path.rglob(".*")), "temp files left"
