"""Smoke test of scripts/benchmark.py --quick on a tiny random model: it runs and writes what it promises.

No timing or accuracy assertions: on a random 2-layer model and a shared CI machine those mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_quick_benchmark_writes_results(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_llama_dir), "--data", str(tiny_text_file)]
    done = subprocess.run([*command, "--out", str(out), "--no-wikitext2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert result["kind"] == "swiftsvd-benchmark"
    assert result["protocol"]["fingerprint"] and result["machine"]["torch"]
    methods = {(row["method"], row["strategy"]) for row in result["perplexity"]}
    for method in ("swift", "svd", "asvd", "svd-llm", "svd-llm-fp64"):
        assert {(method, "uniform"), (method, "dynamic")} <= methods
    assert {("swift", "global")} | {("swift-compensated", s) for s in ("uniform", "dynamic", "global")} <= methods
    # original + ratios x (2 strategies x 5 methods + global + 3 compensated)
    assert len(result["perplexity"]) == 1 + 3 * (2 * 5 + 1 + 3)
    assert (
        result["protocol"]["headline"]["svd-llm"] == "uniform" and result["protocol"]["headline"]["swift"] == "dynamic"
    )
    compensated = [row for row in result["perplexity"] if row["method"] == "swift-compensated"]
    assert all(row["compensation_s"] > 0 for row in compensated)
    assert "compensated / one-pass" in (out / "README.md").read_text()
    assert set(result["timing"]["factorisation"]["swift"]) >= {"per_ratio_s", "first_ratio_s", "next_ratio_s"}
    assert result["timing"]["forward_floor_s"] > 0 and result["stability"]
    for name in result["figures"]:
        assert (out / name).stat().st_size > 0
    readme = (out / "README.md").read_text()
    assert "each method with its own allocation" in readme and "SVD-LLM (released precisions) | uniform" in readme
