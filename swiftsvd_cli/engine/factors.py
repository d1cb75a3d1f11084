"""Factorisation methods, all fed by the same WORK: Swift-SVD (ours) and the baselines it is measured against.

`swift`: A = U_k, B = U_kᵀ W from the cached eigenbasis (optimal for ‖WX − W'X‖).
`svd`: truncated SVD of W (activation-unaware).
`asvd`: ASVD's scaling, SVD of W diag(mean|x|^0.5) folded back, at the plan's ranks (not ASVD's own
sensitivity-based rank search).
`svd-llm`: SVD-LLM's Cholesky whitening as its released code runs it (Gram in float32, Cholesky + inverse
in float64, SVD in float32; shifted when G is not positive definite).
`svd-llm-fp64`: ours, not theirs: the same whitening in float64 throughout.
Ranks always come from a plan, so methods differ only in the factorisation: a uniform plan gives SVD-LLM its
paper's ranks ("SVD-LLM (W)"), a dynamic one gives every method Swift-SVD's Algorithm 2 ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.eigen import EigenIndex, eigen_tensors
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.config import Method, choice
from swiftsvd_cli.core.allocation import is_dense
from swiftsvd_cli.core.baselines import FLOAT64, RELEASED, SVDLLMPrecisions, asvd_factors, svd_factors, svd_llm_factors
from swiftsvd_cli.core.linalg import factorize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import ArchSpec, decoder_layers, target_linears
from swiftsvd_cli.model.hf.lowrank import LowRankLinear, replace_module
from swiftsvd_cli.model.quantize import quantize_module

logger = logging.getLogger("swiftsvd")
INPUT_STATISTIC = {Method.ASVD: "abs_sum", Method.SVD_LLM: "gram", Method.SVD_LLM_FP64: "gram"}
"""What each baseline reads from the covariance shards, per input group: ASVD the per-channel Σ|x| (with the
token count), SVD-LLM the input Gram G itself. `swift` reads only the eigen shards, `svd` only the weights."""
SVD_LLM_PRECISIONS: dict[Method, SVDLLMPrecisions] = {Method.SVD_LLM: RELEASED, Method.SVD_LLM_FP64: FLOAT64}
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
RankMap = dict[tuple[int, str], int]  # (layer index, module path in the layer) -> rank


class FactorSource:
    """Callable (layer index, linears, ranks) -> factors for one method over one WORK.

    Each shard is hashed the first time this source reads it; later reads (the α search reconstructs every
    layer once per candidate) only check its size.
    """

    def __init__(
        self,
        method: str,
        work: Path,
        manifest: CalibrationManifest,
        eigen: EigenIndex,
        spec: ArchSpec,
        device: str,
    ) -> None:
        self.method = choice(Method, method)
        self.work, self.manifest, self.eigen, self.spec, self.device = work, manifest, eigen, spec, device
        self._verified: set[str] = set()

    def _read(self, shard: store.Shard, expect: dict[str, store.TensorSpec]) -> dict[str, torch.Tensor]:
        tensors = store.read_shard(self.work, shard, verify=shard.file not in self._verified, expect=expect)
        self._verified.add(shard.file)
        return tensors

    def _statistic(self, stats: dict[str, torch.Tensor], index: int, name: str) -> torch.Tensor:
        """The input statistic this baseline needs for module `name`, or an error saying what is missing."""
        key = f"{self.spec.group_of(name)}.{INPUT_STATISTIC[self.method]}"
        if key not in stats:
            raise SwiftSVDError(
                f"{self.work} has no '{key}' in layer {index}'s covariance shard, which method '{self.method}' "
                "needs: recalibrate into a WORK that keeps the input statistics"
            )
        return stats[key].to(self.device)

    def __call__(self, index: int, linears: dict[str, nn.Linear], ranks: dict[str, int]) -> Factors:
        """(A, B) for the modules of layer `index` listed in `ranks` (module path -> rank), in the method's
        working precision (float64; float32 for `svd-llm`, whose SVD runs in float32)."""
        if not ranks:
            return {}
        device = self.device
        weights = {name: linears[name].weight.detach().to(device=device, dtype=torch.float64) for name in ranks}
        if self.method == Method.SWIFT:
            record = self.eigen.layers.get(index)
            if record is None or record.gram_sha256 != self.manifest.layers[index].shard.sha256:
                raise SwiftSVDError(
                    f"{self.work} has no eigenbasis of layer {index}'s current Gram: rerun `swiftsvd allocate`"
                )
            bases = self._read(record.shard, eigen_tensors(self.manifest.shapes, self.spec.modules))
            return {
                name: factorize(W, bases[f"{name}.vectors"].to(device=device, dtype=torch.float64), ranks[name])
                for name, W in weights.items()
            }
        if self.method == Method.SVD:
            return {name: svd_factors(W, ranks[name]) for name, W in weights.items()}
        stats = self._read(self.manifest.layers[index].shard, self.manifest.gram_tensors(self.spec.groups))
        tokens = float(stats["tokens"])
        factors: Factors = {}
        for name, W in weights.items():
            statistic = self._statistic(stats, index, name)
            if self.method == Method.ASVD:
                factors[name] = asvd_factors(W, statistic / tokens, ranks[name])
            else:
                result = svd_llm_factors(W, statistic, ranks[name], SVD_LLM_PRECISIONS[self.method])
                if result.shifted:
                    logger.info(
                        "%s: layer %d %s: Gram not positive definite, shifted (as SVD-LLM does)",
                        self.method,
                        index,
                        name,
                    )
                factors[name] = (result.A, result.B)
        return factors


def wanted_ranks(ranks: RankMap, index: int, linears: dict[str, nn.Linear]) -> dict[str, int]:
    """The modules of layer `index` that `ranks` factors (a rank at or past break-even keeps a module dense)."""
    return {
        name: k
        for (i, name), k in ranks.items()
        if i == index and not is_dense(linears[name].out_features, linears[name].in_features, k)
    }


def apply_factors(
    model: nn.Module,
    spec: ArchSpec,
    ranks: RankMap,
    factors_of: Callable[[int, dict[str, nn.Linear], dict[str, int]], Factors],
    *,
    merge: bool = False,
    factor_dtype: str | None = None,
    on_layer: Callable[[], None] = lambda: None,
) -> None:
    """Factor `model` in place, layer by layer, with `install_factors`."""
    dtype = next(model.parameters()).dtype
    for index, layer in enumerate(decoder_layers(model, spec)):
        linears = target_linears(layer, spec)
        factors = factors_of(index, linears, wanted_ranks(ranks, index, linears))
        install_factors(layer, linears, factors, merge=merge, factor_dtype=factor_dtype, dtype=dtype)
        on_layer()


def install_factors(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    factors: Factors,
    *,
    merge: bool,
    factor_dtype: str | None,
    dtype: torch.dtype,
) -> None:
    """Put each (A, B) of `factors` in `layer`: a `LowRankLinear` (or, with `merge`, its dense A B in place).

    With `factor_dtype` "int8" every linear of `linears` is then stored quantised: both factors of a factored
    one, the weight of one left dense. Factors are quantised from float32, not from the model's `dtype`.
    """
    build_dtype = torch.float32 if factor_dtype is not None else dtype
    for name, (A, B) in factors.items():
        linear = linears[name]
        with torch.no_grad():
            if merge:
                linear.weight.copy_((A @ B).to(dtype))
            else:
                bias = None if linear.bias is None else linear.bias.detach()
                replace_module(layer, name, LowRankLinear.from_factors(A, B, bias, build_dtype))
    if factor_dtype is not None:
        for name in linears:
            replace_module(layer, name, quantize_module(layer.get_submodule(name), dtype))


@contextmanager
def reconstructed(model: nn.Module, spec: ArchSpec, ranks: RankMap, factors_of: FactorSource) -> Iterator[None]:
    """Temporarily replace each factored weight by its dense rank-k reconstruction A B."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, its original values)
    try:
        for index, layer in enumerate(decoder_layers(model, spec)):
            linears = target_linears(layer, spec)
            for name, (A, B) in factors_of(index, linears, wanted_ranks(ranks, index, linears)).items():
                weight = linears[name].weight
                saved.append((weight, weight.detach().clone()))
                with torch.no_grad():
                    weight.copy_((A @ B).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
