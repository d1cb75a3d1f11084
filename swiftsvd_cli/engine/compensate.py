"""Error-compensated factors (`--compensate`): each planned linear fitted to what the compressed layers feed it.

Layer by layer, and inside a layer input group by input group in execution order (q/k/v, o, gate/up, down),
the calibration windows run through the original decoder layer and through its compressed copy side by side.
For each group we sum, over tokens, Ĝ = X̂ X̂ᵀ + γ X Xᵀ and the cross term (H = X (X̂ + γ X)ᵀ shared by the
group, or per linear T = W X (X̂ + γ X)ᵀ where the linears' outputs are narrower than their input: down_proj;
γ weighs the original inputs so the factors do not overfit the calibration text, see `core.compensation`),
solve the reduced-rank regression of `core.compensation` and install the factors in the copy before the next
group runs, so every later input already sees them. The copy then replaces the layer and both hidden-state
streams move on.

Memory: one decoder layer (read from the checkpoint) and its copy on the device, the two streams of hidden states on
the CPU (2x what calibration holds); never the whole model. The solve of the widest group holds Ĝ, its
symmetrised/damped copy and the Cholesky factor (3 n² float64) plus T and W_ls (2 m n): down_proj is 3.6 GB at
Llama-2-7B (n = 11008, m = 4096) and 24 GB at Llama-2-70B (n = 28672, m = 8192); the cross term is summed on the
output side there (m n, not n²). The sums are plain sums over tokens, so a data-parallel pass would only need to
all-reduce `GroupSums` before `solve`; that is not built: under a launcher the main process runs the whole pass.
Time: per layer, each group's pass runs both layers only up to that group's input, plus one full pass of each
to move the streams on; the extra float64 work is Ĝ (two Grams) and the cross term, about three times
calibration's Gram.
Ratio-specific (it depends on the compressed prefix), so nothing here is written to the calibration cache.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.core.compensation import ORIGINAL_WEIGHT, accumulate_compensation, compensated_factors, noise_floor
from swiftsvd_cli.core.grams import make_empty_gram, symmetric_from_upper
from swiftsvd_cli.core.linalg import SVD_PRECISION
from swiftsvd_cli.data.text import calibration_windows, load_text, tokenize
from swiftsvd_cli.engine.factors import Factors, RankMap
from swiftsvd_cli.errors import SwiftSVDError
from swiftsvd_cli.model.architectures import ArchSpec, decoder_layers, target_linears
from swiftsvd_cli.model.layerwise import (
    HiddenStates,
    LayerInputs,
    capture_first_layer_inputs,
    iterate_batches,
    layer_output,
)
from swiftsvd_cli.model.streaming import StreamedModel

logger = logging.getLogger("swiftsvd")
Install = Callable[[nn.Module, dict[str, nn.Linear], Factors], None]
"""(decoder layer, one input group's linears in it by path, their factors) -> put the group as stored in place
(factored or merged; with int8 factors every linear of the group quantised, so later groups see that too)."""
SHARED = ""  # key of the group-wide cross term H in `GroupSums.cross`


@dataclass(frozen=True)
class CompensationResult:
    """What the compensated pass did, for the compressed directory's record."""

    damping: dict[str, float]  # "layer.module" -> relative damping of its Ĝ, only where one was needed
    tokens: int  # calibration tokens per group
    seconds: float


@dataclass
class GroupSums:
    """One input group's sums over tokens: what a data-parallel run would all-reduce before `solve`."""

    G_hat: torch.Tensor  # (n, n) X̂ X̂ᵀ + γ X Xᵀ, the stacked inputs' Gram
    cross: dict[str, torch.Tensor]  # {SHARED: H (n, n)} or {linear: T (m, n)}, with X̂ + γ X as X's partner
    tokens: int


def manifest_windows(manifest: CalibrationManifest, tokenizer: Any) -> torch.Tensor:
    """The calibration windows a WORK was made from, drawn again; a calibration text that changed is refused."""
    settings = manifest.settings
    source = load_text(settings.data, "train")
    if source.sha256 != settings.data_sha256:
        raise SwiftSVDError(
            f"the calibration text '{settings.data}' changed since this WORK was calibrated: recalibrate first"
        )
    return calibration_windows(tokenize(tokenizer, source.text), settings.samples, settings.seqlen, settings.seed)


class _Reached(Exception):
    """Raised by a pre-hook to stop a layer's forward pass once the wanted input is known."""


def _input_of(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """What `module` receives when `layer` runs on `hidden`; the rest of the layer is skipped."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0])
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        layer_output(layer, hidden, kwargs)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def group_sums(
    layer: nn.Module,
    twin: nn.Module,
    linears: dict[str, nn.Linear],
    reader: str,
    original: LayerInputs,
    compressed: LayerInputs,
    device: str,
) -> GroupSums:
    """Ĝ and the cross terms of `linears` (all reading the input of the linear `reader`) over all batches.

    `layer` is the original decoder layer, `twin` its copy with the earlier groups already compressed.
    """
    W = {name: linear.weight.detach() for name, linear in linears.items()}  # (m, n) each
    n = next(iter(linears.values())).in_features
    output_side = sum(w.shape[0] for w in W.values()) < n  # Σ m n < n²: store T per linear, not H
    G_hat = make_empty_gram(n).to(device)
    shapes = {name: (w.shape[0], n) for name, w in W.items()} if output_side else {SHARED: (n, n)}
    cross = {key: torch.zeros(shape, dtype=SVD_PRECISION, device=device) for key, shape in shapes.items()}
    tokens = 0
    for index, hidden, kwargs in iterate_batches(original, device):  # both streams share the layer kwargs
        hidden_hat = compressed.hidden[index].to(device)
        x = _input_of(layer, layer.get_submodule(reader), hidden, kwargs)  # same input for the whole group
        x_hat = _input_of(twin, twin.get_submodule(reader), hidden_hat, kwargs)
        tokens += accumulate_compensation(G_hat, cross, W if output_side else {}, x, x_hat, ORIGINAL_WEIGHT)
    return GroupSums(G_hat=symmetric_from_upper(G_hat), cross=cross, tokens=tokens)  # accumulated: upper triangle


def solve(linears: dict[str, nn.Linear], sums: GroupSums, ranks: dict[str, int], floor: float) -> tuple[Factors, float]:
    """The group's compensated factors (float64) and the relative damping its Ĝ needed (`floor`: the
    inputs' noise floor, see `core.compensation.damped_cholesky`)."""
    if SHARED in sums.cross:
        H = sums.cross[SHARED]
        T = {name: linears[name].weight.detach().to(dtype=SVD_PRECISION) @ H for name in ranks}
    else:
        T = sums.cross
    result = compensated_factors(T, sums.G_hat, ranks, floor)
    return result.factors, result.damping


def _advance(layer: nn.Module, inputs: LayerInputs, device: str) -> None:
    """Replace each batch's hidden states by `layer`'s output (kept on the CPU)."""
    for index, hidden, kwargs in iterate_batches(inputs, device):
        inputs.hidden[index] = layer_output(layer, hidden, kwargs).cpu()


class Compensator:
    """The compensated pass over a streamed model, one decoder layer at a time (`layer`), in execution order.

    The embeddings are read once to capture what layer 0 receives; the two hidden-state streams (original and
    compressed path) then wait on the CPU between layers, so host memory holds one layer, its copy and the
    streams, never the model.
    """

    def __init__(
        self,
        streamed: StreamedModel,
        spec: ArchSpec,
        windows: torch.Tensor,
        ranks: RankMap,
        batch_size: int,
        device: str,
        install: Install,
    ) -> None:
        self.spec, self.ranks, self.device, self.install = spec, ranks, device, install
        self.start = time.perf_counter()
        layers = decoder_layers(streamed.skeleton, spec)
        first = HiddenStates.for_windows(windows, batch_size, streamed.config.hidden_size, streamed.dtype)
        with streamed.loaded(spec.embeddings, "cpu"):
            self.original = capture_first_layer_inputs(streamed.skeleton, layers, windows, first, "cpu")
        self.compressed = LayerInputs(hidden=HiddenStates(first.shapes, streamed.dtype), kwargs=self.original.kwargs)
        for batch in range(len(first)):
            self.compressed.hidden[batch] = first[batch]  # the same tensors until a layer replaces them
        self.damping: dict[str, float] = {}
        self.tokens = 0
        self.seconds: float | None = None  # set by the first `result`, once every layer is done

    @torch.no_grad()
    def layer(self, index: int, layer: nn.Module) -> nn.Module:
        """The compressed copy of decoder layer `index` (`layer`, loaded on the device), every planned linear
        fitted to what the compressed layers before it produce; both streams are moved past the layer."""
        twin = copy.deepcopy(layer)
        floor = noise_floor(next(layer.parameters()).dtype)  # the activations' precision
        linears = target_linears(layer, self.spec)
        for names in self.spec.groups.values():
            wanted = {name: self.ranks[(index, name)] for name in names if (index, name) in self.ranks}
            factors: Factors = {}
            if wanted:
                group = {name: linears[name] for name in wanted}
                sums = group_sums(layer, twin, group, names[0], self.original, self.compressed, self.device)
                factors, relative = solve(group, sums, wanted, floor)
                if relative:
                    self.damping |= {f"{index}.{name}": relative for name in wanted}
                    logger.info("layer %d %s: compressed-path Gram damped by %.0e", index, names[0], relative)
                self.tokens = sums.tokens
            self.install(twin, {name: cast(nn.Linear, twin.get_submodule(name)) for name in names}, factors)
        _advance(layer, self.original, self.device)
        _advance(twin, self.compressed, self.device)
        return twin

    def result(self) -> CompensationResult:
        """What the pass did; its time is taken at the first call (after the last layer)."""
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start
        return CompensationResult(self.damping, self.tokens, self.seconds)
