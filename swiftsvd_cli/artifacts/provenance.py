"""Provenance: the software versions every artifact records, so a number can be traced to what made it."""

from __future__ import annotations

import platform

from swiftsvd_cli import __version__


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
