"""The floors of the code base never loop: each package imports only from the floors below it.

    presence  (command line, local broker, demo, simulator, inspection tools)   bench (benchmarks) on top of all
    gateway   |   streams        side by side, never importing each other
    core      (settings, topics, logs, Kafka clients, the upstream contract)

Faust and mode are imported only by ``streams.runtime``, the one place that may touch their internals, and only
``streams.runtime`` and the worker's entry point (``streams.main``) import it. Imports inside functions count
as much as those at the top of a module. No two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> the project packages it may import (itself aside)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "gateway": {"core"},
    "streams": {"core"},
    "presence": {"core", "gateway", "streams"},
    "bench": {"core", "gateway", "streams", "presence"},
}
FAUST_LIBRARIES = {"faust", "mode"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path) -> Iterator[str]:
    """Every module name ``module`` imports, with relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # `from pkg import module` imports a module, not only a name
            yield from (f"{base}.{alias.name}" for alias in node.names)


def project_imports() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        graph[module] = {name for name in imports_of(module, path) if name in known and name != module}
    return graph


def top(name: str) -> str:
    return name.split(".")[0]


def test_no_arrow_runs_back_up() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in project_imports().items()
        for target in targets
        if top(target) != top(module) and top(target) not in ALLOWED[top(module)]
    ]
    assert not wrong, "imports that run up or across a floor:\n" + "\n".join(sorted(wrong))


def test_faust_is_touched_only_in_streams_runtime() -> None:
    wrong = []
    for module, path in modules().items():
        for name in imports_of(module, path):
            if top(name) in FAUST_LIBRARIES and not module.startswith("streams.runtime"):
                wrong.append(f"{module} imports {name}")
            if name.startswith("streams.runtime") and not (
                module.startswith("streams.runtime") or module == "streams.main" or top(module) != "streams"
            ):
                wrong.append(f"{module} imports {name}: the pure streams modules sit below the runtime")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_module_circle() -> None:
    graph = project_imports()
    # a package's __init__ is not an import of its modules' neighbours: skip edges into bare packages
    graph = {
        m: {t for t in ts if not (ROOT / t.replace(".", "/") / "__init__.py").exists()}
        for m, ts in graph.items()
    }
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from gateway import config", {"gateway", "gateway.config"}),
        ("def f():\n    from streams.rules import apply", {"streams.rules", "streams.rules.apply"}),
        ("from . import fixes", {"streams.runtime", "streams.runtime.fixes"}),
    ],
)
def test_imports_are_read_from_anywhere_in_a_module(source: str, expected: set[str], tmp_path: Path) -> None:
    """The check would be toothless if it missed imports inside functions or relative ones."""
    path = tmp_path / "app.py"
    path.write_text(source)
    assert set(imports_of("streams.runtime.app", path)) == expected
