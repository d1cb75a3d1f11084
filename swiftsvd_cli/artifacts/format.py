"""Artifact formats: every JSON artifact is a frozen dataclass with its own `kind` and `format_version`.

One reader, `load_artifact`, serves every format: it checks the kind, upgrades an older version it knows how to
read, refuses any other version with a `VersionMismatchError` naming the file, the version found and the one this
swiftsvd reads, and rebuilds the nested dataclasses from their type hints. Formats are versioned separately, so
bumping one (say the plan) invalidates only that artifact, not every WORK.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from swiftsvd_cli.artifacts.store import atomic_write_json, read_json
from swiftsvd_cli.errors import SwiftSVDError

A = TypeVar("A", bound="Artifact")
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
"""A module name as artifacts record it ("self_attn.q_proj", "model.layers.0.mlp.up_proj"): never `../x` or a path."""
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


class VersionMismatchError(SwiftSVDError):
    """An artifact of another format version than this swiftsvd reads (and cannot upgrade)."""


class Artifact:
    """Base of the artifact dataclasses: what a format is called, its version, and how to redo it when stale."""

    KIND: ClassVar[str]  # written as "kind": what the file is
    FORMAT_VERSION: ClassVar[int]  # written as "format_version": bump on any change a reader must know about
    TITLE: ClassVar[str]  # the human name in messages ("rank plan")
    REMEDY: ClassVar[str]  # what to do with a stale file ("rerun `swiftsvd allocate`")
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {}  # older version -> function turning it into the current one

    def to_dict(self) -> dict[str, Any]:
        fields = jsonable(dataclasses.asdict(self))  # type: ignore[call-overload]
        return {"kind": self.KIND, "format_version": self.FORMAT_VERSION, **fields}

    def save(self, path: Path) -> None:
        """Write atomically as JSON (temp file + rename)."""
        atomic_write_json(path, self.to_dict())


def jsonable(value: Any) -> Any:
    """Plain JSON values from dataclass dicts and options: paths as strings, enums as their values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key) if not isinstance(key, str) else key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def load_artifact(cls: type[A], path: Path, key: str | None = None) -> A:
    """Read the `cls` artifact at `path` (or at `path`'s top-level `key`, e.g. the `swiftsvd` section of config.json).

    Kind and version are checked first, so a stale or foreign file fails with a message that says which file, what
    it is and what to do, never with a KeyError deep inside.
    """
    data = read_json(path, cls.TITLE)
    where = f"{path}" if key is None else f"{path} ({key!r} section)"
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), dict):
            raise SwiftSVDError(f"{path} has no swiftsvd {cls.TITLE} ({key!r} section)")
        data = data[key]
    if not isinstance(data, dict):
        raise SwiftSVDError(f"{where} is not a swiftsvd {cls.TITLE}")
    version = data.get("format_version")
    while isinstance(version, int) and not isinstance(version, bool) and version in cls.UPGRADES:
        try:
            data = cls.UPGRADES[version](dict(data))
        except (KeyError, TypeError, ValueError) as error:
            raise SwiftSVDError(
                f"{where} is a malformed {cls.TITLE} of format {version} ({error}): {cls.REMEDY}"
            ) from None
        version = data.get("format_version")
    kind = data.get("kind")
    if kind != cls.KIND:
        found = f"a swiftsvd '{kind}' artifact" if isinstance(kind, str) else "no swiftsvd artifact"
        raise SwiftSVDError(f"{where} is {found}, not a {cls.TITLE}")
    if version != cls.FORMAT_VERSION or isinstance(version, bool):
        raise VersionMismatchError(
            f"{where}: {cls.TITLE} format version {version}, this swiftsvd reads version {cls.FORMAT_VERSION}: "
            f"{cls.REMEDY}"
        )
    body = {name: value for name, value in data.items() if name not in ("kind", "format_version")}
    try:
        return typing.cast(A, _build(cls, body))
    except (KeyError, TypeError, ValueError) as error:
        raise SwiftSVDError(f"{where} is a malformed {cls.TITLE} ({error}): {cls.REMEDY}") from error


def _build(tp: Any, value: Any) -> Any:
    """`value` (parsed JSON) as an instance of the type hint `tp`; TypeError/ValueError when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _build(option, value)
            except (TypeError, ValueError) as error:
                last = error
        raise last or TypeError(f"{value!r} does not fit {tp}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        unknown = set(value) - {f.name for f in dataclasses.fields(tp) if f.init}
        if unknown:
            raise TypeError(f"unknown field(s) {', '.join(sorted(unknown))} in {tp.__name__}")
        return tp(**{name: _build(hints[name], item) for name, item in value.items()})
    if origin in (dict, Mapping) or tp is dict:
        key_type, item_type = args or (str, Any)
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {value!r}")
        return {_build(key_type, key): _build(item_type, item) for key, item in value.items()}
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"expected {len(args)} items, got {value!r}")
            return tuple(_build(arg, item) for arg, item in zip(args, value, strict=True))
        items = [_build(args[0] if args else Any, item) for item in value]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is int and isinstance(value, str):
        return int(value)  # JSON object keys are strings: {"0": ...} is layer 0
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool)):
        raise TypeError(f"expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value
