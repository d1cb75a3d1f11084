"""Latent KV cache, measured: memory and speed beside the original and the weight-only model, and exactness.

    python scripts/latent_kv_bench.py --weights DIR_W --latent DIR_L   # demo; writes benchmarks/latent_kv/

DIR_W is a factored directory (`compress --ratio 0.6`), DIR_L the same plan with `--kv-cache latent --kv-ratio R`.
1. `swiftsvd eval` of the three (held-out perplexity; bench: KV bytes per token, peak memory, prefill and decode
   tokens/s of one long batched generation).
2. Exactness of DIR_L against the same factored weights with a dense cache: perplexity of every window fed one
   token at a time through the latent cache vs one cache-free forward, and greedy generations of left-padded
   prompts compared token for token.
3. Values folded vs rebuilt (`fold_is_cheaper` forced each way) vs the automatic choice: decode tokens/s.
Writes latent_kv.json (results, protocol, machine) and latent_kv.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from benchmark import machine_info
from rich.console import Console
from transformers import DynamicCache

from swiftsvd_cli import EvalOptions, evaluate, load_compressed
from swiftsvd_cli.artifacts.store import atomic_write_json
from swiftsvd_cli.data.text import load_text, tokenize
from swiftsvd_cli.metrics.speed import measure_speed
from swiftsvd_cli.model.hf import latent_kv

console = Console()
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="demo")
    parser.add_argument("--weights", type=Path, required=True, help="factored directory, dense KV cache")
    parser.add_argument("--latent", type=Path, required=True, help="factored directory with --kv-cache latent")
    parser.add_argument("--data", default="demo", help="held-out text (test split)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="sequences per generation in the bench")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--values-new-tokens", type=int, default=32, help="decode steps timed per value mode")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "latent_kv")
    return parser.parse_args(argv)


def stepwise_nll(model: Any, windows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (b, seqlen - 1) with every window fed one token at a time through the model's cache."""
    cache = DynamicCache(config=model.config)
    nll = []
    with torch.inference_mode():
        for t in range(windows.shape[1] - 1):
            logits = model(input_ids=windows[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, windows[:, t + 1], reduction="none"))
    return torch.stack(nll, dim=1).double()


def full_nll(model: Any, windows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of cache-free forwards, a few windows at a time."""
    rows = []
    with torch.inference_mode():
        for batch in windows.split(4):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            rows.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none"))
    return torch.cat(rows).double()


def exactness(args: argparse.Namespace, latent: Any, reference: Any, tokenizer: Any) -> dict[str, Any]:
    ids = tokenize(tokenizer, load_text(args.data, "test").text)
    windows = ids[: args.windows * args.seqlen].view(args.windows, args.seqlen)
    cached, full = stepwise_nll(latent, windows), full_nll(reference, windows)
    prompts = [tokenizer.decode(windows[i, : 16 + 16 * i]) for i in range(min(8, args.windows))]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    greedy = dict(max_new_tokens=args.greedy_tokens, min_new_tokens=args.greedy_tokens, do_sample=False)
    with torch.inference_mode():
        got = latent.generate(**batch, **greedy, pad_token_id=tokenizer.pad_token_id)
        want = reference.generate(**batch, **greedy, pad_token_id=tokenizer.pad_token_id)
    return {
        "ppl_latent_stepwise": math.exp(float(cached.mean())),
        "ppl_factored_full_forward": math.exp(float(full.mean())),
        "max_token_nll_difference": float((cached - full).abs().max()),
        "windows": args.windows,
        "seqlen": args.seqlen,
        "greedy_prompts": len(prompts),
        "greedy_prompt_tokens": [int(n) for n in batch.attention_mask.sum(1)],
        "greedy_new_tokens": args.greedy_tokens,
        "greedy_identical_rows": int((got == want).all(dim=1).sum()),
    }


def value_modes(args: argparse.Namespace, latent: Any) -> dict[str, Any]:
    """Decode tokens/s with values folded, rebuilt, and chosen per call (the default)."""
    rule = latent_kv.fold_is_cheaper
    modes: dict[str, Any] = {"fold": lambda *a: True, "rebuild": lambda *a: False, "auto": rule}
    speeds = {}
    try:
        for name, choice in modes.items():
            latent_kv.fold_is_cheaper = choice
            result = measure_speed(
                latent, prompt_len=args.prompt_len, new_tokens=args.values_new_tokens, batch_size=args.batch, repeats=1
            )
            speeds[name] = result.decode_tokens_per_s
    finally:
        latent_kv.fold_is_cheaper = rule
    return {"decode_tokens_per_s": speeds, "batch": args.batch, "prompt_len": args.prompt_len}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["original", "weights only", "latent KV"]
    speeds = [t["speed"] for t in report["targets"]]
    panels = [
        ("KV cache per token (KiB)", [s["kv_cache_bytes_per_token"] / 1024 for s in speeds]),
        (f"peak memory ({speeds[0]['peak_memory_kind']}, MiB)", [s["peak_memory_bytes"] / 2**20 for s in speeds]),
        ("decode tokens/s", [s["decode_tokens_per_s"] for s in speeds]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for axis, (title, values) in zip(axes, panels, strict=True):
        axis.bar(names, values, color=["grey", "tab:blue", "tab:green"])
        axis.set_title(title, fontsize=10)
        for x, value in enumerate(values):
            axis.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    options = EvalOptions(
        targets=(args.original, str(args.weights), str(args.latent)),
        tasks=(args.data,),
        seqlen=args.seqlen,
        limit=args.windows,
        device="cpu",
        bench=True,
        bench_prompt_len=args.prompt_len,
        bench_new_tokens=args.new_tokens,
        bench_batch_size=args.batch,
        bench_repeats=1,
    )
    eval_report = evaluate(options)
    report = eval_report.to_dict()
    latent, tokenizer = load_compressed(args.latent)
    reference, _ = load_compressed(args.latent)
    latent_kv.uninstall_latent_kv(reference)
    result = {
        "kind": "swiftsvd-latent-kv",
        "command": "python scripts/latent_kv_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "eval": report,
        "latent_config": json.loads((args.latent / "config.json").read_text())["swiftsvd"],
        "exactness": exactness(args, latent, reference, tokenizer),
        "values": value_modes(args, latent),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "latent_kv.json", result)
    plot(report, args.out / "latent_kv.png")
    rows = {
        name: {"ppl": next(iter(target["perplexity"].values()))["ppl"], **target["speed"]}
        for name, target in zip(("original", "weights only", "latent KV"), report["targets"], strict=True)
    }
    console.print_json(data={"eval": rows, "exactness": result["exactness"], "values": result["values"]})
    return result


if __name__ == "__main__":
    main()
