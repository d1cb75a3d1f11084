"""Stage 3: apply a rank plan -> a compressed HF-style directory (factored, or `--merge`d dense), and its loader.

A factored directory is `config.json` with a `swiftsvd` section (format version, rank per module, plan
provenance), the tokenizer, and `model.safetensors` holding `<module>.A.weight` / `<module>.B.weight` for
each factored linear. `load_compressed` builds the model without weights, swaps in `LowRankLinear` modules
by the rank map, then loads the tensors: the model in memory really is smaller.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swiftsvd_cli import __version__
from swiftsvd_cli.allocate import check_ratio, load_complete_manifest
from swiftsvd_cli.architectures import arch_for, decoder_layers, target_linears
from swiftsvd_cli.artifacts import FORMAT_VERSION, atomic_write_json, make_temp_dir, sha256_file
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.log import progress
from swiftsvd_cli.lowrank import LowRankLinear, replace_module
from swiftsvd_cli.methods import FactorSource, check_method
from swiftsvd_cli.models import ModelSource, checkpoint_dtype, resolve_dtype
from swiftsvd_cli.plan import RankPlan

logger = logging.getLogger("swiftsvd")


@dataclass(frozen=True)
class CompressOptions:
    source: ModelSource
    out: Path
    plan: Path
    method: str = "swift"
    merge: bool = False
    force: bool = False


@dataclass(frozen=True)
class CompressResult:
    out: Path
    plan: RankPlan
    params_before: int
    params_after: int
    seconds: float


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite before any work is done."""
    if out.exists() and not force:
        raise SwiftSVDError(f"output {out} exists: pass --force to replace it or choose another --out")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_compress(options: CompressOptions) -> CompressResult:
    """Factor every planned linear of `options.source` and save the result to `options.out`."""
    check_output(options.out, options.force)
    check_method(options.method)
    start = time.perf_counter()
    plan = RankPlan.load(options.plan)
    check_ratio(plan.target_ratio)
    work = Path(plan.work)
    manifest = load_complete_manifest(work)
    if manifest.model.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(f"plan {options.plan} does not belong to the calibration in {work}")
    device = options.source.compute_device
    loaded = options.source.load()
    if loaded.fingerprint != plan.model.fingerprint:
        raise SwiftSVDError(
            f"plan {options.plan} was made for another model ({plan.model.model_id}), not '{options.source.model}'"
        )
    model = loaded.model
    spec = arch_for(model.config)
    before = count_parameters(model)
    dtype = next(model.parameters()).dtype
    ranks = plan.ranks(spec.layers)
    factors = FactorSource(options.method, work, manifest, spec, device)
    with progress() as bar:
        task = bar.add_task("factorising", total=manifest.model.num_layers)
        for index, layer in enumerate(decoder_layers(model, spec)):
            linears = target_linears(layer, spec)
            wanted = {p.module: p.rank for p in plan.modules if p.layer == index and not p.dense}
            for name, (A, B) in factors(index, linears, wanted).items():
                linear = linears[name]
                with torch.no_grad():
                    if options.merge:
                        linear.weight.copy_((A @ B).to(dtype))
                    else:
                        bias = None if linear.bias is None else linear.bias.detach()
                        replace_module(layer, name, LowRankLinear.from_factors(A, B, bias, dtype))
            bar.advance(task)
    if not options.merge:
        model.config.swiftsvd = {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "method": options.method,
            "strategy": plan.strategy,
            "alpha": plan.alpha,
            "target_ratio": plan.target_ratio,
            "achieved_ratio": plan.achieved_ratio,
            "ranks": ranks,
            "plan": str(options.plan.resolve()),
            "plan_sha256": sha256_file(options.plan),
            "base_model": plan.model.model_id,
            "base_fingerprint": plan.model.fingerprint,
        }
    save_directory(model, loaded.tokenizer, options.out)
    if options.merge:
        provenance = {
            "merged_from_plan": str(options.plan.resolve()),
            "method": options.method,
            "tool_version": __version__,
            "base_model": plan.model.model_id,
        }
        atomic_write_json(options.out / "swiftsvd.json", provenance)
    return CompressResult(options.out, plan, before, count_parameters(model), time.perf_counter() - start)


def save_directory(model: Any, tokenizer: Any, out: Path) -> None:
    """save_pretrained into a temp dir beside `out`, then swap it in: `out` is never half-written."""
    tmp = make_temp_dir(out.parent, out.name)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # only reached with --force
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_compressed(path: str | Path, dtype: str = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a factored directory: a working transformers model with the true smaller size."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    section = getattr(config, "swiftsvd", None)
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        raise SwiftSVDError(f"{path} is not a swiftsvd-compressed directory of format {FORMAT_VERSION}")
    torch_dtype = resolve_dtype(dtype, device, checkpoint_dtype(config))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)  # type: ignore[no-untyped-call]
    for name, rank in section["ranks"].items():
        linear = model.get_submodule(name)
        replace_module(
            model,
            name,
            LowRankLinear(
                linear.in_features,
                linear.out_features,
                rank,
                linear.bias is not None,
                device="meta",
                dtype=torch_dtype,
            ),
        )
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(str(file))
    state = {key: value.to(torch_dtype) if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SwiftSVDError(f"{path} lacks weights for {missing[0]} (and {len(missing) - 1} more): corrupt checkpoint?")
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)
