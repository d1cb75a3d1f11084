"""The package's import rules, read from the source: layers import only downwards, stages never import each other.

Layers, lowest first: `core` (torch and the standard library only) < `artifacts` < `data` < `model` < `metrics`
< `engine` < `figures` < `stages` < `tables` (it renders stage results) < `cli`. A module may import its own
package and lower layers (`errors`, `log`, `config`, `recipes`, `distributed` and the package root's
`__version__` are below everything but `core`). Only `stages.pipeline` composes stages; nothing imports `cli` but
`__main__`. The modeling code shipped inside checkpoints (`model/hf`) imports only torch, transformers, the
standard library and itself. The benchmark script uses only the public surface (`PUBLIC`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "swiftsvd_cli"
LAYERS = {
    "core": 0,
    "errors": 1,
    "log": 1,
    "config": 2,
    "recipes": 2,
    "distributed": 2,
    "artifacts": 3,
    "data": 4,
    "model": 5,
    "metrics": 6,
    "engine": 7,
    "figures": 8,
    "stages": 9,
    "tables": 10,
    "cli": 11,
    "__main__": 12,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def top(name: str) -> str:
    """'swiftsvd_cli.stages.allocate' -> 'stages'; the package root itself -> ''."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(modules: dict[str, set[str]]) -> list[str]:
    known = set(modules)
    found: list[str] = []
    for name, imported in modules.items():
        layer = top(name)
        if not layer:
            continue  # the root's lazy API may import anything
        for target in sorted(imported):
            if layer == "core" and target.split(".")[0] not in {"torch", "swiftsvd_cli"} | sys.stdlib_module_names:
                found.append(f"{name} (core) imports {target}: core is torch and the standard library only")
            if not target.startswith("swiftsvd_cli") or target not in known:
                continue
            other = top(target)
            if layer == "core" and other != "core":
                found.append(f"{name} (core) imports {target}")
            elif other == "" and target != "swiftsvd_cli":
                continue
            elif other == "cli" and layer != "__main__":
                found.append(f"{name} imports the CLI ({target})")
            elif layer == other == "stages" and name != "swiftsvd_cli.stages.pipeline" and target != name:
                if target != "swiftsvd_cli.stages":
                    found.append(f"stage {name} imports stage {target}: only stages.pipeline composes stages")
            elif other and layer != other and LAYERS[other] >= LAYERS[layer]:
                found.append(f"{name} ({layer}) imports {target} ({other}): imports must go to lower layers")
    return found


def package_modules() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_is_in_a_layer() -> None:
    assert {top(name) for name in package_modules()} - {""} <= set(LAYERS)


def test_imports_follow_the_layers() -> None:
    assert violations(package_modules()) == []


@pytest.mark.parametrize(
    ("module", "target", "why"),
    [
        ("swiftsvd_cli.stages.compress", "swiftsvd_cli.stages.allocate", "imports stage"),
        ("swiftsvd_cli.core.linalg", "swiftsvd_cli.artifacts.store", "(core) imports"),
        ("swiftsvd_cli.core.linalg", "numpy", "core is torch and the standard library only"),
        ("swiftsvd_cli.model.loading", "swiftsvd_cli.stages.compress", "lower layers"),
        ("swiftsvd_cli.stages.evaluate", "swiftsvd_cli.cli", "imports the CLI"),
    ],
)
def test_a_violation_is_caught(module: str, target: str, why: str) -> None:
    """Each rule fails on a deliberate violation (today's old layout had the first and the fourth)."""
    modules = package_modules()
    modules[module] = modules[module] | {target}
    assert any(why in line for line in violations(modules))


def test_import_graph_has_no_cycles() -> None:
    """Module-level imports only (lazy ones inside functions cannot cycle at import time)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("swiftsvd_cli"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("swiftsvd_cli")}
        graph[name] = targets - {name}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [])


PUBLIC = (
    "swiftsvd_cli.core",
    "swiftsvd_cli.artifacts",
    "swiftsvd_cli.model.architectures",
    "swiftsvd_cli.figures",
    "swiftsvd_cli.errors",
    "swiftsvd_cli.model.hf",
    "swiftsvd_cli.data.text",
    "swiftsvd_cli.metrics.speed",
    "swiftsvd_cli.metrics.perplexity",
)
"""Besides the names `swiftsvd_cli` exports: the modules scripts may use (math, formats, adapters, plots, the
modeling code every checkpoint ships, the text sources, the speed measurement and the perplexity protocol)."""
SCRIPTS = sorted((PACKAGE.parent / "scripts").glob("*.py"))


def public_violations(source: str) -> list[str]:
    """Imports of swiftsvd internals (or of private names) in a script."""
    import swiftsvd_cli

    found = []
    for node in ast.walk(ast.parse(source)):
        pairs = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            pairs = [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs = [(alias.name, "") for alias in node.names]
        for module, name in pairs:
            if not module.startswith("swiftsvd_cli"):
                continue
            if module == "swiftsvd_cli":
                public = name in swiftsvd_cli.__all__ or f"{module}.{name}".startswith(PUBLIC)
            else:
                public = module.startswith(PUBLIC) and not name.startswith("_")
            if not public:
                found.append(f"{module}.{name}" if name else module)
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_use_only_the_public_surface(script: Path) -> None:
    assert public_violations(script.read_text(encoding="utf-8")) == []


def test_a_script_reaching_inside_is_caught() -> None:
    source = (PACKAGE.parent / "scripts" / "benchmark.py").read_text(encoding="utf-8")
    assert public_violations(source + "\nfrom swiftsvd_cli.engine.factors import FactorSource\n") == [
        "swiftsvd_cli.engine.factors.FactorSource"
    ]
    assert public_violations("from swiftsvd_cli import _API\nfrom swiftsvd_cli.core.linalg import _symmetric\n") == [
        "swiftsvd_cli._API",
        "swiftsvd_cli.core.linalg._symmetric",
    ]
