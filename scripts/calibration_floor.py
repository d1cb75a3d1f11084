"""Calibration vs the forward-pass floor: what `swiftsvd calibrate` costs beyond plain forward passes.

    python scripts/calibration_floor.py          # demo, 64 x 512, 3 repeats -> benchmarks/floor/ (run it idle)
    python scripts/calibration_floor.py --quick --model DIR --data corpus.txt --out /tmp/floor   # smoke run

Each repeat runs back to back in one process, on the CPU in float32:
- a fresh calibration at default settings (`benchmark.run_calibration`: the whole stage, from reading the text
  to the last shard written), with the process's CPU seconds beside its wall time;
- the tokenisation of the calibration text alone: part of that stage, which the floor does not pay (it starts
  from token ids);
- plain forward passes over as many tokens (`benchmark.forward_floor`): embeddings + decoder layers (the floor
  issue 13 sets calibration against, ≤ 1.5x) and the whole model with its LM head.
The JSON keeps every repeat; the summary is the repeat with the median ratio. Times depend on the machine's
load: run it alone.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark import ROOT, forward_floor, machine_info, run_calibration
from rich.console import Console

from swiftsvd_cli import load_model
from swiftsvd_cli.artifacts.store import atomic_write_json, atomic_write_text
from swiftsvd_cli.data.text import load_text, tokenize
from swiftsvd_cli.figures import pyplot, save_figure

TARGET = 1.5
console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model spec (demo, hub id, local dir)")
    parser.add_argument("--data", default="demo", help="calibration text (demo, wikitext2, PATH)")
    parser.add_argument("--samples", type=int, help="calibration windows (default 64; quick 4)")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default 512; quick 32)")
    parser.add_argument("--repeats", type=int, help="calibration + floor pairs (default 3; quick 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "floor")
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    args = parser.parse_args(argv)
    args.samples = args.samples or (4 if args.quick else 64)
    args.seqlen = args.seqlen or (32 if args.quick else 512)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_repeat(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="swiftsvd-floor-") as work:
        cpu = cpu_seconds()
        _, calibration = run_calibration(args, Path(work) / "work", keep_input_grams=False)
        cpu = cpu_seconds() - cpu
    start = time.perf_counter()
    tokenize(tokenizer, load_text(args.data, "train").text)
    tokenization = time.perf_counter() - start
    floor = forward_floor(model, args)
    return {
        "calibration_s": calibration,
        "calibration_cpu_s": cpu,
        "tokenization_s": tokenization,
        **floor,
        "ratio": calibration / floor["decoder_s"],
        "ratio_without_tokenization": (calibration - tokenization) / floor["decoder_s"],
    }


def plot(summary: dict[str, float], path: Path) -> Path:
    """Seconds of the median repeat: calibration (tokenisation + the rest) against the two forward passes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 2.8), layout="constrained")
    rest = summary["calibration_s"] - summary["tokenization_s"]
    ax.barh(2, summary["tokenization_s"], color="C1", label="tokenise the calibration text")
    ax.barh(2, rest, left=summary["tokenization_s"], color="C0", label="layer passes + Grams + shards")
    ax.barh(1, summary["decoder_s"], color="C2", label="plain forward: embeddings + decoder")
    ax.barh(0, summary["full_model_s"], color="C7", label="plain forward with the LM head")
    ax.axvline(TARGET * summary["decoder_s"], color="black", ls="--", lw=0.8, label=f"{TARGET}x decoder forward")
    ax.set_yticks([0, 1, 2], ["full forward", "decoder forward", "calibrate"])
    ax.set_xlabel("seconds")
    ax.set_title(f"Calibration / decoder forward = {summary['ratio']:.2f}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def readme(result: dict[str, Any]) -> str:
    lines = [
        "# Calibration vs the forward-pass floor",
        "",
        f"`python scripts/calibration_floor.py` on {result['machine']['cpu']} ({result['machine']['torch_threads']} "
        f"threads), {result['protocol']['samples']} x {result['protocol']['seqlen']} tokens, float32, "
        f"git {result['machine']['git_commit']}. Seconds per repeat:",
        "",
        "| repeat | calibrate | of which tokenising | decoder forward | full forward | ratio | ratio w/o tokenising |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(result["repeats"], 1):
        lines.append(
            f"| {index} | {run['calibration_s']:.1f} | {run['tokenization_s']:.1f} | {run['decoder_s']:.1f} | "
            f"{run['full_model_s']:.1f} | {run['ratio']:.3f} | {run['ratio_without_tokenization']:.3f} |"
        )
    lines += ["", f"Median ratio: **{result['summary']['ratio']:.3f}** (target ≤ {TARGET}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    repeats = []
    for index in range(args.repeats):
        repeats.append(one_repeat(args, loaded.model, loaded.tokenizer))
        console.print(f"repeat {index + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in repeats[-1].items()))
    median = statistics.median_low(run["ratio"] for run in repeats)
    summary = next(run for run in repeats if run["ratio"] == median)
    result = {
        "machine": machine_info(),
        "protocol": {"model": args.model, "data": args.data, "samples": args.samples, "seqlen": args.seqlen},
        "repeats": repeats,
        "summary": summary,
        "target": TARGET,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "floor.json", result)
    plot(summary, args.out / "floor.png")
    atomic_write_text(args.out / "README.md", readme(result))
    console.print(f"median calibration / decoder forward: {median:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
