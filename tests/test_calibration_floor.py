"""Smoke test of scripts/calibration_floor.py --quick on a tiny model: every promised number, file and figure.

Its timings are measurements, not tests; here only what holds on any machine is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import calibration_floor
import pytest

pytest.importorskip("matplotlib")


def test_quick_floor_run_writes_every_repeat(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "floor"
    arguments = ["--quick", "--model", str(tiny_llama_dir), "--data", str(tiny_text_file), "--repeats", "2"]
    calibration_floor.main([*arguments, "--out", str(out)])
    result = json.loads((out / "floor.json").read_text())
    assert result["protocol"]["samples"] == 4 and len(result["repeats"]) == 2
    for run in result["repeats"]:
        assert 0 < run["tokenization_s"] < run["calibration_s"] and run["decoder_s"] > 0
        assert run["ratio"] == pytest.approx(run["calibration_s"] / run["decoder_s"])
        assert run["ratio_without_tokenization"] < run["ratio"]
    assert result["summary"] in result["repeats"]
    assert (out / "floor.png").stat().st_size > 0
    assert f"{result['summary']['ratio']:.3f}" in (out / "README.md").read_text()
