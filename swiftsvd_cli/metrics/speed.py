"""Size and speed of a loaded model: parameters, checkpoint bytes, peak memory, prefill and decode tokens/s.

These are the numbers that show whether compression *paid*: peers' users report compressed checkpoints that
silently reload at full size and no measured speedup, so we count parameters from the modules actually in
memory and time real `generate` calls.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` during the benchmark (weights + activations + KV
cache, as peers report). On CPU there is no allocator counter, so a sampling thread reads the process RSS
(psutil) every few milliseconds during the benchmark and we report `peak RSS - baseline RSS`, the baseline
taken by the caller before the model was loaded: weights plus inference working set, approximate
(sampling can miss short spikes, and the allocator may keep freed pages of an earlier model).

KV cache bytes per token are read off the cache a real prefill leaves behind (every tensor its layers
hold: keys and values, or latents and positions), divided by the tokens it holds: a measurement, not a
formula, so a latent cache that silently stored full keys would show.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftsvd_cli.config import BENCH_NEW_TOKENS, BENCH_PROMPT_LEN, BENCH_REPEATS
from swiftsvd_cli.errors import SwiftSVDError


@dataclass(frozen=True)
class SizeResult:
    """Parameter counts and bytes on disk."""

    params_total: int
    params_target_linear: int  # the projections compression targets (all decoder layers), as they are now
    params_target_dense: int | None  # the same modules at full rank (in * out + bias), None if unknown
    params_lowrank: int  # the part of params_target_linear held by factored (non-nn.Linear) modules
    lowrank_modules: int
    weights_bytes: int  # parameters + buffers in memory: exact, comparable across targets on any device
    checkpoint_bytes: int | None  # sum of *.safetensors (or *.bin / *.gguf) in the model directory
    target_bytes: int = 0  # the target linears' tensors in memory (codes + scales when quantised)

    @property
    def target_kept_ratio(self) -> float | None:
        """The paper's ρ as achieved in memory: kept share of the target linear parameters."""
        if not self.params_target_dense:
            return None
        return self.params_target_linear / self.params_target_dense


@dataclass(frozen=True)
class SpeedResult:
    """Throughput for a fixed synthetic prompt, greedy decoding of a fixed number of tokens."""

    prompt_len: int
    new_tokens: int
    batch_size: int
    repeats: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda_max_allocated" or "cpu_rss_delta"
    kv_cache_bytes_per_token: float  # all decoder layers together


def _target_modules(model: Any) -> list[Any] | None:
    """The compression targets of every decoder layer (architecture table); None for unknown families."""
    from swiftsvd_cli.model.architectures import ARCHITECTURES, family_of

    spec = ARCHITECTURES.get(family_of(getattr(model.config, "model_type", None)) or "")
    if spec is None:
        return None
    try:
        layers = model.get_submodule(spec.layers)
        return [layer.get_submodule(name) for layer in layers for name in spec.modules]
    except AttributeError:
        return None


def _fallback_targets(model: Any) -> list[Any]:
    """Every nn.Linear except the output head, for families the architecture table does not know."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def tensor_bytes(tensor: Any) -> int:
    """Real bytes of a tensor; a wrapper subclass (torchao's quantised tensors report their float dtype's
    element size) is counted by the plain tensors it holds (codes, scales, zero points)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel()) * int(tensor.element_size())


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers as stored in memory."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def _dense_numel(module: Any) -> int | None:
    """Parameters of the full-rank linear this module stands for (factored modules keep in/out_features)."""
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not isinstance(n_in, int) or not isinstance(n_out, int):
        return None
    bias = getattr(module, "bias", None)
    return n_in * n_out + (n_out if bias is not None else 0)


def checkpoint_bytes(location: Path | None) -> int | None:
    """Bytes of the weight files in a model directory (or of a single weight file); None if not local."""
    if location is None or not location.exists():
        return None
    if location.is_file():
        return location.stat().st_size
    for pattern in ("*.safetensors", "*.bin", "*.gguf"):
        files = sorted(location.glob(pattern))
        if files:
            return sum(f.stat().st_size for f in files)
    return None


def measure_size(model: Any, location: Path | None = None) -> SizeResult:
    """Parameter counts from the modules in memory (never from the config), and checkpoint bytes on disk.

    Int8 codes count as parameters (they are the weights, stored as integer buffers); bytes are real.
    """
    from swiftsvd_cli.model.hf.lowrank import LowRankLinear
    from swiftsvd_cli.model.hf.qlinear import weight_count

    targets = _target_modules(model)
    if targets is None:
        targets = _fallback_targets(model)
    dense = [_dense_numel(m) for m in targets]
    lowrank = [m for m in targets if isinstance(m, LowRankLinear)]
    return SizeResult(
        params_total=weight_count(model),
        params_target_linear=sum(weight_count(m) for m in targets),
        params_target_dense=None if any(d is None for d in dense) else sum(d or 0 for d in dense),
        params_lowrank=sum(weight_count(m) for m in lowrank),
        lowrank_modules=len(lowrank),
        weights_bytes=module_bytes(model),
        checkpoint_bytes=checkpoint_bytes(location),
        target_bytes=sum(module_bytes(m) for m in targets),
    )


def current_rss() -> int:
    """Resident set size of this process in bytes (the CPU baseline for peak memory)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@contextmanager
def _rss_sampler(interval_s: float = 0.01) -> Iterator[list[int]]:
    """Sample RSS in a background thread; the yielded list holds [peak] after the block."""
    peak = [current_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], current_rss())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], current_rss())


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor the layers of a transformers `Cache` hold."""
    import torch

    return sum(
        value.numel() * value.element_size()
        for layer in cache.layers
        for value in vars(layer).values()
        if isinstance(value, torch.Tensor)
    )


def measure_speed(
    model: Any,
    *,
    prompt_len: int = BENCH_PROMPT_LEN,
    new_tokens: int = BENCH_NEW_TOKENS,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = BENCH_REPEATS,
    rss_baseline: int | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Prefill and decode tokens/s (medians over `repeats`, after `warmup` >= 1 runs) on a synthetic prompt.

    Prefill: one forward pass over the prompt with a KV cache, logits of the last position only (as `generate`
    does: full-vocabulary logits of a long batched prompt would dominate the peak memory). Decode: greedy
    `generate` of `new_tokens` with
    `min_new_tokens` (no early stop on EOS) minus greedy `generate` of one token; the difference is the
    `new_tokens - 1` incremental steps, with generate's fixed overhead cancelled out.
    """
    import torch

    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or batch_size < 1:
        raise SwiftSVDError(
            "benchmark needs --bench-prompt-len >= 1, --bench-new-tokens >= 2, repeats >= 1, batch size >= 1"
        )
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).to(device)
    mask = torch.ones_like(prompt)
    on_cuda = device.type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    def timed(fn: Any) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def prefill() -> Any:
        return model(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1).cache

    def generate(n: int) -> None:
        model.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        # Memory is sampled during the warmup (same work as a timed run), so no thread runs while timing.
        with _rss_sampler() as rss_peak:
            for _ in range(max(1, warmup)):
                prefill()
                generate(new_tokens)
        t_prefill = statistics.median(timed(prefill) for _ in range(repeats))
        t_one = statistics.median(timed(lambda: generate(1)) for _ in range(repeats))
        t_all = statistics.median(timed(lambda: generate(new_tokens)) for _ in range(repeats))
        kv_bytes = cache_bytes(prefill())

    t_decode = t_all - t_one
    # Timer noise on a tiny model can make the difference non-positive; then fall back to the whole call.
    decode_tps = (new_tokens - 1) * batch_size / t_decode if t_decode > 0 else new_tokens * batch_size / t_all
    if on_cuda:
        peak, kind = int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    else:
        baseline = rss_baseline if rss_baseline is not None else 0
        peak, kind = (
            max(0, rss_peak[0] - baseline),
            "cpu_rss_delta" if rss_baseline is not None else "cpu_rss",
        )
    return SpeedResult(
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=batch_size,
        repeats=repeats,
        prefill_tokens_per_s=prompt_len * batch_size / t_prefill,
        decode_tokens_per_s=decode_tps,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        kv_cache_bytes_per_token=kv_bytes / (batch_size * prompt_len),
    )
