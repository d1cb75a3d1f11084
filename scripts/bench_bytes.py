"""Bytes, not parameters: perplexity vs stored bytes of Swift-SVD, quantisation, and both stacked.

    python scripts/bench_bytes.py --work /tmp/bytes-work            # demo model + text, writes benchmarks/bytes/
    python scripts/bench_bytes.py --quick --model DIR --data corpus.txt --out /tmp/bytes   # CI smoke run

Every row is a model evaluated on the same held-out windows, and its target linears' bytes as a checkpoint
stores them (embeddings and the LM head are the same in every row and left out):
- the original (16-bit: what a bf16 checkpoint stores; evaluated in float32),
- round-to-nearest weight-only quantisation of the original through torchao: int8 per row
  (`Int8WeightOnlyConfig`) and int4 per group (`IntxWeightOnlyConfig(int4, PerGroup(g))`, symmetric),
- Swift-SVD (uniform and dynamic plans at kept ratios ρ) with 16-bit factors, int8 factors (swiftsvd's own
  `--factor-dtype int8` modules) and int4 factors (the same torchao int4 config on A and B),
- int8 factors at the largest ranks that fit a byte budget (`--bytes-ratio`).
int4 bytes count the codes packed two per byte, plus torchao's scale and zero point per group; torchao's CPU
layout holds the codes one per byte in memory, which the `memory` column shows. No GPTQ / AWQ: their packages
target CUDA, and torchao's prototype AWQ / GPTQ were not tried. `--methods` takes any factorisation
`swiftsvd allocate --method` knows, so a new one (the compensated variant) joins the table unchanged.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchmark import machine_info
from rich.console import Console
from torch import nn

from swiftsvd_cli.artifacts.manifest import load_complete_manifest
from swiftsvd_cli.artifacts.store import atomic_write_json, atomic_write_text
from swiftsvd_cli.core.allocation import reference_bytes
from swiftsvd_cli.data.text import load_text, tokenize
from swiftsvd_cli.config import Method
from swiftsvd_cli.engine.eigen import load_eigen_index, load_matching_model
from swiftsvd_cli.engine.factors import FactorSource, apply_factors
from swiftsvd_cli.figures import pyplot, save_figure
from swiftsvd_cli.log import setup_logging
from swiftsvd_cli.metrics.perplexity import perplexity
from swiftsvd_cli.metrics.speed import tensor_bytes
from swiftsvd_cli.model.architectures import ArchSpec, arch_for, decoder_layers
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.model.hf.lowrank import LowRankLinear
from swiftsvd_cli.model.quantize import import_torchao
from swiftsvd_cli.stages.allocate import AllocateOptions, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate

console = Console()
ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("uniform", "dynamic")
MIB = 2**20


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


def target_modules(model: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Every target linear (or what replaced it) by its full name."""
    return {
        f"{spec.layers}.{index}.{name}": layer.get_submodule(name)
        for index, layer in enumerate(decoder_layers(model, spec))
        for name in spec.modules
    }


def int4_group(model: nn.Module, spec: ArchSpec) -> int:
    """The largest of 128, 64, 32, 16 dividing every target linear's input width (torchao needs whole groups)."""
    widths = {m.in_features for m in target_modules(model, spec).values()}
    return next(g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths))


def _stored(tensor: torch.Tensor, parameter: bool) -> int:
    """Bytes a checkpoint stores: float weights at 16 bits, int4 codes two per byte, everything else as is."""
    if type(tensor).__name__ == "IntxUnpackedToInt8Tensor" and tensor.target_dtype == torch.int4:  # type: ignore[attr-defined]
        inner = tensor_bytes(tensor.scale) + tensor_bytes(tensor.zero_point)  # type: ignore[attr-defined]
        return (tensor.qdata.numel() + 1) // 2 + inner  # type: ignore[attr-defined]
    if parameter and type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point():
        return 2 * tensor.numel()
    return tensor_bytes(tensor)


def target_sizes(model: nn.Module, spec: ArchSpec) -> dict[str, int]:
    """Stored and in-memory bytes of the target linears' weights (biases excluded: equal in every row)."""
    stored = memory = 0
    for module in target_modules(model, spec).values():
        tensors = [(n, t, True) for n, t in module.named_parameters()] + [
            (n, t, False) for n, t in module.named_buffers()
        ]
        for name, tensor, parameter in tensors:
            if name.endswith("bias"):
                continue
            stored += _stored(tensor, parameter)
            memory += tensor_bytes(tensor)
    return {"stored_bytes": stored, "memory_bytes": memory}


def quantize_linears(model: nn.Module, names: set[str], config: Any) -> None:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=lambda _, fqn: fqn in names)


def int4_config(group: int) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def int4_factors(model: nn.Module, spec: ArchSpec, group: int) -> None:
    """torchao int4 on both factors; the rank is padded with zero rows / columns to whole groups of A's input."""
    names: set[str] = set()
    for name, module in target_modules(model, spec).items():
        if not isinstance(module, LowRankLinear):
            names.add(name)
            continue
        pad = -module.rank % group
        with torch.no_grad():
            module.B.weight = nn.Parameter(nn.functional.pad(module.B.weight, (0, 0, 0, pad)))
            module.A.weight = nn.Parameter(nn.functional.pad(module.A.weight, (0, pad)))
        module.B.out_features = module.A.in_features = module.rank + pad
        names |= {f"{name}.A", f"{name}.B"}
    quantize_linears(model, names, int4_config(group))


def original_rows(base: nn.Module, spec: ArchSpec, group: int, measure: Callable[..., None]) -> None:
    """The original, and its int8 and int4 round-to-nearest quantisations through torchao."""
    from torchao.quantization import Int8WeightOnlyConfig

    measure(base, model="original", weights="16-bit")
    names = set(target_modules(base, spec))
    for weights, config in (("int8 RTN, per row", Int8WeightOnlyConfig()), (f"int4 RTN, g{group}", int4_config(group))):
        model = copy.deepcopy(base)
        quantize_linears(model, names, config)
        measure(model, model="original", weights=weights)


def plans(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """(target, strategy) -> rank plan: kept ratios, and int8 byte budgets."""
    found: dict[tuple[str, str], Any] = {}
    for strategy in STRATEGIES:
        common = dict(work=args.work, strategy=strategy, device="cpu", force=True, val_samples=4)
        for ratio in args.ratios:
            found[(f"ρ {ratio}", strategy)] = run_allocate(AllocateOptions(ratio=ratio, **common)).plan  # type: ignore[arg-type]
        for budget in args.bytes_ratios:
            options = AllocateOptions(bytes_ratio=budget, factor_dtype="int8", **common)  # type: ignore[arg-type]
            found[(f"{budget:.0%} of 16-bit bytes", strategy)] = run_allocate(options).plan
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    import_torchao()
    args.out.mkdir(parents=True, exist_ok=True)
    source = ModelSource(args.model, dtype="float32", device="cpu")
    calibration = CalibrateOptions(
        source=source, work=args.work, data=args.data, samples=args.samples, seqlen=args.seqlen
    )
    manifest = run_calibrate(calibration).manifest
    loaded = load_matching_model(manifest, args.model, "cpu")
    base, spec = loaded.model, arch_for(loaded.model.config)
    text = load_text(args.data, "test")
    ids = tokenize(loaded.tokenizer, text.text)
    group = int4_group(base, spec)
    shapes = [(m.out_features, m.in_features) for m in target_modules(base, spec).values()]
    reference = reference_bytes(shapes)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "kind": "swiftsvd-bytes-benchmark",
        "protocol": {
            "command": "python scripts/bench_bytes.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model,
            "model_id": manifest.model.model_id,
            "fingerprint": manifest.model.fingerprint,
            "calibration": {"data": manifest.settings.data_id, "samples": args.samples, "seqlen": args.seqlen},
            "eval": {"text": text.id, "windows": args.eval_windows, "seqlen": args.eval_seqlen},
            "bytes": "target linears' weights as stored: 16-bit floats, int8 codes + float32 scales, int4 codes "
            "packed two per byte + torchao's scale and zero point per group; biases, embeddings, LM head excluded",
            "reference_16bit_bytes": reference,
            "int4_group": group,
            "int4": "torchao IntxWeightOnlyConfig(int4, PerGroup(g)), symmetric; on factors the rank is padded to g",
            "int8": "torchao Int8WeightOnlyConfig (original); swiftsvd Int8Linear, torchao's codes (factors)",
            "dynamic": "paper Algorithm 2, delta 0.5, alpha by the 11-point grid on 4 calibration-text windows",
            "quick": args.quick,
        },
        "machine": machine_info(),
        "rows": rows,
    }

    def measure(net: nn.Module, **info: Any) -> None:
        start = time.perf_counter()
        ppl = perplexity(net, ids, seqlen=args.eval_seqlen, limit=args.eval_windows).ppl
        sizes = target_sizes(net, spec)
        row = {**info, **sizes, "bytes_ratio": sizes["stored_bytes"] / reference, "ppl": ppl}
        rows.append({**row, "seconds": time.perf_counter() - start})
        atomic_write_json(args.out / "partial.json", result)
        console.print(f"  {_label(row):<58} {sizes['stored_bytes'] / MIB:8.2f} MiB  ppl {ppl:.4g}", soft_wrap=True)

    original_rows(base, spec, group, measure)
    allocated = plans(args)
    manifest = load_complete_manifest(args.work)  # now with the eigenbases the plans computed
    for method in args.methods:
        factors = FactorSource(method, args.work, manifest, load_eigen_index(args.work, manifest), spec, "cpu")
        for (target, strategy), plan in allocated.items():
            budget = plan.bytes_ratio is not None
            for weights in ("int8",) if budget else ("16-bit", "int8", "int4"):
                model = copy.deepcopy(base)
                apply_factors(model, spec, plan.rank_map(), factors, factor_dtype="int8" if weights == "int8" else None)
                if weights == "int4":
                    int4_factors(model, spec, group)
                info = {"model": f"{method} {strategy}", "target": target, "weights": f"{weights} factors"}
                measure(model, **info, ratio=plan.target_ratio, achieved_ratio=plan.achieved_ratio, alpha=plan.alpha)
                del model
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
    plt = pyplot()
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
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
