"""`--config` recipes: shipped presets load and fit the options, explicit flags win, and a recipe equals its flags."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from swiftsvd_cli import config
from swiftsvd_cli.artifacts.compressed import load_section
from swiftsvd_cli.artifacts.manifest import CalibrationManifest
from swiftsvd_cli.cli import app, compress
from swiftsvd_cli.recipes import KEYS, coerce, load_recipe, presets
from swiftsvd_cli.stages.pipeline import FIELD_DEFAULTS, model_defaults

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b"}


def option_types() -> dict[str, Any]:
    """Every recipe key's annotation, from the CLI commands that take it."""
    types: dict[str, Any] = {}
    for info in app.registered_commands:
        signature = inspect.signature(info.callback, eval_str=True)  # type: ignore[arg-type]
        types |= {name: p.annotation for name, p in signature.parameters.items() if name in KEYS}
    return types


def test_every_key_is_an_option_of_some_command() -> None:
    assert set(option_types()) == set(KEYS)


def test_presets_ship_in_the_package_and_configs_links_to_them() -> None:
    assert set(presets()) == {"demo", "paper"} | FAMILIES
    assert (ROOT / "configs").resolve() == (ROOT / "swiftsvd_cli" / "configs").resolve()


@pytest.mark.parametrize("name", sorted({"demo", "paper"} | FAMILIES))
def test_preset_values_fit_the_options(name: str) -> None:
    types = option_types()
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    recipe = load_recipe(name)
    for key, value in recipe.values.items():
        coerce(value, types[key], key)  # raises on a value of the wrong type or an unknown choice
        line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
        assert "#" in line, f"{name}.yaml: no comment on {key}"


def test_paper_recipe_is_the_builtin_default() -> None:
    paper = load_recipe("paper").values
    defaults = {
        "data": config.DATA,
        "samples": config.SAMPLES,
        "seqlen": config.SEQLEN,
        "seed": config.SEED,
        "sampler": config.SAMPLER.value,
        "dtype": config.DTYPE.value,
        "strategy": config.STRATEGY.value,
        "delta": config.DELTA,
        "val_samples": config.VAL_SAMPLES,
        "method": config.METHOD.value,
    }
    assert {key: value for key, value in paper.items() if key != "tasks"} == defaults
    for family in FAMILIES:
        values = load_recipe(family).values
        assert {key: values[key] for key in defaults} == defaults, family


def test_compress_demo_without_config_uses_the_demo_recipe() -> None:
    """The one shot's demo defaults come from demo.yaml; its other keys must equal the built-in defaults."""
    demo = load_recipe("demo").values
    assert model_defaults("demo") == {key: demo[key] for key in FIELD_DEFAULTS}
    signature = inspect.signature(compress, eval_str=True)
    for key, value in demo.items():
        if key in signature.parameters and key not in FIELD_DEFAULTS and key != "model":
            assert signature.parameters[key].default == value, key


def test_unknown_key_and_bad_value_are_one_line_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("samples: 8\nsampels: 9\n")
    result = runner.invoke(app, ["calibrate", "demo", "--out", str(tmp_path / "w"), "--config", str(recipe)])
    assert result.exit_code == 1
    assert "unknown key 'sampels'" in result.output and "valid keys: model, revision" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    recipe.write_text("strategy: dynamc\n")
    result = runner.invoke(app, ["allocate", str(tmp_path), "--ratio", "0.5", "--config", str(recipe)])
    assert result.exit_code == 1 and "strategy must be one of dynamic, uniform, global, not 'dynamc'" in result.output
    result = runner.invoke(app, ["allocate", str(tmp_path), "--ratio", "0.5", "--config", "nosuch"])
    assert result.exit_code == 1 and "recipes: demo, llama-2-7b" in result.output


def test_recipe_equals_its_flags_and_explicit_flags_win(
    trained_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """`compress MODEL --config R` builds the same model as the flags R stands for; a flag beats the recipe."""
    values = {"data": str(tiny_text_file), "samples": 8, "seqlen": 32, "seed": 5, "strategy": "dynamic"}
    values |= {"delta": 0.3, "val_samples": 1, "method": "swift", "dtype": "float32", "device": "cpu"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**values, "tasks": "demo", "limit": 3}))  # eval keys: ignored by compress
    common = [str(trained_llama_dir), "--ratio", "0.6"]
    by_recipe = runner.invoke(app, ["compress", *common, "--out", str(tmp_path / "a"), "--work", str(tmp_path / "wa")]
                              + ["--config", str(recipe)])  # fmt: skip
    assert by_recipe.exit_code == 0, by_recipe.output
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in values.items()]
    by_flags = runner.invoke(app, ["compress", *common, "--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb"),
                                   *flags])  # fmt: skip
    assert by_flags.exit_code == 0, by_flags.output
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[name].equal(b[name]) for name in a)
    section_a, section_b = load_section(tmp_path / "a"), load_section(tmp_path / "b")
    for part, differs in (("options", {"out", "plan"}), ("allocation", {"work"}), ("calibration", set())):
        x, y = getattr(section_a, part), getattr(section_b, part)
        assert {key for key in x if x[key] != y[key]} == differs, part  # recorded and, but for paths, the same
    assert section_a.allocation["delta"] == 0.3 and section_a.calibration["seed"] == 5

    wins = runner.invoke(app, ["compress", *common, "--out", str(tmp_path / "c"), "--work", str(tmp_path / "wc")]
                         + ["--config", str(recipe), "--samples", "4"])  # fmt: skip
    assert wins.exit_code == 0, wins.output
    assert CalibrationManifest.load(tmp_path / "wc").settings.samples == 4
    assert CalibrationManifest.load(tmp_path / "wc").options["seed"] == 5
    plan = json.loads(next((tmp_path / "wc" / "plans").iterdir()).read_text())
    assert plan["options"]["delta"] == 0.3 and plan["options"]["val_samples"] == 1
