"""`swiftsvd report`: summary numbers on known spectra, every plot written, end to end on a tiny calibration."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import bench_plots
import pytest
import torch

from swiftsvd_cli import figures
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.stages import report
from tests.conftest import calibrated_plan

pytest.importorskip("matplotlib")

MODULES = ("self_attn.q_proj", "mlp.down_proj")
SHAPES = {"self_attn.q_proj": (8, 8), "mlp.down_proj": (8, 16)}


def synthetic_spectra(layers: int = 4) -> dict[tuple[int, str], torch.Tensor]:
    """Layer i decays faster as i grows: later layers are more compressible (lower NER)."""
    return {
        (i, module): torch.tensor([math.exp(-(i + 1) * j / 4) for j in range(8)], dtype=torch.float64)
        for i in range(layers)
        for module in MODULES
    }


def test_pearson_known_answers() -> None:
    assert figures.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert figures.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(figures.pearson([1, 1, 1], [1, 2, 3]))


def test_relative_loss_is_the_eigenvalue_tail_share() -> None:
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    # m = n = 8: uniform rank floor(4 * 0.5) = 2, tail 2 + 1 of 10
    assert report.relative_loss_at(lam, 8, 8, 0.5) == pytest.approx(0.3)
    assert report.relative_loss_at(torch.zeros(4, dtype=torch.float64), 8, 8, 0.5) == 0.0


def test_type_summary_finds_the_compressible_layers() -> None:
    importance = [0.1, 0.2, 0.3, 0.4]  # rises as NER falls
    summaries = report.summarise_types(synthetic_spectra(), SHAPES, importance)
    assert [s.kind for s in summaries] == ["q_proj", "down_proj"]
    q = summaries[0]
    assert q.shape == (8, 8) and q.lowest_ner_layer == 3 and q.highest_ner_layer == 0
    assert q.ner_importance_r < -0.9
    assert q.relative_loss[0.8] <= q.relative_loss[0.6] <= q.relative_loss[0.4]


def test_plots_are_written(tmp_path: Path) -> None:
    spectra = synthetic_spectra()
    paths = [
        figures.plot_spectra(spectra, tmp_path / "spectra.png"),
        figures.plot_ner_importance(spectra, SHAPES, [0.1, 0.2, 0.3, 0.4], tmp_path / "ner.png"),
        bench_plots.plot_perplexity({"swift uniform": {0.8: 10.0, 0.4: 100.0}}, 5.0, tmp_path / "ppl.png"),
        bench_plots.plot_timing(
            {"swift": {"eigen": 2.0, "ratio 0.8": 1.0}}, {"calibration": 9.0}, tmp_path / "time.png"
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 300_000


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SwiftSVDError, match=r"pip install .*swiftsvd-cli\[plots\]"):
        figures.pyplot()


def test_report_end_to_end(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    plan = calibrated_plan(tiny_llama_dir, tiny_text_file, work, samples=4, seqlen=16, ratio=0.6)
    result = report.run_report(report.ReportOptions(work=work, out=tmp_path / "report", plan=plan, device="cpu"))
    assert {p.name for p in result.figures} == {"ner_importance.png", "spectra.png", "plan_ranks.png"}
    text = result.summary.read_text()
    assert "| q_proj |" in text and "uniform, ρ = 0.60" in text
    assert all(f"({p.name})" in text for p in result.figures)
    assert len(result.types) == 7


def test_report_refuses_an_uncalibrated_work(tmp_path: Path) -> None:
    with pytest.raises(SwiftSVDError, match="no calibration"):
        report.run_report(report.ReportOptions(work=tmp_path, out=tmp_path / "report"))
