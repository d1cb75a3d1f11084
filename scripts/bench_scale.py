"""Scale-out: calibrate + allocate wall time with 1, 2, … N processes, and that every N gives the 1-process result.

    python scripts/bench_scale.py                        # demo model + text, 1 and 2 processes, benchmarks/scale/
    python scripts/bench_scale.py --model meta-llama/Llama-3.1-8B --data wikitext2 --samples 256 --seqlen 2048 \\
        --processes 1,2,4,8 --out /tmp/scale            # a multi-GPU server: one process per GPU

P = 1 runs `python -m swiftsvd_cli` (one plain process), P > 1 `torchrun --standalone --nproc_per_node P -m
swiftsvd_cli`, each into its own WORK: `calibrate` (data-parallel) then `allocate --strategy dynamic` (eigen
shards by owner, α windows split). Times are whole commands as a user meets them (start-up and model loads
included). Every row also reports the largest relative difference of its Grams / Σ|x| from the 1-process WORK,
whether its importance and token counts match (relative 1e-12), and whether its plan has the same α and ranks.
Writes scale.json and scale.png (speed-up vs processes, with the ideal line). Uses only swiftsvd's public surface.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from benchmark import machine_info
from safetensors.torch import load_file

from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.store import atomic_write_json
from swiftsvd_cli.figures import pyplot

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-12


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "swiftsvd_cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] + [
        "-m",
        "swiftsvd_cli",
    ]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return time.perf_counter() - start


def compare(work: Path, reference: Path) -> dict[str, Any]:
    """How far `work`'s calibration and plan are from the 1-process ones."""
    mine, theirs = CalibrationManifest.load(work), CalibrationManifest.load(reference)
    worst = 0.0
    for layer, record in theirs.layers.items():
        expected = load_file(reference / record.shard.file)
        got = load_file(work / mine.layers[layer].shard.file)
        for name, tensor in expected.items():
            scale = tensor.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
            worst = max(worst, float((got[name].double() - tensor.double()).abs().max() / scale))
    same_stats = all(
        mine.layers[i].tokens == r.tokens and abs(mine.layers[i].importance - r.importance) <= TOLERANCE * r.importance
        for i, r in theirs.layers.items()
    )
    plans = [RankPlan.load(next((path / "plans").glob("*.json"))) for path in (work, reference)]
    same_plan = plans[0].alpha == plans[1].alpha and [m.rank for m in plans[0].modules] == [
        m.rank for m in plans[1].modules
    ]
    return {"gram_max_rel_diff": worst, "same_tokens_importance": same_stats, "same_alpha_and_ranks": same_plan}


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    processes = [row["processes"] for row in rows]
    for key, label in (("calibrate_s", "calibrate"), ("allocate_s", "allocate"), ("total_s", "calibrate + allocate")):
        axis.plot(processes, [rows[0][key] / row[key] for row in rows], marker="o", label=label)
    axis.plot(processes, processes, linestyle="--", color="grey", label="ideal")
    axis.set_xlabel("processes")
    axis.set_ylabel("speed-up over 1 process")
    axis.set_xticks(processes)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--val-samples", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--processes", default=None, help="comma list (default: 1..GPUs, or 1,2 without GPUs)")
    parser.add_argument("--device", default=None, help="default: cuda if available (one GPU per process)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/swiftsvd-bench-scale"), help="WORK dirs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    counts = [int(p) for p in args.processes.split(",")] if args.processes else list(range(1, max(gpus, 2) + 1))
    if counts[0] != 1:
        raise SystemExit("--processes must start with 1: the 1-process run is the reference")
    device = ["--device", args.device] if args.device else []
    rows: list[dict[str, Any]] = []
    for processes in counts:
        work = args.scratch / f"p{processes}"
        if work.exists():
            raise SystemExit(f"{work} exists: remove it (every row starts from an empty WORK)")
        common = ["--samples", str(args.samples), "--seqlen", str(args.seqlen), "--data", args.data, *device]
        calibrate = timed([*launcher(processes), "calibrate", args.model, *common, "--out", str(work)])
        allocate = timed(
            [*launcher(processes), "allocate", str(work), "--ratio", str(args.ratio), "--strategy", "dynamic"]
            + ["--val-samples", str(args.val_samples), "--model", args.model, *device]
        )
        row: dict[str, Any] = {"processes": processes, "calibrate_s": calibrate, "allocate_s": allocate}
        row["total_s"] = calibrate + allocate
        row |= compare(work, args.scratch / "p1")
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "scratch")}
    result = {
        "settings": settings,
        "machine": machine_info(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "note": "wall times of whole commands (start-up and model loads included); torchrun sets OMP_NUM_THREADS=1",
        "rows": rows,
    }
    atomic_write_json(args.out / "scale.json", result)
    plot(rows, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
