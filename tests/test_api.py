"""The Python API: `from swiftsvd_cli import calibrate, ...` works, stays lazy, and runs the pipeline (no CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import swiftsvd_cli


def imported_after(statement: str) -> set[str]:
    """Top-level modules a fresh interpreter has imported after `statement`."""
    code = f"{statement}; import sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


def test_import_is_light() -> None:
    """`import swiftsvd_cli` (and the CLI module, for a fast --help) must not import torch or transformers."""
    for statement in ("import swiftsvd_cli", "import swiftsvd_cli.cli"):
        heavy = imported_after(statement) & {"torch", "transformers", "datasets", "accelerate"}
        assert heavy == set(), (statement, heavy)


def test_public_names_resolve() -> None:
    from swiftsvd_cli import allocate, calibrate, compress, evaluate, load_compressed
    from swiftsvd_cli.model.checkpoint import load_compressed as checkpoint_load
    from swiftsvd_cli.stages import allocate as allocate_stage
    from swiftsvd_cli.stages import calibrate as calibrate_stage
    from swiftsvd_cli.stages import evaluate as evaluate_stage

    assert calibrate is calibrate_stage.run_calibrate and allocate is allocate_stage.run_allocate
    assert evaluate is evaluate_stage.evaluate and load_compressed is checkpoint_load and callable(compress)
    assert set(swiftsvd_cli.__all__) == {"__version__", *swiftsvd_cli._API}
    assert all(getattr(swiftsvd_cli, name) is not None for name in swiftsvd_cli.__all__)


def test_pipeline_through_the_api(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    from swiftsvd_cli import (
        AllocateOptions,
        CalibrateOptions,
        CompressOptions,
        EvalOptions,
        ModelSource,
        OneShotOptions,
        Strategy,
        allocate,
        calibrate,
        compress,
        evaluate,
        load_compressed,
    )

    source = ModelSource(str(tiny_llama_dir), device="cpu")
    work = tmp_path / "work"
    manifest = calibrate(CalibrateOptions(source=source, work=work, data=str(tiny_text_file), samples=4, seqlen=32))
    assert manifest.manifest.complete
    plan = allocate(AllocateOptions(work=work, ratio=0.6, strategy=Strategy.UNIFORM, device="cpu")).path
    by_plan = compress(CompressOptions(source=source, out=tmp_path / "a", plan=plan))
    one_shot = compress(
        OneShotOptions(
            source, 0.6, tmp_path / "b", work, Strategy.UNIFORM, data=str(tiny_text_file), samples=4, seqlen=32
        )
    )
    assert by_plan.params_after == one_shot.params_after < by_plan.params_before
    assert set(one_shot.seconds) == {"calibrate", "allocate", "compress"} and one_shot.seconds["allocate"] == 0.0
    report = evaluate(EvalOptions(targets=(str(tmp_path / "a"),), tasks=(str(tiny_text_file),), seqlen=32, limit=1))
    model, _ = load_compressed(tmp_path / "b")
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert report.targets[0].compressed is not None
