"""Hostile and damaged artifacts, by a seeded mutation loop over real tiny artifacts.

One pristine tree (a tiny random Llama, its WORK with Grams, eigenbases and a plan, and the compressed model)
is built once; every case copies it, damages one file (truncation, bit flips, wrong types, missing or extra
fields, wrong kind/version, shards with wrong dtype/shape/extra/missing/non-finite tensors re-signed into their
manifest, plans naming modules that do not exist or `../x`, ranks out of range, NaN, a bad `swiftsvd` section)
and runs the stage that reads it through the CLI. Every case must end in one `error:` line naming the damaged
artifact, exit 1, no traceback, no file written outside the stage's output, and every other file untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from swiftsvd_cli.cli import app

SEED = 16
PLAN = "work/plans/ratio-0.50-uniform.json"
FREE = {"options", "allocation", "calibration", "validation", "versions", "inputs", "candidates"}
"""Fields typed `dict[str, Any]`: records of settings, where any JSON value is valid."""
DEFAULTED = {"sampler", "layers", "alpha", "delta", "candidates", "validation", "factor_dtype", "bytes_ratio"}
DEFAULTED |= {"achieved_bytes_ratio", "int8_dense", "inputs", "compensation", "kv_cache", "kv_ratio"}
"""Fields with a default: dropping one is a valid older file, not damage."""
COMMANDS = {  # consumer -> (arguments, the one folder it may write into)
    "allocate": (
        ["allocate", "{root}/work", "--ratio", "0.4", "--strategy", "uniform", "--name", "probe", "--device", "cpu"],
        "work",
    ),
    "compress": (
        ["compress", "{model}", "--plan", f"{{root}}/{PLAN}", "--out", "{root}/out2", "--device", "cpu"],
        "out2",
    ),
    "eval": (["eval", "{root}/out", "--tasks", "{root}/text.txt", "--seqlen", "16", "--limit", "1"], None),
}
FILES = {  # damaged file -> the stage that must refuse it
    "work/manifest.json": "allocate",
    "work/eigen/index.json": "compress",
    PLAN: "compress",
    "out/config.json": "eval",
    "work/covariance/layer_000.safetensors": "allocate",
    "work/covariance/layer_001.safetensors": "allocate",
    "work/eigen/layer_000.safetensors": "compress",
    "work/eigen/layer_001.safetensors": "allocate",
    "out/model.safetensors": "eval",
}


@dataclass(frozen=True)
class Case:
    name: str
    file: str  # relative to the case root
    mutate: Callable[[Path], None]  # damages the case root in place
    consumer: str = ""  # default: FILES[file]
    drop_eigen: bool = False  # remove WORK/eigen first, so allocate has to read the Grams
    heals: bool = False  # a damaged cache shard: recomputed, bit-identical to the pristine one, and the run goes on


# --- the pristine tree --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_text_file: Path) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    shutil.copytree(tiny_llama_dir, root / "model")
    shutil.copyfile(tiny_text_file, root / "text.txt")
    runner = CliRunner()
    steps = [
        ["calibrate", f"{root}/model", "--out", f"{root}/work", "--data", f"{root}/text.txt", "--samples", "4"],
        ["allocate", f"{root}/work", "--ratio", "0.5", "--strategy", "uniform", "--device", "cpu"],
        ["compress", f"{root}/model", "--plan", f"{root}/{PLAN}", "--out", f"{root}/out", "--device", "cpu"],
    ]
    for step in steps:
        result = runner.invoke(app, [*step, *(["--seqlen", "32", "--device", "cpu"] if step[0] == "calibrate" else [])])
        assert result.exit_code == 0, result.output
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# --- JSON mutations -----------------------------------------------------------------------------------------------


def read(root: Path, file: str) -> Any:
    return json.loads((root / file).read_text())


def write(root: Path, file: str, data: Any) -> None:
    (root / file).write_text(json.dumps(data, indent=2))  # NaN and Infinity as Python's json writes them


def section(file: str) -> tuple[str, ...]:
    """Where an artifact lives inside its file: config.json carries the compressed section under `swiftsvd`."""
    return ("swiftsvd",) if file == "out/config.json" else ()


def at(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def typed_nodes(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every (path, value) of a typed field: not inside a free record, not a mapping's entry name."""
    yield path, data
    if isinstance(data, dict):
        for key, value in data.items():
            if key not in FREE:
                yield from typed_nodes(value, (*path, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from typed_nodes(value, (*path, index))


def wrong_type(value: Any, rng: random.Random) -> Any:
    """A JSON value no field typed like `value` accepts (None is valid for optional fields, so never None)."""
    if isinstance(value, bool):
        options: list[Any] = ["yes", 0, 1.5, [], {}]
    elif isinstance(value, int):
        options = ["7", 1.5, [], {}, True]
    elif isinstance(value, float):
        options = ["x", [], {}, True]
    elif isinstance(value, str):
        options = [7, 1.5, [], {}, True]
    elif value is None:
        options = [[], {}]
    elif isinstance(value, list):
        options = ["x", 7, {}]
    else:
        options = ["x", 7, []]
    return rng.choice(options)


def json_cases(base: Path, file: str, rng: random.Random, draws: int) -> Iterator[Case]:
    """Generic damage to one JSON artifact of the pristine tree `base`: `draws` cases of each kind."""
    inner = section(file)
    data = at(read(base, file), inner)
    nodes = [p for p, _ in typed_nodes(data) if p]
    required = [p for p in nodes if isinstance(p[-1], str) and p[-1] not in DEFAULTED and not mapping(p)]
    records = [()] + [p for p in nodes if isinstance(at(data, p), dict) and not mapping((*p, ""))]
    raw = (base / file).read_bytes()
    structural = structural_offsets(raw)
    own_kind = data["kind"]
    for _ in range(draws):
        path = rng.choice(nodes)
        bad = wrong_type(at(data, path), rng)
        yield Case(f"{file}: {dotted(path)} = {bad!r}", file, set_at(file, inner + path, bad))
        path = rng.choice(required)
        yield Case(f"{file}: drop {dotted(path)}", file, drop_at(file, inner + path))
        path = rng.choice(records)
        yield Case(
            f"{file}: extra field in {dotted(path) or 'top'}", file, set_at(file, (*inner, *path, "surprise"), 1)
        )
        kind = rng.choice(
            [k for k in ("plan", "calibration", "eigen", "compressed", "eval", "x", None, 3) if k != own_kind]
        )
        yield Case(f"{file}: kind {kind!r}", file, set_at(file, (*inner, "kind"), kind))
        version = rng.choice([0, -1, 99, "2", None, 2.5, True, 10**9])
        yield Case(f"{file}: format_version {version!r}", file, set_at(file, (*inner, "format_version"), version))
        cut = rng.randrange(0, len(raw) - 1)
        yield Case(f"{file}: truncated at {cut} of {len(raw)}", file, truncate(file, cut / len(raw)))
        index, bit = rng.randrange(len(structural)), rng.randrange(8)
        yield Case(f"{file}: bit {bit} of structural byte {index} flipped", file, flip_structural(file, index, bit))


def structural_offsets(raw: bytes) -> list[int]:
    """Offsets of JSON's structural bytes ({ } [ ] : , and the quotes), not of those inside strings."""
    offsets, inside, escaped = [], False, False
    for offset, char in enumerate(raw.decode()):
        if inside and not escaped and char == "\\":
            escaped = True
            continue
        if char == '"' and not escaped:
            inside = not inside
            offsets.append(offset)
        elif not inside and char in "{}[]:,":
            offsets.append(offset)
        escaped = False
    return offsets


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path))


def mapping(path: tuple[Any, ...]) -> bool:
    """Whether `path`'s last key is an entry of a name-keyed mapping (layers, shapes, ranks), not a record field."""
    return len(path) >= 2 and path[-2] in ("layers", "shapes", "ranks")


def set_at(file: str, path: tuple[Any, ...], value: Any) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = read(root, file)
        container = at(data, path[:-1])
        if isinstance(container, list) and path[-1] == len(container):
            container.append(value)
        else:
            container[path[-1]] = value
        write(root, file, data)

    return mutate


def drop_at(file: str, path: tuple[Any, ...]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = read(root, file)
        del at(data, path[:-1])[path[-1]]
        write(root, file, data)

    return mutate


def rename_key(file: str, path: tuple[Any, ...], new: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = read(root, file)
        container = at(data, path[:-1])
        container[new] = container.pop(path[-1])
        write(root, file, data)

    return mutate


def truncate(file: str, fraction: float) -> Callable[[Path], None]:
    """Keep the first `fraction` of the file (a fraction: the copy's plan names a longer WORK path)."""

    def mutate(root: Path) -> None:
        raw = (root / file).read_bytes()
        (root / file).write_bytes(raw[: int(fraction * len(raw))])

    return mutate


def flip_structural(file: str, index: int, bit: int) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        flip(file, structural_offsets((root / file).read_bytes())[index], bit)(root)

    return mutate


def flip(file: str, offset: int, bit: int) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = bytearray((root / file).read_bytes())
        data[offset] ^= 1 << bit
        (root / file).write_bytes(bytes(data))

    return mutate


# --- targeted damage: what a hostile user would write -------------------------------------------------------------


def plan_cases(base: Path, rng: random.Random, draws: int) -> Iterator[Case]:
    modules = read(base, PLAN)["modules"]
    for _ in range(draws):
        i = rng.randrange(len(modules))
        m, n = modules[i]["m"], modules[i]["n"]
        edits: list[tuple[str, Any]] = [
            ("module", rng.choice(["../x", "../../etc/passwd", "mlp.nope", "self_attn/q_proj", "", "__class__"])),
            ("layer", rng.choice([-1, 2, 10**6])),
            ("rank", rng.choice([-1, min(m, n) + 1, 10**9, math.nan, 1.5])),
            ("m", m + 1),
            ("n", rng.choice([0, n - 1])),
            ("dense", not modules[i]["dense"]),
            (rng.choice(["predicted_loss", "relative_loss", "importance", "ner"]), rng.choice([math.nan, math.inf])),
        ]
        for key, value in edits:
            yield Case(f"plan: modules.{i}.{key} = {value!r}", PLAN, set_at(PLAN, ("modules", i, key), value))
    for key, value in [
        ("target_ratio", math.nan),
        ("target_ratio", 2.0),
        ("target_ratio", -0.1),
        ("target_ratio", 0.0),
        ("achieved_ratio", math.inf),
        ("alpha", 1.5),
        ("alpha", math.nan),
        ("work", "/nonexistent/work"),
        ("work", "../x"),
        ("work", ""),
        ("target", {"ppl": math.nan, "validation_ppl": 20.0}),
        ("target", {"ppl": "30", "validation_ppl": 20.0}),
        ("target", {"ppl": 30.0}),
    ]:
        yield Case(f"plan: {key} = {value!r}", PLAN, set_at(PLAN, (key,), value))
    yield Case("plan: made for another model", PLAN, set_at(PLAN, ("model", "fingerprint"), "0" * 64))
    yield Case("plan: a module twice", PLAN, set_at(PLAN, ("modules", len(modules)), modules[0]))


def manifest_cases() -> Iterator[Case]:
    file = "work/manifest.json"
    for new in ("-1", "2", "x"):
        yield Case(f"manifest: layer key 0 -> {new}", file, rename_key(file, ("layers", "0"), new))
    for bad in ("../x.safetensors", "/etc/passwd", "", "covariance/../../model/model.safetensors"):
        yield Case(f"manifest: shard file {bad!r}", file, set_at(file, ("layers", "0", "shard", "file"), bad))
    for key, value in (("sha256", "zz"), ("bytes", -1)):
        yield Case(f"manifest: shard {key} {value!r}", file, set_at(file, ("layers", "1", "shard", key), value))
    yield Case("manifest: tokens 0", file, set_at(file, ("layers", "0", "tokens"), 0))
    yield Case("manifest: importance NaN", file, set_at(file, ("layers", "1", "importance"), math.nan))
    for layers in (0, 1, 3):
        yield Case(f"manifest: num_layers {layers}", file, set_at(file, ("model", "num_layers"), layers))
    for shape in ([0, 32], [32]):
        yield Case(f"manifest: q_proj shape {shape}", file, set_at(file, ("shapes", "self_attn.q_proj"), shape))
    wrong = set_at(file, ("shapes", "self_attn.q_proj"), [32, 47])  # consistent with the eigen shards: compress sees it
    yield Case("manifest: q_proj shape [32, 47]", file, wrong, consumer="compress")
    yield Case("manifest: q_proj shape dropped", file, drop_at(file, ("shapes", "self_attn.q_proj")))
    yield Case("manifest: model_type gpt2", file, set_at(file, ("model", "model_type"), "gpt2"))
    yield Case("manifest: another model", file, set_at(file, ("model", "fingerprint"), "0" * 64), drop_eigen=True)


def eigen_index_cases() -> Iterator[Case]:
    file = "work/eigen/index.json"
    yield Case("eigen index: layer key 0 -> -1", file, rename_key(file, ("layers", "0"), "-1"))
    for bad in ("../covariance/layer_000.safetensors", "/etc/passwd"):
        yield Case(f"eigen index: shard file {bad!r}", file, set_at(file, ("layers", "0", "shard", "file"), bad))
    yield Case("eigen index: gram_sha256 'x'", file, set_at(file, ("layers", "1", "gram_sha256"), "x"))


def section_cases() -> Iterator[Case]:
    file = "out/config.json"
    layer0 = "model.layers.0"
    for value in (5, [], "x", None):
        yield Case(f"config: swiftsvd section = {value!r}", file, set_at(file, ("swiftsvd",), value))
    yield Case("config: swiftsvd section dropped", file, drop_at(file, ("swiftsvd",)))
    for name, rank in (
        ("../x", 3),
        (f"{layer0}.self_attn.nope", 3),
        (f"{layer0}.self_attn.q_proj", -1),
        (f"{layer0}.self_attn.q_proj", 0),
        (f"{layer0}.mlp.down_proj", 10**6),
        ("model.embed_tokens", 4),
    ):
        yield Case(f"config: rank {name} = {rank}", file, set_at(file, ("swiftsvd", "ranks", name), rank))
    yield Case("config: factor_dtype int4", file, set_at(file, ("swiftsvd", "factor_dtype"), "int4"))
    yield Case("config: target_ratio NaN", file, set_at(file, ("swiftsvd", "target_ratio"), math.nan))
    for model_type in ("swiftsvd_gpt2", "gpt2", 3):
        yield Case(f"config: model_type {model_type!r}", file, set_at(file, ("model_type",), model_type))
    yield Case("config: hidden_size 64", file, set_at(file, ("hidden_size",), 64))


# --- safetensors damage -------------------------------------------------------------------------------------------


def record_of(root: Path, file: str) -> tuple[str, tuple[Any, ...]]:
    """The JSON file and path of the shard record that lists `file` (WORK-relative) with its checksum."""
    relative = file.removeprefix("work/")
    index = "work/manifest.json" if relative.startswith("covariance/") else "work/eigen/index.json"
    layers = read(root, index)["layers"]
    layer = next(key for key, record in layers.items() if record["shard"]["file"] == relative)
    return index, ("layers", layer, "shard")


def resigned(
    file: str, damage: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | bytes]
) -> Callable[[Path], None]:
    """Damage a shard's content, then record its new checksum: only a content check can refuse it."""

    def mutate(root: Path) -> None:
        path = root / file
        result = damage(load_file(str(path)))
        if isinstance(result, bytes):
            path.write_bytes(result)
        else:
            save_file(result, str(path))
        if file.startswith("work/"):
            index, record = record_of(root, file)
            data = read(root, index)
            at(data, record)["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            at(data, record)["bytes"] = path.stat().st_size
            write(root, index, data)

    return mutate


def tensor_damage(rng: random.Random, raw: bytes) -> Iterator[tuple[str, Callable[[dict[str, torch.Tensor]], Any]]]:
    """(description, damage) pairs drawn with `rng`, each a function of the shard's tensors."""

    def pick(tensors: dict[str, torch.Tensor], floating: bool = False) -> str:
        names = sorted(k for k, t in tensors.items() if (t.is_floating_point() and t.numel()) or not floating)
        return names[choice % len(names)]

    choice = rng.randrange(10**6)
    yield "wrong dtype", lambda t: t | {(k := pick(t, True)): t[k].to(torch.float16)}
    yield "wrong shape", lambda t: t | {(k := pick(t)): t[k].reshape(-1)[: max(1, t[k].numel() - 1)].clone()}
    yield "extra tensor", lambda t: t | {"surprise": torch.zeros(3)}
    yield "missing tensor", lambda t: {k: v for k, v in t.items() if k != pick(t)}
    value = rng.choice([math.nan, math.inf, -math.inf])
    yield f"{value} in a tensor", lambda t: t | {(k := pick(t, True)): nonfinite(t[k], value, choice)}
    junk = rng.choice([b"", b'{"a": 1}', rng.randbytes(64), raw[:-1]])
    yield f"not safetensors ({len(junk)} bytes)", lambda t: junk


def nonfinite(tensor: torch.Tensor, value: float, seed: int) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[seed % tensor.numel()] = value
    return tensor


def shard_cases(base: Path, rng: random.Random, draws: int) -> Iterator[Case]:
    for file in [f for f in FILES if f.endswith(".safetensors")]:
        raw = (base / file).read_bytes()
        drop_eigen = file.startswith("work/covariance/")
        heals = FILES[file] == "allocate" and file.startswith("work/eigen/")  # allocate recomputes a broken cache
        header = 8 + int.from_bytes(raw[:8], "little")
        for _ in range(draws):
            cut = rng.randrange(0, len(raw) - 1)
            cut = truncate(file, rng.randrange(0, len(raw) - 1) / len(raw))
            yield Case(f"{file}: truncated", file, cut, drop_eigen=drop_eigen, heals=heals)
            # the compressed model has no checksums: a flip in its tensor data is not detectable, one in its header is
            offset = rng.randrange(header if file.startswith("out/") else len(raw))
            bit = rng.randrange(8)
            flipped = flip(file, offset, bit)
            yield Case(f"{file}: bit {bit} of byte {offset} flipped", file, flipped, drop_eigen=drop_eigen, heals=heals)
            for what, damage in tensor_damage(rng, raw):
                if file.startswith("out/") and what == "wrong dtype":
                    continue  # transformers casts a checkpoint's tensors to the model's dtype: not damage
                consumer = "compress" if file.startswith("work/eigen/") else ""  # allocate reads no eigenvectors
                yield Case(f"{file}: {what} (re-signed)", file, resigned(file, damage), consumer, drop_eigen)


def all_cases(base: Path) -> list[Case]:
    rng = random.Random(SEED)
    cases = [case for file in FILES if file.endswith(".json") for case in json_cases(base, file, rng, draws=4)]
    cases += [*plan_cases(base, rng, draws=4), *manifest_cases(), *eigen_index_cases(), *section_cases()]
    cases += shard_cases(base, rng, draws=2)
    return cases


# --- the loop -----------------------------------------------------------------------------------------------------


def run_case(case: Case, pristine: Path, good: dict[str, str], root: Path, runner: CliRunner) -> str | None:
    """Run one case in a fresh copy at `root`; what went wrong, or None when it was refused as it must be."""
    shutil.copytree(pristine, root)
    set_at(PLAN, ("work",), str(root / "work"))(root)  # the copy's plan reads the copy's WORK
    if case.drop_eigen:
        shutil.rmtree(root / "work" / "eigen")
    case.mutate(root)
    before = snapshot(root)
    arguments, output = COMMANDS[case.consumer or FILES[case.file]]
    # the model is the pristine one: its fingerprint covers its path, and no case damages it
    result = runner.invoke(app, [argument.format(root=root, model=pristine / "model") for argument in arguments])
    after = snapshot(root)
    problems = []
    if case.heals:
        healed = result.exit_code == 0 and after[case.file] == good[case.file]
        changed = [n for n, d in before.items() if after.get(n) != d and not n.startswith("work/eigen/")]
        shutil.rmtree(root)
        return None if healed and not changed else f"{case.name}: not healed ({result.output.strip()[-300:]})"
    if result.exit_code != 1 or not isinstance(result.exception, SystemExit):
        problems.append(f"exit {result.exit_code}, {result.exception!r}")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if "Traceback" in result.output or len(errors) != 1:
        problems.append("not one error line")
    elif str(root / case.file) not in errors[0] and str(root / case.file.split("/")[0]) not in errors[0]:
        problems.append("the error names neither the file nor its artifact")
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    new = [name for name in after.keys() - before.keys() if output is None or not name.startswith(f"{output}/")]
    if changed or new:
        problems.append(f"changed {changed}, wrote {new}")
    if output == "out2" and (root / "out2").exists():
        problems.append("wrote an output after all")
    if any(Path(name).name.startswith(".") for name in after):
        problems.append("left a temp file")
    shutil.rmtree(root)
    return None if not problems else f"{case.name}: {'; '.join(problems)}\n    {result.output.strip()[-300:]}"


def test_every_damaged_artifact_is_refused_in_one_line(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"  # relative paths (`../x`) resolve here: nothing may appear in it or next to it
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "cache"))
    cases = all_cases(pristine)
    good = snapshot(pristine)
    runner = CliRunner()
    failures = [
        f for i, case in enumerate(cases) if (f := run_case(case, pristine, good, tmp_path / f"case{i}", runner))
    ]
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert len(cases) >= 200
    assert not any(cwd.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) in (["cwd"], ["cache", "cwd"])
    assert snapshot(pristine) == good
