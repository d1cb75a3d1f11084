"""Two processes (gloo on CPU) give the one-process result: Grams, eigen shards, α, plan and logits.

One module fixture runs the single-process pipeline in this process and two launches of `-m swiftsvd_cli` with
2 processes: `accelerate launch` of a data-parallel calibration resuming a run killed after layer 0, and
`torchrun` of the one shot on a copy of the single-process Grams (eigendecompositions by owner, α windows split,
OUT written by the main process).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.distributed import owners
from swiftsvd_cli.metrics.perplexity import perplexity, pooled
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from swiftsvd_cli.stages.compress import CompressOptions, run_compress

SAMPLES, SEQLEN, RATIO = 6, 32, "0.6"
TOLERANCE = 1e-12  # float64 sums in another order
GRAM_TOLERANCE = 1e-6  # CPU Grams take the float32-product route: each process sums its own chunks (core.grams)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


TORCHRUN = ("torch.distributed.run", "--standalone", "--nproc_per_node", "2")
ACCELERATE = ("accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1")
"""`accelerate launch --multi_gpu`: with `--cpu` accelerate 1.15 starts one process; on CPU this is gloo."""


def launch(
    launcher: tuple[str, ...],
    *args: str,
    check: bool = True,
    program: tuple[str, ...] = ("-m", "swiftsvd_cli"),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m LAUNCHER PROGRAM ARGS` with 2 processes, one thread each (torchrun's default), this checkout's
    swiftsvd_cli first on the path (a PROGRAM script would otherwise import the installed one)."""
    extra = ("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()))
    command = [sys.executable, "-m", *launcher, *(extra if launcher == ACCELERATE else ()), *program]
    result = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), **(env or {})},
    )
    assert result.returncode == 0 or not check, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(trained_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    one = root / "one"
    source = ModelSource(str(trained_llama_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=one, data=str(tiny_text_file), samples=SAMPLES, seqlen=SEQLEN))
    options = AllocateOptions(work=one, ratio=float(RATIO), strategy="dynamic", val_samples=6, device="cpu")
    plan_one = run_allocate(options).path
    two = root / "two"  # a calibration killed after layer 0: layer 1's shard never written
    (two / "covariance").mkdir(parents=True)
    shutil.copy(one / "manifest.json", two)
    shutil.copy(one / "covariance" / "layer_000.safetensors", two / "covariance")
    calibrated = launch(
        ACCELERATE,
        *("calibrate", str(trained_llama_dir), "--data", str(tiny_text_file), "--out", str(two), "--device", "cpu"),
        *("--samples", str(SAMPLES), "--seqlen", str(SEQLEN)),
    )
    three = root / "three"  # the one shot on the single-process Grams: eigen and α by two processes, OUT by one
    shutil.copytree(one / "covariance", three / "covariance")
    shutil.copy(one / "manifest.json", three)
    launch(
        TORCHRUN,
        *("compress", str(trained_llama_dir), "--ratio", RATIO, "--strategy", "dynamic", "--val-samples", "6"),
        *("--data", str(tiny_text_file), "--samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu"),
        *("--work", str(three), "--out", str(root / "compressed")),
    )
    (root / "calibrate.log").write_text(calibrated.stdout + calibrated.stderr)
    return {"root": root, "one": one, "two": two, "three": three, "plan_one": plan_one}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_two_processes_calibrate_the_single_process_grams(runs: dict[str, Path]) -> None:
    """Each process pushed a disjoint half of the windows through both layers; the sums match one process."""
    log = (runs["root"] / "calibrate.log").read_text()
    assert "2 (1 computed, 1 reused)" in log and log.count("calibration of") == 1  # resumed; one process speaks
    one, two = (json.loads((runs[key] / "manifest.json").read_text())["layers"] for key in ("one", "two"))
    for layer in ("0", "1"):
        assert two[layer]["tokens"] == one[layer]["tokens"] == SAMPLES * SEQLEN
        assert abs(two[layer]["importance"] - one[layer]["importance"]) <= TOLERANCE * one[layer]["importance"]
    expected = load_file(runs["one"] / "covariance" / "layer_001.safetensors")
    got = load_file(runs["two"] / "covariance" / "layer_001.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert relative(got[name], tensor) <= (GRAM_TOLERANCE if name.endswith("gram") else TOLERANCE), name
    assert not (runs["two"] / ".lock").exists()


def test_with_float64_products_two_processes_give_the_one_process_grams_to_1e_12(
    trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """With exact products (`--gram-precision float64`, the data-centre GPU default) only the order of the float64
    sums differs between one process and two: every statistic agrees to 1e-12 relative."""
    source = ModelSource(str(trained_llama_dir), device="cpu")
    common = {"data": str(tiny_text_file), "samples": SAMPLES, "seqlen": SEQLEN}
    run_calibrate(CalibrateOptions(source=source, work=tmp_path / "one", gram_precision="float64", **common))
    launch(
        TORCHRUN,
        *("calibrate", str(trained_llama_dir), "--data", str(tiny_text_file), "--out", str(tmp_path / "two")),
        *("--samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--gram-precision", "float64"),
    )
    for layer in ("layer_000", "layer_001"):
        expected = load_file(tmp_path / "one" / "covariance" / f"{layer}.safetensors")
        got = load_file(tmp_path / "two" / "covariance" / f"{layer}.safetensors")
        assert set(got) == set(expected) and any(name.endswith("gram") for name in got)
        for name, tensor in expected.items():
            assert relative(got[name], tensor) <= TOLERANCE, (layer, name, relative(got[name], tensor))


def test_two_processes_write_the_same_eigen_shards_and_plan(runs: dict[str, Path]) -> None:
    """Layers eigendecomposed by their owners are the single-process shards byte for byte; α and ranks agree."""
    for layer in ("layer_000", "layer_001"):
        expected = (runs["one"] / "eigen" / f"{layer}.safetensors").read_bytes()
        assert (runs["three"] / "eigen" / f"{layer}.safetensors").read_bytes() == expected
    one = RankPlan.load(runs["plan_one"])
    two = RankPlan.load(runs["three"] / "plans" / runs["plan_one"].name)
    assert two.alpha == one.alpha and [m.rank for m in two.modules] == [m.rank for m in one.modules]
    assert len({c["val_ppl"] for c in one.candidates}) > 1  # the search had something to choose between
    for mine, theirs in zip(two.candidates, one.candidates, strict=True):
        assert abs(mine["val_ppl"] - theirs["val_ppl"]) <= TOLERANCE * theirs["val_ppl"]
    assert two.validation["windows"] == one.validation["windows"]  # every window scored once, by one process


def test_two_process_one_shot_gives_identical_logits(runs: dict[str, Path], trained_llama_dir: Path) -> None:
    """The one shot under torchrun (OUT built by the main process) equals compressing the one-process plan."""
    source = ModelSource(str(trained_llama_dir), "float32", "cpu")
    run_compress(CompressOptions(source, out=runs["root"] / "single", plan=runs["plan_one"]))
    ids = torch.arange(3, 3 + SEQLEN).unsqueeze(0)
    logits = []
    for out in ("single", "compressed"):
        model, _ = load_compressed(runs["root"] / out)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(*logits)


def test_a_launched_run_on_a_locked_work_is_refused_with_one_line(runs: dict[str, Path]) -> None:
    """The main process finds the lock; every process stops, and the main one prints the error once."""
    lock = runs["one"] / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "noon"}))
    try:
        result = launch(TORCHRUN, "allocate", str(runs["one"]), "--ratio", "0.5", "--device", "cpu", check=False)
    finally:
        lock.unlink()
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in use by another swiftsvd run (pid 1 on elsewhere since noon)" in errors[0]


def test_owners_balance_cost_not_count() -> None:
    """Within 4/3 of the best assignment (brute force), deterministic; one huge item is left alone."""
    rng = random.Random(0)
    for _ in range(30):
        costs = [rng.choice([1.0, 8.0, 27.0, 64.0]) * rng.random() for _ in range(rng.randint(1, 7))]
        processes = rng.randint(1, 3)
        owner = owners(costs, processes)
        assert owner == owners(costs, processes) and set(owner) <= set(range(processes))
        load = max(sum(c for c, o in zip(costs, owner, strict=True) if o == p) for p in range(processes))
        best = min(
            max(sum(c for c, o in zip(costs, assignment, strict=True) if o == p) for p in range(processes))
            for assignment in itertools.product(range(processes), repeat=len(costs))
        )
        assert load <= best * 4 / 3 + 1e-12
    assert owners([64.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1]


def test_pooled_perplexity_of_window_shares_is_the_whole_perplexity(trained_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    ids = torch.randint(3, 200, (5 * SEQLEN,), generator=torch.Generator().manual_seed(0))
    whole = perplexity(model, ids, seqlen=SEQLEN)
    parts = [perplexity(model, ids[: 3 * SEQLEN], seqlen=SEQLEN), perplexity(model, ids[3 * SEQLEN :], seqlen=SEQLEN)]
    together = pooled(parts)
    assert together.windows == whole.windows and together.predicted_tokens == whole.predicted_tokens
    assert abs(together.ppl - whole.ppl) <= TOLERANCE * whole.ppl
    assert pooled([whole]) is whole


def test_each_launched_process_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bare `cuda` is cuda:LOCAL_RANK under a launcher; an explicit device or a single process is left alone."""
    from types import SimpleNamespace

    from swiftsvd_cli import distributed

    assert distributed.local_device("cuda") == "cuda" and distributed.world_size() == 1
    monkeypatch.setattr(distributed, "_state", SimpleNamespace(local_process_index=3))
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert distributed.local_device("cuda") == "cuda:3"
    assert distributed.local_device("cuda:1") == "cuda:1" and distributed.local_device("cpu") == "cpu"
