"""No code from artifacts: swiftsvd reads only safetensors and JSON, and runs no Python that came with a model.

A marker file proves it: the code shipped in a compressed directory and the custom code of an input model
write one when imported. swiftsvd's commands must leave it unwritten, while plain transformers with
`trust_remote_code=True` (the control) writes it, so the marker would show a leak.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import swiftsvd_cli
from swiftsvd_cli.cli import app
from swiftsvd_cli.model.hf import SHIPPED
from swiftsvd_cli.model.loading import ModelSource
from swiftsvd_cli.stages.compress import CompressOptions, run_compress
from tests.conftest import calibrated_plan

PACKAGE = Path(swiftsvd_cli.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
UNSAFE_CALLS = {
    "torch.load",
    "torch.jit.load",
    "numpy.load",
    "np.load",
    "yaml.load",
    "yaml.unsafe_load",
    "eval",
    "exec",
}
MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"


def dotted(node: ast.expr) -> str:
    """`torch.load` for the call target `torch.load`, '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def test_no_pickle_or_code_loading_anywhere_in_the_package() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            imported = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path}: import {name}" for name in imported if name.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.Call) and dotted(node.func) in UNSAFE_CALLS:
                found.append(f"{path}:{node.lineno}: {dotted(node.func)}()")
            if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "weights_only", "allow_pickle"):
                if isinstance(node.value, ast.Constant) and node.value.value is not False:
                    found.append(f"{path}:{node.value.lineno}: {node.arg}={node.value.value!r}")
    assert not found, found
    assert len(list(PACKAGE.rglob("*.py"))) > 40  # the scan saw the package


def test_shipped_recipes_never_turn_on_remote_code() -> None:
    recipes = sorted((PACKAGE / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert not yaml.safe_load(recipe.read_text()).get("trust_remote_code", False), recipe


@pytest.fixture(scope="module")
def poisoned(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """(a compressed directory whose shipped code, and an input model whose custom code, writes `marker`)."""
    root = tmp_path_factory.mktemp("poisoned")
    marker = root / "marker"
    plan = calibrated_plan(tiny_llama_dir, tiny_text_file, root / "work", samples=4, seqlen=32, ratio=0.5)
    compressed = root / "compressed"
    run_compress(CompressOptions(ModelSource(str(tiny_llama_dir), "float32", "cpu"), out=compressed, plan=plan))
    for name in SHIPPED:
        (compressed / name).write_text(MARKER_CODE.format(marker=str(marker)) + (compressed / name).read_text())
    custom = root / "custom-model"
    shutil.copytree(tiny_llama_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "marker_llama", "auto_map": {"AutoConfig": "configuration_marker.MarkerConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    config_class = (
        "from transformers import LlamaConfig\n\n\nclass MarkerConfig(LlamaConfig):\n    model_type = 'marker_llama'\n"
    )
    (custom / "configuration_marker.py").write_text(MARKER_CODE.format(marker=str(marker)) + config_class)
    return compressed, custom, marker


def test_commands_never_import_code_shipped_with_a_model(
    poisoned: tuple[Path, Path, Path], tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compressed, custom, marker = poisoned
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    text = ["--data", str(tiny_text_file), "--samples", "4", "--seqlen", "32", "--device", "cpu"]
    result = runner.invoke(
        app, ["eval", str(compressed), "--tasks", str(tiny_text_file), "--seqlen", "16", "--limit", "1"]
    )
    assert result.exit_code == 0, result.output  # the compressed model loads and runs, from our own classes
    refusals = {
        "calibrate": ["calibrate", str(custom), "--out", str(tmp_path / "work"), *text],
        "one shot": ["compress", str(custom), "--ratio", "0.5", "--out", str(tmp_path / "out"), *text],
        "eval": ["eval", str(custom), "--tasks", str(tiny_text_file), "--seqlen", "16", "--limit", "1"],
    }
    for case, arguments in refusals.items():
        result = runner.invoke(app, arguments)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (case, result.output)
        assert "custom code" in result.output and "--trust-remote-code" in result.output, (case, result.output)
    assert not marker.exists()
    assert not any(name.startswith("transformers_modules") for name in sys.modules)

    control = (  # for each directory: did loading it with explicit remote code write the marker?
        "import pathlib, sys\nfrom transformers import AutoConfig\nmarker = pathlib.Path(sys.argv[1])\n"
        "for directory in sys.argv[2:]:\n"
        "    AutoConfig.from_pretrained(directory, trust_remote_code=True)\n"
        "    print(marker.exists())\n    marker.unlink(missing_ok=True)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "control"), "HF_HUB_OFFLINE": "1"}
    arguments = [sys.executable, "-c", control, str(marker), str(compressed), str(custom)]
    done = subprocess.run(arguments, check=True, env=env, timeout=300, capture_output=True, text=True)
    assert done.stdout.split() == ["True", "True"]  # the marker works: explicit remote code does run it
