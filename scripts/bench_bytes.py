"""Bytes, not parameters: perplexity vs stored bytes of Swift-SVD, quantisation, and both stacked.

    python scripts/bench_bytes.py --work /tmp/bytes-work            # demo model + text, writes benchmarks/bytes/
    python scripts/bench_bytes.py --quick --model DIR --data corpus.txt --out /tmp/bytes   # CI smoke run

Every row is a checkpoint measured by `evaluate` on the same held-out windows, and its target linears' bytes
as a checkpoint stores them (embeddings and the LM head are the same in every row and left out):
- the original (16-bit: what a bf16 checkpoint stores; evaluated in float32),
- round-to-nearest weight-only quantisation of the original: int8 per row is `compress --ratio 1.0
  --factor-dtype int8` (torchao's `Int8WeightOnlyConfig` codes, bit for bit: tests/test_quantized.py), int4 per
  group is torchao's `IntxWeightOnlyConfig(int4, PerGroup(g))`, symmetric,
- Swift-SVD (uniform and dynamic plans at kept ratios ρ) with 16-bit factors, int8 factors (`compress
  --factor-dtype int8`) and int4 factors (the same torchao int4 config on A and B, rank padded to whole groups),
- int8 factors at the largest ranks that fit a byte budget (`--bytes-ratio`).
int4 weights are written dequantised: torchao's CPU int4 linear multiplies by exactly that dequantised weight.
Bytes of 16-bit and int8 rows come from the plan (`core.allocation.weight_bytes`, which tests/test_quantized.py
checks against the safetensors file); int4 bytes count torchao's codes packed two per byte plus its scale and
zero point per group. The memory column is what `eval` measures in memory (float32 for 16-bit rows), for int4
rows torchao's CPU layout (one byte per code). No GPTQ / AWQ: their packages target CUDA, and torchao's prototype
AWQ / GPTQ were not tried. `--methods` takes any `Method`, so a new one (the compensated variant) joins the
table without changes here. Uses only swiftsvd's public surface (tests/test_layout.py checks it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchmark import machine_info
from rich.console import Console
from torch import nn

from swiftsvd_cli import (
    AllocateOptions,
    AllocationResult,
    CalibrateOptions,
    CompressOptions,
    DType,
    EvalOptions,
    FactorDType,
    Method,
    ModelSource,
    Strategy,
    allocate,
    calibrate,
    compress,
    evaluate,
    figures,
    load_compressed,
    load_model,
)
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.artifacts.store import atomic_write_json, atomic_write_text
from swiftsvd_cli.core.allocation import reference_bytes, weight_bytes
from swiftsvd_cli.model.architectures import arch_for, decoder_layers

console = Console()
ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = (Strategy.UNIFORM, Strategy.DYNAMIC)
MIB = 2**20
Maker = Callable[[Path], tuple[str, int, int | None]]
"""Writes a row's checkpoint into a scratch directory: (model to evaluate, stored bytes, in-memory bytes or None)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model spec (demo, local dir, .gguf)")
    parser.add_argument("--data", default="demo", help="calibration (train split) and evaluation (test split) text")
    parser.add_argument("--samples", type=int, help="calibration windows (default 32; quick 8)")
    parser.add_argument("--seqlen", type=int, help="calibration tokens per window (default 256; quick 32)")
    parser.add_argument("--eval-windows", type=int, help="perplexity windows (default 8; quick 2)")
    parser.add_argument("--eval-seqlen", type=int, help="perplexity window length (default 512; quick 32)")
    parser.add_argument("--ratios", help="kept-parameter ratios, comma separated (default 0.9,0.8,0.6; quick 0.8)")
    parser.add_argument("--bytes-ratios", help="byte budgets for int8 factors (default 0.5,0.25; quick 0.5)")
    parser.add_argument("--methods", default="swift", help="factorisations, comma separated (swiftsvd methods)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bytes")
    parser.add_argument("--work", type=Path, help="WORK directory (calibrated once, reused when valid)")
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    args = parser.parse_args(argv)
    args.samples = args.samples or (8 if args.quick else 32)
    args.seqlen = args.seqlen or (32 if args.quick else 256)
    args.eval_windows = args.eval_windows or (2 if args.quick else 8)
    args.eval_seqlen = args.eval_seqlen or (32 if args.quick else 512)
    args.ratios = tuple(float(r) for r in (args.ratios or ("0.8" if args.quick else "0.9,0.8,0.6")).split(","))
    budgets = args.bytes_ratios or ("0.5" if args.quick else "0.5,0.25")
    args.bytes_ratios = tuple(float(r) for r in budgets.split(","))
    args.methods = tuple(Method(m) for m in args.methods.split(","))
    args.work = args.work or args.out / "work"
    return args


def int4_group(shapes: dict[str, tuple[int, int]]) -> int:
    """The largest of 128, 64, 32, 16 dividing every target linear's input width (torchao needs whole groups)."""
    return next(g for g in (128, 64, 32, 16) if all(n % g == 0 for _, n in shapes.values()))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def int4_rtn(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, int, int]:
    """torchao's int4 round-to-nearest of `weight` (out, in): its dequantised weight, the bytes a checkpoint
    stores (codes two per byte + scale and zero point per group) and the bytes of torchao's CPU layout."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)))  # type: ignore[attr-defined]
    quantized: Any = linear.weight
    params = _nbytes(quantized.scale) + _nbytes(quantized.zero_point)
    codes = quantized.qdata.numel()
    return quantized.dequantize().to(weight.dtype), (codes + 1) // 2 + params, codes + params


def int4_factors(model: nn.Module, group: int) -> tuple[int, int]:
    """int4 RTN on every target linear of a (factored) model, in place: both factors of a factored one (the rank
    padded with zero rows of B / columns of A to whole groups of A's input), the weight of a dense one.
    Returns (stored, in-memory) bytes of the quantised weights."""
    spec = arch_for(model.config)
    stored = memory = 0
    for layer in decoder_layers(model, spec):
        for name in spec.modules:
            module: Any = layer.get_submodule(name)
            parts: list[tuple[Any, tuple[int, ...]]]
            if isinstance(module, nn.Linear):
                parts = [(module, (0, 0))]
            else:
                pad = -module.rank % group
                parts = [(module.B, (0, 0, 0, pad)), (module.A, (0, pad))]
            for part, padding in parts:
                weight = part.weight.detach()
                dequantised, on_disk, in_memory = int4_rtn(nn.functional.pad(weight, padding), group)
                with torch.no_grad():
                    part.weight.copy_(dequantised[: weight.shape[0], : weight.shape[1]])
                stored, memory = stored + on_disk, memory + in_memory
    return stored, memory


def int4_original(model: str, group: int, out: Path) -> tuple[str, int, int]:
    """The original with torchao int4 RTN on every target linear, saved dequantised into `out`."""
    loaded = load_model(model, dtype="float32", device="cpu")
    stored, memory = int4_factors(loaded.model, group)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return str(out), stored, memory


def plan_bytes(plan: RankPlan, factor_dtype: str | None) -> int:
    """Stored bytes of the target linears' weights under `plan` (16-bit values, or int8 codes + row scales)."""
    return sum(weight_bytes(p.m, p.n, p.rank, factor_dtype) for p in plan.modules)


def plans(args: argparse.Namespace) -> dict[tuple[str, str], AllocationResult]:
    """(target, strategy) -> rank plan and its path: kept ratios, and int8 byte budgets."""
    found: dict[tuple[str, str], AllocationResult] = {}
    for strategy in STRATEGIES:
        common: dict[str, Any] = dict(work=args.work, strategy=strategy, device="cpu", force=True, val_samples=4)
        for ratio in args.ratios:
            found[(f"ρ {ratio}", str(strategy))] = allocate(AllocateOptions(ratio=ratio, **common))
        for budget in args.bytes_ratios:
            options = AllocateOptions(bytes_ratio=budget, factor_dtype=FactorDType.INT8, **common)
            found[(f"{budget:.0%} of 16-bit bytes", str(strategy))] = allocate(options)
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source = ModelSource(args.model, dtype=DType.FLOAT32, device="cpu")
    calibration = CalibrateOptions(
        source=source, work=args.work, data=args.data, samples=args.samples, seqlen=args.seqlen
    )
    manifest = calibrate(calibration).manifest
    group = int4_group(manifest.shapes)
    reference = reference_bytes(list(manifest.shapes.values()) * manifest.model.num_layers)
    scratch = args.work.parent / "bytes-checkpoints"
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "kind": "swiftsvd-bytes-benchmark",
        "protocol": {
            "command": "python scripts/bench_bytes.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model,
            "model_id": manifest.model.model_id,
            "fingerprint": manifest.model.fingerprint,
            "calibration": {"data": manifest.settings.data_id, "samples": args.samples, "seqlen": args.seqlen},
            "eval": {"text": args.data, "split": "test", "windows": args.eval_windows, "seqlen": args.eval_seqlen},
            "bytes": "target linears' weights as stored: 16-bit floats, int8 codes + float32 scales, int4 codes "
            "packed two per byte + torchao's scale and zero point per group; biases, embeddings, LM head excluded",
            "reference_16bit_bytes": reference,
            "int4_group": group,
            "int4": "torchao IntxWeightOnlyConfig(int4, PerGroup(g)), symmetric, written dequantised; on factors "
            "the rank is padded to g",
            "int8": "swiftsvd --factor-dtype int8 (torchao Int8WeightOnlyConfig's codes; original: --ratio 1.0)",
            "dynamic": "paper Algorithm 2, delta 0.5, alpha by the 11-point grid on 4 calibration-text windows",
            "evaluated": "every row a checkpoint measured by swiftsvd's evaluate (float32, CPU)",
            "quick": args.quick,
        },
        "machine": machine_info(),
        "rows": rows,
    }

    def measure(make: Maker, **info: Any) -> None:
        """Write a row's checkpoint with `make`, evaluate it (in-memory bytes: eval's unless `make` says)."""
        start = time.perf_counter()
        out = scratch / f"row-{len(rows)}"
        shutil.rmtree(out, ignore_errors=True)
        model, stored, memory = make(out)
        options = EvalOptions(
            targets=(model,),
            tasks=(args.data,),
            seqlen=args.eval_seqlen,
            limit=args.eval_windows,
            dtype=DType.FLOAT32,
            device="cpu",
        )
        target = evaluate(options).targets[0]
        shutil.rmtree(out, ignore_errors=True)
        ppl = float(target.perplexity[args.data]["ppl"])
        memory = target.size["target_bytes"] if memory is None else memory
        row = {**info, "stored_bytes": stored, "memory_bytes": memory, "bytes_ratio": stored / reference, "ppl": ppl}
        rows.append({**row, "seconds": time.perf_counter() - start})
        atomic_write_json(args.out / "partial.json", result)
        console.print(f"  {_label(row):<58} {stored / MIB:8.2f} MiB  ppl {ppl:.4g}", soft_wrap=True)

    def compressed(plan: AllocationResult, method: Method, factor_dtype: FactorDType | None) -> Maker:
        def make(out: Path) -> tuple[str, int, None]:
            compress(CompressOptions(source, out=out, plan=plan.path, method=method, factor_dtype=factor_dtype))
            return str(out), plan_bytes(plan.plan, factor_dtype), None

        return make

    def int4_compressed(plan: AllocationResult, method: Method) -> Maker:
        def make(out: Path) -> tuple[str, int, int]:
            compressed(plan, method, None)(out)
            model, tokenizer = load_compressed(out)
            stored, memory = int4_factors(model, group)
            shutil.rmtree(out)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            return str(out), stored, memory

        return make

    full = AllocateOptions(args.work, 1.0, Strategy.UNIFORM, name="original", device="cpu", force=True)
    unfactored = allocate(full)  # every linear dense: with int8, the int8 original
    measure(lambda out: (args.model, reference, None), model="original", weights="16-bit")
    measure(compressed(unfactored, Method.SWIFT, FactorDType.INT8), model="original", weights="int8 RTN, per row")
    measure(lambda out: int4_original(args.model, group, out), model="original", weights=f"int4 RTN, g{group}")
    allocated = plans(args)
    for method in args.methods:
        for (target, strategy), plan in allocated.items():
            info = {"model": f"{method} {strategy}", "target": target, "ratio": plan.plan.target_ratio}
            info |= {"achieved_ratio": plan.plan.achieved_ratio, "alpha": plan.plan.alpha}
            budget = plan.plan.bytes_ratio is not None
            for weights in ("int8",) if budget else ("16-bit", "int8", "int4"):
                if weights == "int4":
                    make = int4_compressed(plan, method)
                else:
                    make = compressed(plan, method, FactorDType.INT8 if weights == "int8" else None)
                measure(make, **info, weights=f"{weights} factors")
    shutil.rmtree(scratch, ignore_errors=True)
    result["figures"] = [plot(rows, args.out / "bytes.png").name]
    atomic_write_json(args.out / "bytes.json", result)
    atomic_write_text(args.out / "README.md", markdown(result))
    (args.out / "partial.json").unlink(missing_ok=True)
    console.print(f"[green]wrote[/green] {args.out / 'bytes.json'}, README.md, bytes.png")
    return 0


def _label(row: dict[str, Any]) -> str:
    target = f" {row['target']}" if row.get("target") else ""
    return f"{row['model']}{target}, {row['weights']}"


def markdown(result: dict[str, Any]) -> str:
    protocol = result["protocol"]
    lines = [
        "# Perplexity vs bytes",
        "",
        f"Model `{protocol['model_id']}`; evaluation: {protocol['eval']['windows']} x {protocol['eval']['seqlen']} "
        f"tokens of `{protocol['eval']['text']}`; calibration {protocol['calibration']['samples']} x "
        f"{protocol['calibration']['seqlen']} tokens. Bytes: {protocol['bytes']}. int4: {protocol['int4']} "
        f"(g = {protocol['int4_group']}). int8: {protocol['int8']}. Dynamic plans: {protocol['dynamic']}.",
        "",
        f"Command: `{protocol['command']}`; {result['machine']['cpu']}, torch {result['machine']['torch']}.",
        "",
        "| model | ranks | weights | MiB stored | of 16-bit | MiB in memory | ρ kept | ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: -r["stored_bytes"]):
        ratio = f"{row['achieved_ratio']:.3f}" if "achieved_ratio" in row else "1"
        lines.append(
            f"| {row['model']} | {row.get('target', '')} | {row['weights']} | {row['stored_bytes'] / MIB:.1f} | "
            f"{row['bytes_ratio']:.1%} | {row['memory_bytes'] / MIB:.1f} | {ratio} | {row['ppl']:.2f} |"
        )
    lines += ["", "![perplexity vs bytes](bytes.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Perplexity (log) vs stored MiB: quantised originals as points, Swift-SVD as one line per strategy and
    factor dtype over ρ, byte-budget plans as stars."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    colours = {"16-bit": "C0", "int8": "C1", "int4": "C2"}
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x, y = row["stored_bytes"] / MIB, row["ppl"]
        colour = next(c for weights, c in colours.items() if row["weights"].startswith(weights))
        if row["model"] == "original":
            marker = {"C0": "s", "C1": "D", "C2": "v"}[colour]
            label = f"original, {row['weights']}"
            ax.scatter([x], [y], marker=marker, s=70, color=colour, edgecolors="black", zorder=4, label=label)
        elif str(row.get("target", "")).startswith("ρ"):
            lines.setdefault(f"{row['model']}, {row['weights']}", []).append((x, y))
        else:
            marker = "P" if "dynamic" in row["model"] else "*"
            label = f"{row['model']}, {row['target']}, int8 factors"
            ax.scatter([x], [y], marker=marker, s=150, color=colour, edgecolors="black", zorder=4, label=label)
    for label, points in lines.items():
        points.sort()
        colour = next(c for weights, c in colours.items() if f", {weights}" in label)
        style = "--" if "dynamic" in label else "-"
        ax.plot(*zip(*points, strict=True), ls=style, marker="o", ms=4, color=colour, label=f"{label} (ρ)")
    ax.set_yscale("log")
    ax.set_xlabel("MiB of the target linears as stored")
    ax.set_ylabel("perplexity (log)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Perplexity vs bytes: quantisation, low rank, and both")
    return figures.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
