"""Settings shared by the CLI, the stages and the one-shot pipeline: every default and every choice, defined once.

Imports nothing heavy (no torch): the CLI builds its `--help` from this module.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeVar

from swiftsvd_cli.errors import SwiftSVDError


class Choice(str, Enum):
    """A closed set of values for an option: Typer lists them in `--help` and its parser rejects typos."""

    def __str__(self) -> str:  # "dynamic", not "Strategy.DYNAMIC", in file names and messages
        return str(self.value)


class Strategy(Choice):
    """How ranks are spread over layers."""

    DYNAMIC = "dynamic"  # the paper's Algorithm 2, alpha by validation perplexity
    UNIFORM = "uniform"  # floor(m n / (m + n) · ρ) for every matrix
    GLOBAL = "global"  # eigen-directions across all matrices and layers by weighted loss per parameter


class Method(Choice):
    """How a matrix is factored at a given rank (the baselines run from the same calibration)."""

    SWIFT = "swift"  # ours: top eigenvectors of W G Wᵀ, optimal
    SVD = "svd"  # truncated SVD of W, activation-unaware
    ASVD = "asvd"  # ASVD's scaling: SVD of W diag(mean |x|)^0.5, at the plan's ranks (not its rank search)
    SVD_LLM = "svd-llm"  # SVD-LLM's Cholesky whitening at its released code's precisions
    SVD_LLM_FP64 = "svd-llm-fp64"  # ours: the same whitening in float64 throughout


class Sampler(Choice):
    """How calibration windows are drawn from the calibration text (swiftsvd_cli.data.text)."""

    TOKENS = "tokens"  # ours: seeded token windows at random positions of the whole tokenised text
    SVD_LLM = "svd-llm"  # SVD-LLM's get_calib_train_data: character offsets, each slice tokenised alone


class DType(Choice):
    """The dtype a model computes in; `auto` is float32 on CPU and the checkpoint's dtype on an accelerator."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class FactorDType(Choice):
    """How factors (and the target linears a plan leaves dense) are stored when not in the model's dtype."""

    INT8 = "int8"  # int8 codes + one float32 scale per row (torchao's int8 weight-only round-to-nearest)


class KVCache(Choice):
    """What a compressed model caches per token (`--kv-cache`)."""

    DENSE = "dense"  # full keys and values, as transformers does
    LATENT = "latent"  # the k/v latents B x; keys rebuilt and rotated with each token's own position


class GramProducts(Choice):
    """The precision of the Gram products in calibration; the sums are float64 either way (core.grams)."""

    AUTO = "auto"  # float64 on data-centre GPUs (full-rate float64), float32 on CPUs and consumer GPUs
    FLOAT64 = "float64"  # every product exact
    FLOAT32 = "float32"  # float32 products over chunks of at most 2048 tokens, each partial Gram added in float64


class Offload(Choice):
    """Where calibration hidden states wait between decoder layers."""

    MEMORY = "memory"
    DISK = "disk"  # a memory-mapped file in WORK, for hosts whose RAM cannot hold them


C = TypeVar("C", bound=Choice)

DATA = "wikitext2"
"""Calibration text: the field's (SVD-LLM's) WikiText-2 train split."""

SEED = 3
"""Seed of the random calibration window positions (SVD-LLM's 3; our default sampler still draws other windows)."""

SAMPLES, SEQLEN = 256, 2048
"""Calibration windows and tokens per window: the field's protocol (256 x 2048); SEQLEN is also eval's window."""

BATCH_SIZE = 4
"""Calibration windows per forward pass (also the windows per forward pass of the alpha search)."""

SAMPLER = Sampler.TOKENS
STRATEGY = Strategy.DYNAMIC
METHOD = Method.SWIFT
DTYPE = DType.AUTO
KV_CACHE = KVCache.DENSE
GRAM_PRODUCTS = GramProducts.AUTO
OFFLOAD = Offload.MEMORY

DELTA = 0.5
"""Algorithm 2's guaranteed share of the uniform rank per layer (the paper fixes 0.5)."""

VAL_SAMPLES = 16
"""Validation windows per α candidate of the dynamic strategy: 32,768 tokens at seqlen 2048. On the demo the
paired per-window spread of log-perplexity differences between two α candidates is 2-6 %, so 16 windows
separate candidates about 1 % apart at two standard errors (issue 11's note has the measurement)."""

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
"""The paper's α grid {0, 0.1, ..., 1} for Algorithm 2."""

TARGET_STEP = 0.01
"""Resolution of the kept ratio that `--target-ppl` finds (bisection: at most 8 evaluations)."""

SEARCH_ALPHA = 0.5
"""Algorithm 2's α while `--target-ppl` bisects ρ (a grid point; the α grid search then runs at the ρ found)."""

EVAL_TASKS = "wikitext2"
EVAL_BATCH_SIZE = 1
"""Perplexity windows (or lm-eval requests) per forward pass in `eval`."""

BENCH_PROMPT_LEN, BENCH_NEW_TOKENS, BENCH_BATCH_SIZE, BENCH_REPEATS = 128, 32, 1, 3
"""`eval --bench`: prompt tokens, greedy new tokens, sequences per call, timed repeats (the median is reported)."""

DEVICE_PATTERN = re.compile(r"auto|(cpu|cuda|mps|xpu)(:\d+)?")


def check_ratio(ratio: float) -> None:
    """ρ is the kept fraction: (0, 1], anything else is a user error."""
    if not 0.0 < ratio <= 1.0:
        raise SwiftSVDError(f"--ratio {ratio} is outside (0, 1]: it is the fraction of parameters kept (0.8 keeps 80%)")


def check_device(device: str | None) -> str | None:
    """`cpu`, `cuda`, `cuda:1`, `mps`, `xpu`, `auto` (or None: cuda if available); anything else is a user error."""
    if device is not None and not DEVICE_PATTERN.fullmatch(device):
        raise SwiftSVDError(f"unknown device '{device}': use cpu, cuda, cuda:N, mps, xpu or auto")
    return device


def choice(kind: type[C], value: str) -> C:
    """`value` as a member of `kind` (API callers may pass plain strings); an unknown one lists the valid ones."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(member.value for member in kind)
        raise SwiftSVDError(f"unknown {kind.__name__.lower()} '{value}': use one of {valid}") from None
