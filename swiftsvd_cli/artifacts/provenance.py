"""Provenance: what made an artifact (software versions, source commit, time) and from which inputs (digests).

Every artifact carries one, so a number can be traced to the code and the data that produced it (cf. the
provenance keys of lm-eval's results).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from swiftsvd_cli import __version__


@dataclass(frozen=True)
class Provenance:
    """Who wrote an artifact and from what: `inputs` maps each input (model, data, upstream artifact) to a digest."""

    tool_version: str
    git_commit: str | None  # of the swiftsvd source checkout; None for an installed wheel
    versions: dict[str, str | None]  # torch, transformers, lm_eval, python
    created: str  # UTC, ISO 8601
    inputs: dict[str, str] = field(default_factory=dict)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_provenance(**inputs: str) -> Provenance:
    """Provenance of an artifact written now from `inputs` (name -> digest)."""
    versions = software_versions()
    return Provenance(
        tool_version=__version__,
        git_commit=git_commit(),
        versions={name: value for name, value in versions.items() if name != "swiftsvd"},
        created=utc_now(),
        inputs=dict(inputs),
    )


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the git checkout swiftsvd runs from (with '+dirty' for local edits), or None outside one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def software_versions() -> dict[str, str | None]:
    """swiftsvd, torch, transformers, lm-eval and Python versions."""
    import torch
    import transformers

    return {
        "swiftsvd": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "lm_eval": distribution_version("lm_eval"),
        "python": platform.python_version(),
    }


def distribution_version(distribution: str) -> str | None:
    """An installed distribution's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
