"""Run recipes: YAML files of settings for `--config NAME_OR_PATH`, with a comment per setting.

The named recipes ship inside the package (`swiftsvd_cli/configs/*.yaml`, package data) and the repository's
top-level `configs/` is a link to that folder: one copy of each file, found by `importlib.resources` alike in a
wheel, an editable install and a plain checkout, so `--config demo` works after a plain `pip install`.

A recipe is one flat mapping whose keys are option names (`batch_size` for `--batch-size`). One recipe serves the
whole pipeline: each command takes the keys it has an option for and leaves the others to the commands that do
(`samples` is calibration's, `tasks` is eval's, `seqlen` is both the calibration and the perplexity window).
Explicit flags win over the recipe; a key no command knows is an error that lists the valid ones.
"""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

from swiftsvd_cli.errors import SwiftSVDError

KEYS = (
    "model",  # MODEL of calibrate and compress (hub id, local directory, .gguf or demo)
    "revision",
    "trust_remote_code",
    "dtype",
    "device",
    "data",  # calibration text
    "samples",
    "seqlen",  # calibration window, and eval's perplexity window
    "seed",
    "sampler",  # calibration windows: tokens (ours) or svd-llm (SVD-LLM's sampler, draw for draw)
    "batch_size",  # windows per forward pass (calibration, and eval)
    "strategy",
    "alpha",
    "delta",
    "method",
    "val_data",
    "val_samples",
    "merge",
    "factor_dtype",  # int8: factors stored as int8 codes + row scales
    "tasks",
    "limit",
    "zeroshot_limit",
)
"""Every key a recipe may set: the options of the commands that a recipe makes sense for (not --out, --force)."""

SUFFIX = ".yaml"


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: where it came from (preset name or path) and its settings."""

    source: str
    values: dict[str, Any]


def presets() -> list[str]:
    """The names of the recipes shipped with swiftsvd."""
    return sorted(
        Path(entry.name).stem
        for entry in files("swiftsvd_cli").joinpath("configs").iterdir()
        if entry.name.endswith(SUFFIX)
    )


def load_recipe(spec: str) -> Recipe:
    """A recipe by preset name (`demo`) or by path (`my-run.yaml`); a path that exists wins over a preset name."""
    import yaml

    path = Path(spec).expanduser()
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif spec in presets():
        text, source = files("swiftsvd_cli").joinpath("configs", spec + SUFFIX).read_text(encoding="utf-8"), spec
    else:
        raise SwiftSVDError(f"--config {spec}: no such file and no such recipe; recipes: {', '.join(presets())}")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SwiftSVDError(f"{source} is not valid YAML: {str(error).splitlines()[0]}") from error
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise SwiftSVDError(f"{source} must be a mapping of settings (key: value), not a {type(values).__name__}")
    unknown = [str(key) for key in values if key not in KEYS]
    if unknown:
        raise SwiftSVDError(f"{source}: unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(KEYS)}")
    return Recipe(source=source, values=values)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """A recipe value as an option's type (`Annotated[int | None, ...]` -> int or None), else a one-line error.

    YAML gives ints, floats, bools and strings; a choice must be one of its enum's values, a float accepts an int.
    """
    kind = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum) and value in {m.value for m in option}:
            return option(value)
        if option is bool and isinstance(value, bool):
            return value
        if option in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if option is float or isinstance(value, int):
                return option(value)
        if option in (str, Path) and isinstance(value, str):
            return option(value)
    expected = " or ".join(
        "one of " + ", ".join(m.value for m in o) if isinstance(o, type) and issubclass(o, enum.Enum) else o.__name__
        for o in options
    )
    raise SwiftSVDError(f"{where} must be {expected}, not {value!r}")
