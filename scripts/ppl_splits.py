"""Perplexity of models on their calibration windows, the validation split and the evaluation split, side by side.

    python scripts/ppl_splits.py WORK demo DIR [DIR ...] [--windows 16] [--out splits.json]

A method that fits the calibration text (error compensation) can lower the first number and raise the other two:
this is how the overfitting of `--compensate` without the original-input term was found. Calibration windows are
the first `--windows` of those WORK was calibrated on (same text, sampler and seed); validation and evaluation are
the first `--windows` non-overlapping windows of the WORK's calibration text's validation and test splits, at the
WORK's window length. Uses only swiftsvd's public surface.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli import load_model
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.data.text import load_text, sample_windows, tokenize


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Token-level perplexity over `windows` (k, seqlen), every window scored from its first token."""
    nll, tokens = 0.0, 0
    for batch in windows.split(batch_size):
        count = batch.shape[0] * (batch.shape[1] - 1)
        nll += float(model(batch, labels=batch).loss) * count
        tokens += count
    return math.exp(nll / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the WORK the models were compressed from")
    parser.add_argument("models", nargs="+", help="model specs: the original and compressed directories")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the numbers here (JSON)")
    args = parser.parse_args()
    settings = CalibrationManifest.load(args.work).settings
    rows: dict[str, dict[str, float]] = {}
    windows: dict[str, torch.Tensor] = {}
    for spec in args.models:
        loaded = load_model(spec, dtype="float32", device="cpu")
        if not windows:
            text = load_text(settings.data, "train").text
            drawn = sample_windows(
                settings.sampler, loaded.tokenizer, text, settings.samples, settings.seqlen, settings.seed
            )
            windows["calibration"] = drawn[: args.windows]
            for split in ("validation", "test"):
                ids = tokenize(loaded.tokenizer, load_text(settings.data, split).text)
                windows[split] = ids[: args.windows * settings.seqlen].view(args.windows, settings.seqlen)
        rows[spec] = {split: perplexity(loaded.model.eval(), batch) for split, batch in windows.items()}
        print(spec, "  ".join(f"{split} {value:.2f}" for split, value in rows[spec].items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"work": str(args.work), "windows": args.windows, "ppl": rows}, indent=1))


if __name__ == "__main__":
    main()
