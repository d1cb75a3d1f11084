"""Factored checkpoints load in plain transformers (trust_remote_code=True) exactly as through `load_compressed`.

The modeling code shipped next to the weights (swiftsvd_cli/model/hf) must be self-contained, closed under
relative imports, and the same code `load_compressed` runs; without trust_remote_code loading must fail, not
silently build a dense model with random projections.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from swiftsvd_cli.artifacts.compressed import SECTION
from swiftsvd_cli.artifacts.plan import RankPlan
from swiftsvd_cli.config import FactorDType, KVCache
from swiftsvd_cli.model.architectures import ARCHITECTURES, FACTORED_PREFIX
from swiftsvd_cli.model.checkpoint import load_compressed
from swiftsvd_cli.model.hf import SHIPPED, SOURCE
from swiftsvd_cli.model.hf.configuration_swiftsvd import CONFIGS
from swiftsvd_cli.model.hf.latent_kv import uninstall_latent_kv
from swiftsvd_cli.model.hf.lowrank import LowRankLinear
from swiftsvd_cli.model.hf.modeling_swiftsvd import MODELS
from swiftsvd_cli.model.hf.qlinear import Int8Linear
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import calibrated_plan, save_tiny_model

IDS = torch.tensor([[1, 17, 42, 99, 5, 63, 7, 128, 200, 3]])
PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.tensor(json.loads(sys.argv[1]))
for directory in sys.argv[2:]:
    try:
        AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False)
        refused = "loaded"
    except ValueError as error:
        refused = str(error).splitlines()[0]
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(ids).logits, directory + "/plain_logits.pt")
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    factored = sum(type(m).__name__ == "LowRankLinear" for m in model.modules())
    words = len(AutoTokenizer.from_pretrained(directory, trust_remote_code=True)("A stitch in time").input_ids)
    print(json.dumps({"dir": directory, "refused": refused, "class": type(model).__name__, "factored": factored,
                      "generated": generated.shape[1], "generated_ids": generated[0].tolist(), "tokens": words}))
print(json.dumps({"swiftsvd_imported": any(name.startswith("swiftsvd") for name in sys.modules)}))
"""
PLAIN_LATENT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids, mask = (torch.tensor(rows) for rows in json.loads(sys.argv[1]))
found = {}
for directory in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    torch.save(torch.stack(out.logits, dim=1), directory + "/plain_latent_logits.pt")
    found[directory] = {"layers": sorted({type(layer).__name__ for layer in out.cache.layers}),
                        "widths": sorted({layer.keys.shape[-1] for layer in out.cache.layers})}
found["swiftsvd_imported"] = any(name.startswith("swiftsvd") for name in sys.modules)
print(json.dumps(found))
"""
PLAIN_INT8 = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids, directory, found = torch.tensor(json.loads(sys.argv[1])), sys.argv[2], {}
for name in ("float32", "bfloat16"):
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=getattr(torch, name))
    with torch.no_grad():
        torch.save(model(ids).logits, f"{directory}/plain_{name}.pt")
    int8 = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    found[name] = {"int8": len(int8), "stored": sorted({f"{m.qweight.dtype} {m.scale.dtype}" for m in int8})}
found["swiftsvd_imported"] = any(name.startswith("swiftsvd") for name in sys.modules)
print(json.dumps(found))
"""


def shipped_imports(name: str) -> tuple[set[str], set[str]]:
    """(absolute top-level imports, relative imports) of a shipped module."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse((SOURCE / name).read_text())):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(f"{node.module}.py")
            else:
                absolute.add((node.module or "").split(".")[0])
    return absolute, relative


def test_shipped_modules_are_self_contained_and_closed() -> None:
    from transformers.dynamic_module_utils import get_relative_import_files

    on_disk = {p.name for p in SOURCE.glob("*.py")} - {"__init__.py"}
    assert set(SHIPPED) == on_disk  # nothing in model/hf that is not shipped, nothing shipped that is missing
    for name in SHIPPED:
        absolute, relative = shipped_imports(name)
        assert absolute <= {"torch", "transformers", "__future__"} | sys.stdlib_module_names, (name, absolute)
        assert relative <= set(SHIPPED), (name, relative)
    closure = {Path(p).name for p in get_relative_import_files(str(SOURCE / "modeling_swiftsvd.py"))}
    assert closure | {"modeling_swiftsvd.py"} == set(SHIPPED)  # what transformers copies is what we ship


def test_every_family_has_a_factored_class() -> None:
    assert set(CONFIGS) == set(MODELS) == set(ARCHITECTURES)
    for family, config_class in CONFIGS.items():
        assert config_class.model_type == FACTORED_PREFIX + family
        assert MODELS[family].config_class is config_class


@pytest.fixture(scope="module")
def compressed_dirs(tiny_tokenizer, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: ANN001
    """One factored directory per supported family, through the real calibrate -> allocate -> compress path."""
    dirs = {}
    for family in ARCHITECTURES:
        root = tmp_path_factory.mktemp(f"hf-{family}")
        model_dir = save_tiny_model(family, root / "model", tiny_tokenizer)
        plan = calibrated_plan(model_dir, tiny_text_file, root / "work", samples=4, seqlen=32, ratio=0.5)
        out = root / "compressed"
        run_compress(CompressOptions(ModelSource(str(model_dir), "float32", "cpu"), out=out, plan=plan))
        dirs[family] = out
    return dirs


def run_plain(script: str, directories: list[str], tmp_path: Path, inputs: Any = None) -> list[dict[str, Any]]:
    """Run `script` on `inputs` (default IDS) and `directories` in a fresh Python that cannot import swiftsvd."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # plain transformers: swiftsvd is not importable from the worktree
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(IDS.tolist() if inputs is None else inputs), *directories],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_plain_transformers_loads_what_load_compressed_loads(compressed_dirs: dict[str, Path], tmp_path: Path) -> None:
    lines = run_plain(PLAIN, [str(directory) for directory in compressed_dirs.values()], tmp_path)
    assert lines[-1] == {"swiftsvd_imported": False}
    for result, (family, directory) in zip(lines[:-1], compressed_dirs.items(), strict=True):
        assert "custom code" in result["refused"], result  # refused without trust_remote_code, not garbage
        assert result["class"] == MODELS[family].__name__ and result["factored"] > 0 and result["tokens"] > 0
        model, _ = load_compressed(directory)
        assert result["factored"] == sum(isinstance(m, LowRankLinear) for m in model.modules())
        with torch.no_grad():
            ours = model(IDS).logits
        plain = torch.load(directory / "plain_logits.pt")
        assert torch.equal(plain, ours), (family, (plain - ours).abs().max())  # the same code: bit-identical
        assert result["generated_ids"] == model.generate(IDS, max_new_tokens=6, do_sample=False)[0].tolist()


def test_load_compressed_never_runs_the_directory_code(compressed_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "poisoned"
    shutil.copytree(compressed_dirs["llama"], directory)
    for name in SHIPPED:
        (directory / name).write_text("raise RuntimeError('the directory code ran')\n")
    model, _ = load_compressed(directory)
    reference, _ = load_compressed(compressed_dirs["llama"])
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_a_directory_of_the_previous_format_still_loads(compressed_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Format 1 kept the base model_type, had no modeling code and a section without kind or provenance."""
    directory = tmp_path / "old"
    shutil.copytree(compressed_dirs["qwen2"], directory)
    config = json.loads((directory / "config.json").read_text())
    section = config[SECTION]
    config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    del config["auto_map"]
    config[SECTION] = {key: section[key] for key in ("method", "strategy", "alpha", "target_ratio", "achieved_ratio")}
    config[SECTION] |= {"ranks": section["ranks"], "plan": section["plan"], "base_model": section["base_model"]}
    config[SECTION] |= {"format_version": 1, "tool_version": "0.1.0", "plan_sha256": "0" * 64}
    config[SECTION] |= {"base_fingerprint": section["base_fingerprint"]}
    (directory / "config.json").write_text(json.dumps(config))
    for name in SHIPPED:
        (directory / name).unlink()
    old, _ = load_compressed(directory)
    new, _ = load_compressed(compressed_dirs["qwen2"])
    with torch.no_grad():
        assert torch.equal(old(IDS).logits, new(IDS).logits)


def test_directory_layout(compressed_dirs: dict[str, Path]) -> None:
    directory = compressed_dirs["mistral"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "swiftsvd_mistral" and config["architectures"] == ["SwiftSVDMistralForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_swiftsvd.SwiftSVDMistralConfig",
        "AutoModelForCausalLM": "modeling_swiftsvd.SwiftSVDMistralForCausalLM",
    }
    assert config[SECTION]["kind"] == "compressed" and config[SECTION]["ranks"]
    for name in SHIPPED:
        assert (directory / name).read_bytes() == (SOURCE / name).read_bytes()


def test_plain_transformers_loads_int8_factors_as_load_compressed_does(
    tiny_tokenizer,  # noqa: ANN001
    tiny_text_file: Path,
    tmp_path: Path,
) -> None:
    """int8 factors (qwen2: A carries the q/k/v bias) plus int8 dense linears, in float32 and bfloat16."""
    pytest.importorskip("torchao")  # compression computes the codes with torchao; loading needs torch only
    model_dir = save_tiny_model("qwen2", tmp_path / "model", tiny_tokenizer)
    plan_path = calibrated_plan(model_dir, tiny_text_file, tmp_path / "work", samples=4, seqlen=32, ratio=0.5)
    plan = RankPlan.load(plan_path)
    modules = [replace(p, rank=min(p.m, p.n), dense=True) if p.layer == 1 else p for p in plan.modules]
    replace(plan, modules=modules).save(plan_path)  # layer 1 stays dense: int8 covers dense target linears too
    directory = tmp_path / "int8"
    source = ModelSource(str(model_dir), "float32", "cpu")
    run_compress(CompressOptions(source, out=directory, plan=plan_path, factor_dtype=FactorDType.INT8))
    section = json.loads((directory / "config.json").read_text())[SECTION]
    assert section["factor_dtype"] == "int8" and len(section["int8_dense"]) == 7 and len(section["ranks"]) == 7

    found = run_plain(PLAIN_INT8, [str(directory)], tmp_path)[-1]
    assert found.pop("swiftsvd_imported") is False
    for dtype, plain in found.items():
        model, _ = load_compressed(directory, dtype=dtype)
        int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert plain == {"int8": 2 * 7 + 7, "stored": ["torch.int8 torch.float32"]}, dtype  # codes + float32 scales
        assert len(int8) == plain["int8"]
        with torch.no_grad():
            ours = model(IDS).logits
        theirs = torch.load(directory / f"plain_{dtype}.pt")
        assert ours.dtype == getattr(torch, dtype) and torch.equal(theirs, ours), (dtype, (theirs - ours).abs().max())


def test_plain_transformers_runs_the_latent_kv_cache_as_load_compressed_does(
    tiny_tokenizer,  # noqa: ANN001
    tiny_text_file: Path,
    tmp_path: Path,
) -> None:
    """`--kv-cache latent` directories (16-bit and int8 factors; qwen2: k/v biases) through plain transformers:
    the latent cache is on, every generated step equals `load_compressed`'s bit for bit, and both equal a
    cache-free forward of the same factored weights (the dense-cache reference) within float32 tolerance."""
    pytest.importorskip("torchao")  # the int8 directory's codes are computed with torchao
    model_dir = save_tiny_model("qwen2", tmp_path / "model", tiny_tokenizer)
    plan = calibrated_plan(model_dir, tiny_text_file, tmp_path / "work", samples=4, seqlen=32, ratio=0.5)
    source = ModelSource(str(model_dir), "float32", "cpu")
    directories = {}
    for name, factor_dtype in (("latent", None), ("latent-int8", FactorDType.INT8)):
        directories[name] = tmp_path / name
        options = CompressOptions(source, directories[name], plan, factor_dtype=factor_dtype)
        run_compress(replace(options, kv_cache=KVCache.LATENT, kv_ratio=0.25))
    pads = torch.tensor([[0], [3], [5]])
    ids = IDS.repeat(3, 1)
    mask = (torch.arange(ids.shape[1])[None] >= pads).long()
    ids = ids.masked_fill(mask == 0, 0)

    found = run_plain(PLAIN_LATENT, [str(d) for d in directories.values()], tmp_path, [ids.tolist(), mask.tolist()])
    assert found[-1].pop("swiftsvd_imported") is False
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    for name, directory in directories.items():
        assert found[-1][str(directory)] == {"layers": ["LatentLayer"], "widths": [4]}, name  # 0.25 x 16 < plan's 5
        model, _ = load_compressed(directory)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, **kwargs, return_dict_in_generate=True, output_logits=True
            )
        steps = torch.stack(out.logits, dim=1)
        assert torch.equal(torch.load(directory / "plain_latent_logits.pt"), steps), name  # the same code
        uninstall_latent_kv(model)  # the same factored weights with transformers' attention, no cache
        full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            full = model(out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
        assert (steps - full[:, ids.shape[1] - 1 : -1]).abs().max() < 1e-4, name
