"""Perplexity of models on their calibration windows, the validation split and the evaluation split, side by side.

    python scripts/ppl_splits.py WORK demo DIR [DIR ...] [--windows 16] [--out splits.json]

A method that fits the calibration text (error compensation) can lower the first number and raise the other two:
this is how the overfitting of `--compensate` without the original-input term was found. Calibration windows are
the first `--windows` of those WORK was calibrated on (same text, sampler and seed); validation and evaluation are
the first `--windows` non-overlapping windows of the WORK's calibration text's validation and test splits, at the
WORK's window length, each scored by the evaluation protocol (`swiftsvd_cli.metrics.perplexity`). Uses only
swiftsvd's public surface.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swiftsvd_cli import load_model
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.data.text import load_text, sample_windows, tokenize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.metrics.perplexity import perplexity

BATCH_SIZE = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the WORK the models were compressed from")
    parser.add_argument("models", nargs="+", help="model specs: the original and compressed directories")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the numbers here (JSON)")
    args = parser.parse_args(argv)
    try:
        settings = CalibrationManifest.load(args.work).settings
        rows: dict[str, dict[str, float]] = {}
        ids: dict[str, torch.Tensor] = {}  # split -> token ids, cut into windows of the WORK's length by `perplexity`
        for spec in args.models:
            loaded = load_model(spec, dtype="float32", device="cpu")
            if not ids:
                text = load_text(settings.data, "train").text
                drawn = sample_windows(
                    settings.sampler, loaded.tokenizer, text, settings.samples, settings.seqlen, settings.seed
                )
                ids["calibration"] = drawn[: args.windows].reshape(-1)  # cut back into the same windows
                for split in ("validation", "test"):
                    ids[split] = tokenize(loaded.tokenizer, load_text(settings.data, split).text)
            rows[spec] = {
                split: perplexity(
                    loaded.model.eval(), tokens, seqlen=settings.seqlen, limit=args.windows, batch_size=BATCH_SIZE
                ).ppl
                for split, tokens in ids.items()
            }
            print(spec, "  ".join(f"{split} {value:.2f}" for split, value in rows[spec].items()), flush=True)
    except SwiftSVDError as error:
        print(f"error: {error}")
        return 1
    if args.out:
        args.out.write_text(json.dumps({"work": str(args.work), "windows": args.windows, "ppl": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
