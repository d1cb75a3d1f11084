"""Factorisation methods, all fed by the same WORK: Swift-SVD (ours) and the baselines it is measured against.

`swift`: A = U_k, B = U_kᵀ W from the cached eigenbasis (optimal for ‖WX − W'X‖).
`svd`: truncated SVD of W (activation-unaware).
`asvd`: ASVD's scaling, SVD of W diag(mean|x|^0.5) folded back, at the plan's ranks (not ASVD's own
sensitivity-based rank search).
`svd-llm`: SVD-LLM's Cholesky whitening as its released code runs it (Gram in float32, Cholesky + inverse
in float64, SVD in float32; shifted when G is not positive definite).
`svd-llm-fp64`: ours, not theirs: the same whitening in float64 throughout.
SVD-LLM needs every input Gram, so it runs only on a WORK calibrated with `--keep-input-grams`.
Ranks always come from a plan, so methods differ only in the factorisation: a uniform plan gives SVD-LLM its
paper's ranks ("SVD-LLM (W)"), a dynamic one gives every method Swift-SVD's Algorithm 2 ranks. Every method's
factors are nested (the rank-k factors are the first k columns of A and rows of B of any higher rank), so one
factorisation at the largest rank serves every lower one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from swiftsvd_cli.artifacts import store
from swiftsvd_cli.artifacts.eigen import EigenIndex, eigen_tensor_specs, eigenvectors
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.config import Method, choice
from swiftsvd_cli.core.allocation import is_dense
from swiftsvd_cli.core.baselines import FLOAT64, RELEASED, SVDLLMPrecisions, asvd_factors, svd_factors, svd_llm_factors
from swiftsvd_cli.core.grams import unpack_upper
from swiftsvd_cli.core.linalg import factorize
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import ArchSpec, target_linears
from swiftsvd_cli.model.hf.lowrank import LowRankLinear, replace_module
from swiftsvd_cli.model.quantize import quantize_module

logger = logging.getLogger("swiftsvd")
INPUT_STATISTIC = {Method.ASVD: "abs_sum", Method.SVD_LLM: "gram", Method.SVD_LLM_FP64: "gram"}
"""What each baseline reads from the covariance shards, per input group: ASVD the per-channel Σ|x| (with the
token count), SVD-LLM the input Gram G itself. `swift` reads only the eigen shards, `svd` only the weights."""
SVD_LLM_PRECISIONS: dict[Method, SVDLLMPrecisions] = {Method.SVD_LLM: RELEASED, Method.SVD_LLM_FP64: FLOAT64}
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
RankMap = dict[tuple[int, str], int]  # (layer index, module path in the layer) -> rank
RECALIBRATE = "recalibrate with --keep-input-grams (into a new --out, or with --force)"


def require_statistics(method: str, work: Path, manifest: CalibrationManifest) -> Method:
    """`method`, once it is known that `work` holds what it reads: SVD-LLM whitens with every input Gram, which a
    WORK calibrated without --keep-input-grams replaced by output Grams where those are smaller."""
    chosen = choice(Method, method)
    outputs = [group for group, form in manifest.grams.items() if form == "output"]
    if INPUT_STATISTIC.get(chosen) == "gram" and outputs:
        raise SwiftSVDError(
            f"method '{chosen}' needs input Grams, and {work} keeps output Grams for {', '.join(outputs)}: "
            f"{RECALIBRATE}"
        )
    return chosen


class FactorSource:
    """Callable (layer index, weights, ranks) -> factors for one method over one WORK.

    Each shard is hashed the first time this source reads it; later reads only check its size. The shard read
    last stays in memory, so a layer's modules can be factored one call at a time.
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
        self.method = require_statistics(method, work, manifest)
        self.work, self.manifest, self.eigen, self.spec, self.device = work, manifest, eigen, spec, device
        self._verified: set[str] = set()
        self._last: tuple[str, dict[str, torch.Tensor]] = ("", {})  # the shard read last: one layer's worth

    def _read(self, shard: store.Shard, expect: dict[str, store.TensorSpec]) -> dict[str, torch.Tensor]:
        if self._last[0] != shard.file:
            self._last = ("", {})  # free the previous layer's shard before reading the next
            tensors = store.read_shard(self.work, shard, verify=shard.file not in self._verified, expect=expect)
            self._verified.add(shard.file)
            self._last = (shard.file, tensors)
        return self._last[1]

    def _statistic(self, stats: dict[str, torch.Tensor], index: int, name: str) -> torch.Tensor:
        """The input statistic this baseline needs for module `name`, or an error saying what is missing."""
        key = f"{self.spec.group_of(name)}.{INPUT_STATISTIC[self.method]}"
        if key not in stats:
            raise SwiftSVDError(
                f"{self.work} has no '{key}' in layer {index}'s covariance shard, which method '{self.method}' "
                f"needs: {RECALIBRATE}"
            )
        value = unpack_upper(stats[key]) if INPUT_STATISTIC[self.method] == "gram" else stats[key]
        return value.to(self.device)

    def __call__(self, index: int, weights: dict[str, torch.Tensor], ranks: dict[str, int]) -> Factors:
        """(A, B) for the modules of layer `index` listed in `ranks` (module path -> rank), in the method's
        working precision (float64; float32 for `svd-llm`, whose SVD runs in float32).

        `weights` holds (at least) those modules' weights, in any dtype and on any device.
        """
        if not ranks:
            return {}
        device = self.device

        def float64_weights() -> Iterator[tuple[str, torch.Tensor]]:
            """One module's weight in float64 at a time: a whole layer's is 1.6 GB at Llama-2-7B."""
            for name in ranks:
                yield name, weights[name].detach().to(device=device, dtype=torch.float64)

        if self.method == Method.SWIFT:
            record = self.eigen.layers.get(index)
            if record is None or record.gram_sha256 != self.manifest.layers[index].shard.sha256:
                raise SwiftSVDError(
                    f"{self.work} has no eigenbasis of layer {index}'s current Gram: rerun `swiftsvd allocate`"
                )
            bases = self._read(record.shard, eigen_tensor_specs(self.manifest.shapes, self.spec.modules))
            return {
                name: factorize(W, eigenvectors(bases, name, W, ranks[name]), ranks[name])
                for name, W in float64_weights()
            }
        if self.method == Method.SVD:
            return {name: svd_factors(W, ranks[name]) for name, W in float64_weights()}
        stats = self._read(self.manifest.layers[index].shard, self.manifest.gram_tensors(self.spec.groups))
        tokens = float(stats["tokens"])
        factors: Factors = {}
        for name, W in float64_weights():
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


def factor_layer(
    layer: nn.Module,
    index: int,
    spec: ArchSpec,
    ranks: RankMap,
    factors_of: FactorSource,
    *,
    dtype: torch.dtype,
    merge: bool = False,
    factor_dtype: str | None = None,
) -> None:
    """Factor decoder layer `index` in place with `install_factors`, its factors in `dtype`."""
    linears = target_linears(layer, spec)
    wanted = wanted_ranks(ranks, index, linears)
    factors = factors_of(index, {name: linears[name].weight for name in wanted}, wanted)
    install_factors(layer, linears, factors, merge=merge, factor_dtype=factor_dtype, dtype=dtype)


def install_factors(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    factors: Factors,
    *,
    merge: bool,
    factor_dtype: str | None,
    dtype: torch.dtype,
) -> None:
    """Put each (A, B) of `factors` in `layer`: a `LowRankLinear` in `dtype` (or, with `merge`, its dense A B
    rounded to `dtype`, in place).

    With `factor_dtype` "int8" every linear of `linears` is then stored quantised: both factors of a factored
    one, the weight of one left dense. Factors are quantised from float32, not from `dtype`.
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
