"""int8 factors and byte budgets: codes equal torchao's, checkpoints round-trip, bytes are real, budgets are tight."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.cli import app
from swiftsvd_cli.core.allocation import uniform_rank, weight_bytes
from swiftsvd_cli.metrics.speed import measure_size
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.hf.lowrank import LowRankLinear
from swiftsvd_cli.model.hf.qlinear import Int8Linear
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.model.quantize import import_torchao, int8_linear
from swiftsvd_cli.stages.allocate import AllocateOptions, plan_bytes, run_allocate
from swiftsvd_cli.stages.calibrate import CalibrateOptions, run_calibrate
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import TINY_SHAPE, build_tiny_model

pytest.importorskip("torchao")
import_torchao()
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def work(trained_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("work")
    source = ModelSource(str(trained_llama_dir), device="cpu")
    run_calibrate(CalibrateOptions(source=source, work=path, data=str(tiny_text_file), samples=16, seqlen=64))
    return path


def allocate(work: Path, **options: object) -> RankPlan:
    return run_allocate(AllocateOptions(work=work, device="cpu", force=True, **options)).plan  # type: ignore[arg-type]


def compress(model_dir: Path, plan: RankPlan, out: Path, factor_dtype: str | None = None) -> Path:
    plan_path = out.parent / f"{out.name}-plan.json"
    plan.save(plan_path)
    source = ModelSource(str(model_dir), "float32", "cpu")
    run_compress(CompressOptions(source, out=out, plan=plan_path, factor_dtype=factor_dtype))
    return out


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 60).unsqueeze(0)).logits.double()


def test_int8_linear_is_torchaos_int8_weight_only() -> None:
    torch.manual_seed(0)
    reference = nn.Linear(96, 40)
    ours = int8_linear(reference.weight, reference.bias, torch.float32)
    quantize_(reference, Int8WeightOnlyConfig())
    assert torch.equal(ours.qweight, reference.weight.qdata)
    assert torch.equal(ours.scale, reference.weight.scale.reshape(-1))
    x = torch.randn(5, 96)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    # and it computes with exactly q · s, in float32 and through the 16-bit CPU kernel
    expected = x.double() @ (ours.qweight.double() * ours.scale.double()[:, None]).T + ours.bias.double()
    torch.testing.assert_close(ours(x).double(), expected, rtol=1e-5, atol=1e-5)
    half = Int8Linear.from_codes(ours.qweight, ours.scale, ours.bias, torch.bfloat16)
    torch.testing.assert_close(half(x.bfloat16()).double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("width", [5, 8, 24, 173, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_at_any_width_and_dtype(width: int, dtype: torch.dtype) -> None:
    """Ranks are arbitrary widths; torch's CPU int8 kernel breaks on widths that are not multiples of 16."""
    torch.manual_seed(width)
    layer = int8_linear(torch.randn(40, width), None, dtype)
    x = torch.randn(3, 7, width)
    expected = x.double() @ layer.dequantize().double().T
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x.to(dtype)).double(), expected, rtol=tolerance, atol=tolerance * width**0.5)


@pytest.mark.parametrize("offset", [0, 1, 8, 16])
def test_int8_linear_with_codes_at_any_byte_offset(offset: int) -> None:
    """Codes loaded from safetensors may sit at any byte offset; torch's CPU kernel segfaults off 16 bytes."""
    torch.manual_seed(offset)
    layer = int8_linear(torch.randn(192, 576), None, torch.bfloat16)
    storage = torch.zeros(layer.qweight.numel() + 64, dtype=torch.int8)
    layer.qweight = storage[offset : offset + layer.qweight.numel()].view_as(layer.qweight).copy_(layer.qweight)
    x = torch.randn(2, 9, 576)
    expected = x.double() @ layer.dequantize().double().T
    torch.testing.assert_close(layer(x.bfloat16()).double(), expected, rtol=3e-2, atol=3e-2 * 576**0.5)


def quantize_like_torchao(model: nn.Module) -> None:
    """The independent reference: torchao's int8 weight-only on every nn.Linear inside the target linears."""
    names = {
        f"{name}.{child}" if child else name
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in TARGETS
        for child, sub in module.named_modules()
        if isinstance(sub, nn.Linear)
    }
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda _, fqn: fqn in names)


def test_int8_factors_round_trip(work: Path, trained_llama_dir: Path, tmp_path: Path) -> None:
    plan = allocate(work, ratio=0.6, strategy="uniform")
    modules = [  # layer 1's attention stays dense: int8 must cover dense target linears too
        replace(p, rank=min(p.m, p.n), dense=True) if p.layer == 1 and "attn" in p.module else p for p in plan.modules
    ]
    plan = replace(plan, modules=modules)
    float_model, _ = load_compressed(compress(trained_llama_dir, plan, tmp_path / "float"))
    int8_dir = compress(trained_llama_dir, plan, tmp_path / "int8", "int8")
    int8_model, _ = load_compressed(int8_dir)
    reference, _ = load_compressed(tmp_path / "float")
    quantize_like_torchao(reference)

    exact, ours, theirs = logits(float_model), logits(int8_model), logits(reference)
    error, reference_error = (ours - exact).norm(), (theirs - exact).norm()
    assert reference_error > 0
    assert abs(error - reference_error) <= 0.01 * reference_error  # the quantisation error, not more
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    section = json.loads((int8_dir / "config.json").read_text())["swiftsvd"]
    assert section["factor_dtype"] == "int8" and section["int8_dense"]
    assert {p.name for p in int8_dir.iterdir()} >= {"model.safetensors"}
    assert not [p for p in int8_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    # the file holds int8 codes + float32 scales, and exactly the bytes the byte budget counts
    stored = 0
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if any(f".{t}." in key for t in TARGETS) and not key.endswith("bias"):
                tensor = handle.get_tensor(key)
                assert tensor.dtype == (torch.int8 if key.endswith("qweight") else torch.float32), key
                stored += tensor.numel() * tensor.element_size()
    shapes = {p.module: (p.m, p.n) for p in plan.modules}
    assert stored == plan_bytes(plan.rank_map(), shapes, "int8")
    size = measure_size(int8_model)
    assert size.target_bytes == stored + sum(
        m.A.bias.numel() * 4 if isinstance(m, LowRankLinear) and m.A.bias is not None else 0
        for m in int8_model.modules()
    )
    assert size.params_target_linear == measure_size(float_model).params_target_linear


@pytest.mark.parametrize("factor_dtype", ["int8", None])
@pytest.mark.parametrize("bytes_ratio", [0.15, 0.3, 0.45])
def test_bytes_budget_picks_the_largest_uniform_ranks_that_fit(
    work: Path, factor_dtype: str | None, bytes_ratio: float
) -> None:
    """Brute force over uniform plans (ratios on a fine grid): every one that fits has no more rank anywhere."""
    plan = allocate(work, bytes_ratio=bytes_ratio, factor_dtype=factor_dtype, strategy="uniform")
    shapes = {p.module: (p.m, p.n) for p in plan.modules}
    layers = TINY_SHAPE["num_hidden_layers"]
    budget = bytes_ratio * sum(2 * m * n for m, n in shapes.values()) * layers

    def stored(ranks: dict[str, int]) -> int:
        return layers * sum(weight_bytes(*shapes[module], k, factor_dtype) for module, k in ranks.items())

    chosen = {p.module: p.rank for p in plan.modules if p.layer == 0}
    assert stored(chosen) <= budget
    assert plan.achieved_bytes_ratio == pytest.approx(stored(chosen) / budget * bytes_ratio)
    fitting = 0
    for step in range(20001):
        ranks = {module: uniform_rank(m, n, step / 20000) for module, (m, n) in shapes.items()}
        if stored(ranks) <= budget:
            fitting += 1
            assert all(chosen[module] >= k for module, k in ranks.items()), (step, ranks, chosen)
        else:
            assert any(chosen[module] < k for module, k in ranks.items()), (step, ranks, chosen)
    assert fitting > 0


def test_bytes_budget_dynamic_fits_and_nothing_larger_does(work: Path) -> None:
    plan = allocate(work, bytes_ratio=0.3, factor_dtype="int8", strategy="dynamic", alpha=0.5)
    assert plan.achieved_bytes_ratio is not None and plan.achieved_bytes_ratio <= 0.3
    larger = allocate(work, ratio=min(1.0, plan.target_ratio + 1e-3), strategy="dynamic", alpha=0.5)
    shapes = {p.module: (p.m, p.n) for p in plan.modules}
    assert plan_bytes(larger.rank_map(), shapes, "int8") > plan_bytes(plan.rank_map(), shapes, "int8")


def test_generous_int8_budget_keeps_every_linear_dense(work: Path) -> None:
    """Half the 16-bit bytes plus the scales fits the whole int8 model: no low rank is needed."""
    plan = allocate(work, bytes_ratio=0.7, factor_dtype="int8", strategy="uniform")
    assert plan.target_ratio == 1.0 and all(p.dense for p in plan.modules)


def test_size_counts_torchao_tensors_by_their_real_bytes() -> None:
    model = build_tiny_model("llama", vocab_size=100)
    dense = measure_size(model)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.rpartition(".")[2] in TARGETS)
    size = measure_size(model)
    weights = dense.params_target_linear
    rows = sum(p.weight.shape[0] for n, p in model.named_modules() if n.rpartition(".")[2] in TARGETS)
    # codes: 1 byte each; scale: float32 and zero point: int8, one per row (torchao keeps both)
    assert size.target_bytes == weights + rows * (4 + 1)
    assert dense.target_bytes == 4 * weights


def test_cli_one_shot_byte_budget_and_refusals(trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["--data", str(tiny_text_file), "--samples", "8", "--seqlen", "32", "--device", "cpu"]
    common += ["--work", str(tmp_path / "work"), "--strategy", "uniform"]
    out = tmp_path / "out"
    done = runner.invoke(
        app,
        ["compress", str(trained_llama_dir), "--bytes-ratio", "0.3", "--factor-dtype", "int8", "-o", str(out)] + common,
    )
    assert done.exit_code == 0, done.output
    assert "int8" in done.output
    section = json.loads((out / "config.json").read_text())["swiftsvd"]
    assert section["factor_dtype"] == "int8"
    plan = RankPlan.load(Path(section["plan"]))
    assert plan.bytes_ratio == 0.3 and plan.achieved_bytes_ratio is not None and plan.achieved_bytes_ratio <= 0.3
    cases = {
        "both targets": (["--ratio", "0.5", "--bytes-ratio", "0.3"], "exactly one"),
        "bytes ratio > 1": (["--bytes-ratio", "1.5"], "outside (0, 1]"),
        "merge + int8": (["--ratio", "0.5", "--factor-dtype", "int8", "--merge"], "--merge"),
    }
    for case, (arguments, message) in cases.items():
        result = runner.invoke(
            app, ["compress", str(trained_llama_dir), "-o", str(tmp_path / "x"), *arguments, *common]
        )
        assert result.exit_code == 1, (case, result.output)
        assert message in result.output and "Traceback" not in result.output, (case, result.output)
    assert not (tmp_path / "x").exists()


def test_ratio_one_int8_is_torchaos_quantised_original(work: Path, trained_llama_dir: Path, tmp_path: Path) -> None:
    """The quantised original that `eval --bench` compares against: every target linear int8, nothing factored."""
    from transformers import AutoModelForCausalLM

    model, _ = load_compressed(compress(trained_llama_dir, allocate(work, ratio=1.0), tmp_path / "q", "int8"))
    assert all(isinstance(m, Int8Linear) for n, m in model.named_modules() if n.rpartition(".")[2] in TARGETS)
    reference = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    quantize_like_torchao(reference)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)
