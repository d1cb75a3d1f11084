"""Settings shared by the CLI, the stages and the one-shot pipeline: every default is defined here, once."""

from __future__ import annotations

from swiftsvd_cli.errors import SwiftSVDError

SEED = 3
"""Seed of the random calibration window positions."""

SAMPLES, SEQLEN = 256, 2048
"""Calibration windows and tokens per window: the field's protocol (256 x 2048)."""

BATCH_SIZE = 4
"""Calibration windows per forward pass."""

DELTA = 0.5
"""Algorithm 2's guaranteed share of the uniform rank per layer (the paper fixes 0.5)."""

VAL_SAMPLES = 8
"""Validation windows per α candidate of the dynamic strategy."""

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
"""The paper's α grid {0, 0.1, ..., 1} for Algorithm 2."""


def check_ratio(ratio: float) -> None:
    """ρ is the kept fraction: (0, 1], anything else is a user error."""
    if not 0.0 < ratio <= 1.0:
        raise SwiftSVDError(f"--ratio {ratio} is outside (0, 1]: it is the fraction of parameters kept (0.8 keeps 80%)")
