"""Scale probe: calibrate -> allocate -> compress on a random-weight model with a real large model's layer shapes.

    python scripts/scale_probe.py --shape llama-2-7b --layers 2 4        # writes benchmarks/scale/llama-2-7b.json
    python scripts/scale_probe.py --table                                  # benchmarks/scale/README.md from the JSONs

The model is built here, without the hub: the real config (hidden size, MLP width, heads, KV heads, vocabulary)
with `--layers N` decoder layers, random weights saved as bfloat16 safetensors, and a small BPE tokenizer trained
on this repository's text (calibration uses the bundled demo text). Each stage runs in a fresh process, so its
peak host RSS (and peak device memory) is its own: calibrate, eigendecompositions (`allocate --strategy
uniform`), the α search (`allocate`, dynamic, with the eigenbases cached) and compress. Disk is measured per
artifact. Two or more layer counts give per-layer costs as the slope of a linear fit (fixed costs such as
embeddings drop out), extrapolated to the full depth; one layer count gives an upper bound (the total divided by
the layers). The dry-run footprint of the full model at the field's protocol (256 x 2048 tokens) is recorded
beside the measurements. Uses only the public Python API.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, num_hidden_layers=40, vocab_size=32000),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, num_hidden_layers=80, vocab_size=32000),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064, rope_theta=1000000.0),
}  # fmt: skip
STAGES = ("calibrate", "eigen", "alpha", "compress")
GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="the real model whose layer shapes to use")
    parser.add_argument("--layers", type=int, nargs="+", default=[2], help="decoder layer counts to probe")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (8 x 512 = 4096: full-rank Grams)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--val-samples", type=int, default=1, help="validation windows per α candidate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/swiftsvd-scale"), help="models and WORKs (deleted)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale")
    parser.add_argument("--table", action="store_true", help="only rebuild OUT/README.md from the JSON files")
    args = parser.parse_args(argv)
    if not args.table and args.shape is None:
        parser.error("--shape is required (or --table)")
    return args


def tokenizer(scratch: Path) -> Path:
    """A 4096-token byte-level BPE trained on this repository's text (seconds), saved once under `scratch`.

    With random weights the text is immaterial; the probe calibrates on the bundled demo text (`data="demo"`).
    """
    folder = scratch / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = [*ROOT.glob("*.md"), *sorted((ROOT / "swiftsvd_cli").rglob("*.py"))]
    text = "\n".join(file.read_text(encoding="utf-8") for file in files)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(folder)
    return folder


def config_for(shape: str, layers: int) -> Any:
    from transformers import AutoConfig

    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    values |= dict(num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=4096)
    config = AutoConfig.for_model(model_type, **values)
    config.dtype = "bfloat16"
    return config


def build_model(shape: str, layers: int, folder: Path, tokenizer_dir: Path) -> int:
    """Random bfloat16 weights with the real shapes (std 0.02, norms 1), one safetensors shard per decoder layer
    (plus one for the rest), written one shard at a time; its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = config_for(shape, layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parts: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in model.named_parameters():  # untied: every tensor once
        parts.setdefault(".".join(name.split(".")[:3]) if ".layers." in name else "rest", []).append(
            (name, tensor.shape)
        )
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for number, members in enumerate(parts.values()):
        file = f"model-{number + 1:05d}-of-{len(parts):05d}.safetensors"
        tensors = {}
        for name, size in members:
            if len(size) == 1:  # norms (and Qwen2's q/k/v biases, zero)
                value = torch.ones(size) if "norm" in name else torch.zeros(size)
            else:
                value = torch.randn(size, generator=generator) * 0.02
            tensors[name] = value.to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return folder_bytes(folder)


def run_stage(stage: str, settings: dict[str, Any], queue: Any) -> None:
    """One stage in this (fresh) process; puts its seconds, peak RSS and peak device memory on `queue`."""
    import logging

    import torch

    from swiftsvd_cli import (
        AllocateOptions,
        CalibrateOptions,
        CompressOptions,
        ModelSource,
        Strategy,
        allocate,
        calibrate,
        compress,
    )

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, work, device = settings["model"], Path(settings["work"]), settings["device"]
    start = time.perf_counter()
    if stage == "calibrate":
        source = ModelSource(model, device=device)
        calibrate(CalibrateOptions(source, work, "demo", settings["samples"], settings["seqlen"], batch_size=4))
    elif stage in ("eigen", "alpha"):
        strategy = Strategy.UNIFORM if stage == "eigen" else Strategy.DYNAMIC
        options = AllocateOptions(work=work, ratio=settings["ratio"], strategy=strategy, device=device,
                                  val_samples=settings["val_samples"])  # fmt: skip
        allocate(options)
    else:
        plan = work / "plans" / f"ratio-{settings['ratio']:.2f}-dynamic.json"
        compress(CompressOptions(ModelSource(model, device=device), Path(settings["out"]), plan))
    seconds = time.perf_counter() - start
    device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    queue.put({"seconds": seconds, "peak_rss_bytes": rss, "peak_device_bytes": device_peak})


def in_child(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run_stage, args=(stage, settings, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"stage {stage} failed (exit code {process.exitcode})")
    result: dict[str, Any] = queue.get()
    return result


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(file.stat().st_size for file in path.glob(pattern))


def probe(args: argparse.Namespace, layers: int, tokenizer_dir: Path) -> dict[str, Any]:
    """Build an N-layer model, run the four stages, measure; the scratch folder is deleted afterwards."""
    scratch = args.scratch / f"{args.shape}-{layers}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        model, work, out = scratch / "model", scratch / "work", scratch / "compressed"
        original = build_model(args.shape, layers, model, tokenizer_dir)
        settings = dict(model=str(model), work=str(work), out=str(out), device=args.device, samples=args.samples,
                        seqlen=args.seqlen, ratio=args.ratio, val_samples=args.val_samples)  # fmt: skip
        stages = {stage: in_child(stage, settings) for stage in STAGES}
        manifest = json.loads((work / "manifest.json").read_text())
        plan = json.loads((work / "plans" / f"ratio-{args.ratio:.2f}-dynamic.json").read_text())
        return {
            "layers": layers,
            "stages": stages,
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in stages.values()),
            "peak_device_bytes": max(s["peak_device_bytes"] for s in stages.values()),
            "disk": {
                "original_bytes": original,
                "covariance_bytes": folder_bytes(work / "covariance"),
                "eigen_bytes": folder_bytes(work / "eigen"),
                "work_bytes": sum(f.stat().st_size for f in work.rglob("*") if f.is_file()),
                "compressed_bytes": folder_bytes(out),
            },
            "gram_precision": manifest["settings"]["gram_precision"],
            "achieved_ratio": plan["achieved_ratio"],
            "alpha": plan["alpha"],
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fit(runs: list[dict[str, Any]], value: Any) -> tuple[float, float]:
    """(fixed, per layer) of value(run) = fixed + per_layer x layers, least squares; one run: (0, value / layers)."""
    xs = [run["layers"] for run in runs]
    ys = [float(value(run)) for run in runs]
    if len(set(xs)) < 2:
        return 0.0, ys[0] / xs[0]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def extrapolate(shape: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    layers = SHAPES[shape]["num_hidden_layers"]
    out: dict[str, Any] = {"layers": layers}
    for stage in STAGES:
        fixed, per_layer = fit(runs, lambda run, s=stage: run["stages"][s]["seconds"])
        out[f"{stage}_s_per_layer"] = per_layer
        out[f"{stage}_s"] = fixed + per_layer * layers
    for key in ("covariance_bytes", "eigen_bytes", "work_bytes", "compressed_bytes", "original_bytes"):
        fixed, per_layer = fit(runs, lambda run, k=key: run["disk"][k])
        out[f"{key}_per_layer"] = per_layer
        out[key] = fixed + per_layer * layers
    fixed, per_layer = fit(runs, lambda run: run["peak_rss_bytes"])
    out["peak_rss_bytes"], out["peak_rss_bytes_per_layer"] = fixed + per_layer * layers, per_layer
    return out


def full_model_footprint(shape: str, scratch: Path, device: str) -> dict[str, Any]:
    """`calibrate --dry-run` of the full-depth model at the field's protocol (256 x 2048), from its config alone."""
    from swiftsvd_cli import CalibrateOptions, ModelSource, footprint

    folder = scratch / f"{shape}-config"
    config_for(shape, SHAPES[shape]["num_hidden_layers"]).save_pretrained(folder)
    try:
        need = footprint(CalibrateOptions(ModelSource(str(folder), device=device), scratch / "unused", "demo"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "samples": 256,
        "seqlen": 2048,
        "covariance_bytes": need.covariance_bytes,
        "eigen_bytes": need.eigen_bytes,
        "hidden_bytes": need.hidden_bytes,
        "host_bytes": need.host_bytes,
        "device_bytes": need.device_bytes,
    }


def machine() -> dict[str, Any]:
    import os
    import platform

    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def table(out: Path) -> str:
    """The README table: one row per probed shape, measured per layer and extrapolated to the full model."""
    lines = [
        "# Scale probe: random-weight models with real layer shapes",
        "",
        "Written by `scripts/scale_probe.py` (see its docstring). Per decoder layer: measured (slope over the probed",
        "layer counts); full model: extrapolated to the real depth. Times are of the machine in each JSON (CPU runs",
        "here: 2 cores, float32 compute; a GPU is one to two orders of magnitude faster per layer). WORK = Grams +",
        "eigenbases at default settings; `dry run` = the footprint `calibrate --dry-run` prints for the full model",
        "at 256 x 2048 calibration tokens.",
        "",
        "| model | probed layers | calibrate s/layer | eigen s/layer | α search s/layer | compress s/layer "
        "| WORK GB/layer | WORK GB full | dry run: WORK GB, host RAM GB | peak RSS GB (per extra layer) "
        "| checkpoint GB: original -> ρ 0.5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text())
        full, dry = result["extrapolated"], result["dry_run_full_model"]
        probed = ", ".join(str(run["layers"]) for run in result["runs"])
        lines.append(
            f"| {result['shape']} ({full['layers']} layers) | {probed} | {full['calibrate_s_per_layer']:.1f} | "
            f"{full['eigen_s_per_layer']:.1f} | {full['alpha_s_per_layer']:.1f} | {full['compress_s_per_layer']:.1f} | "
            f"{full['work_bytes_per_layer'] / GB:.2f} | {full['work_bytes'] / GB:.1f} | "
            f"{(dry['covariance_bytes'] + dry['eigen_bytes']) / GB:.1f}, {dry['host_bytes'] / GB:.1f} | "
            f"{max(run['peak_rss_bytes'] for run in result['runs']) / GB:.2f} "
            f"({full['peak_rss_bytes_per_layer'] / GB:+.2f}) | "
            f"{full['original_bytes'] / GB:.1f} -> {full['compressed_bytes'] / GB:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        args.scratch.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = tokenizer(args.scratch)
        runs = []
        for layers in args.layers:
            runs.append(probe(args, layers, tokenizer_dir))
            print(json.dumps(runs[-1]), flush=True)
        result = {
            "kind": "swiftsvd-scale-probe",
            "shape": args.shape,
            "config": SHAPES[args.shape],
            "settings": {
                k: v for k, v in vars(args).items() if k in ("samples", "seqlen", "ratio", "val_samples", "device")
            },
            "runs": runs,
            "extrapolated": extrapolate(args.shape, runs),
            "dry_run_full_model": full_model_footprint(args.shape, args.scratch, args.device),
            "machine": machine(),
            "command": "python scripts/scale_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        (args.out / f"{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "README.md").write_text(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
