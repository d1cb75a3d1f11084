"""Smoke test of scripts/bench_bytes.py --quick on a tiny model: every promised row, file and figure is written.

No accuracy assertions beyond what holds on any model: a random 2-layer model's perplexities mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("torchao")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_bytes.py"


def test_quick_bytes_benchmark(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "bytes"
    command = [sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_llama_dir), "--data", str(tiny_text_file)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "bytes.json").read_text())
    rows = {(r["model"], r.get("target"), r["weights"]): r for r in result["rows"]}
    group = result["protocol"]["int4_group"]
    assert {("original", None, w) for w in ("16-bit", "int8 RTN, per row", f"int4 RTN, g{group}")} <= set(rows)
    for strategy in ("uniform", "dynamic"):
        for weights in ("16-bit", "int8", "int4"):
            assert (f"swift {strategy}", "ρ 0.8", f"{weights} factors") in rows
        budget = rows[(f"swift {strategy}", "50% of 16-bit bytes", "int8 factors")]
        assert budget["bytes_ratio"] <= 0.5
    original = rows[("original", None, "16-bit")]
    assert original["bytes_ratio"] == 1.0 and original["stored_bytes"] == result["protocol"]["reference_16bit_bytes"]
    # quantised rows really are smaller, in the order of their bits
    int8 = rows[("original", None, "int8 RTN, per row")]["stored_bytes"]
    int4 = rows[("original", None, f"int4 RTN, g{group}")]["stored_bytes"]
    assert original["stored_bytes"] > int8 > int4
    assert (out / "bytes.png").stat().st_size > 0
    assert "| model |" in (out / "README.md").read_text()
    assert not (out / "partial.json").exists()
