"""The import graph shows the pipeline: no circles, no upward arrows (go-containerregistry's
depcheck_test.go in spirit).

Every import counts: module-level, inside functions (lazy) and under ``TYPE_CHECKING``, since
each is a dependency a reader has to follow.  Layers, lowest first:

- ``cache``: storage and transport; never imports ``builder``;
- ``builder.frontend`` (Dockerfile -> instructions) < ``builder.plan`` (DAG, sources, keys)
  < ``builder.solve`` (execution, step cache) < ``builder.export`` (images out) < the
  commands on top (``builder.api``, ``cli``, ``watch``, ``compare``, ...).

A module may import its own layer and the layers below it, never above; nothing imports the
CLI but the entry points.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["builder.frontend", "builder.plan", "builder.solve", "builder.export"]
CLI_ENTRY_POINTS = {"builder.__main__", "builder._entry.lbuild.__main__", "builder.entry"}
SIZE_LIMIT_LINES = 700
FUNCTION_LIMIT_LINES = 80


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for top in ("builder", "cache"):
        for p in (ROOT / top).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for t in targets:
                if t in mods and t != name and t not in ("builder", "cache"):
                    g.add_edge(name, t)
    return g


def _layer(module: str) -> int:
    """0.. for the pipeline packages, len(LAYERS) for the commands on top."""
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return len(LAYERS)


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return _graph()


def test_the_graph_is_read(graph: nx.DiGraph) -> None:
    # the reader sees the real imports (a broken reader would make every check below pass)
    assert graph.has_edge("builder.api", "builder.options")
    assert graph.has_edge("builder.solve.solver", "builder.plan.dag")
    assert graph.number_of_edges() > 100


def test_no_import_circles(graph: nx.DiGraph) -> None:
    cycles = [" -> ".join([*c, c[0]]) for c in nx.simple_cycles(graph)]
    assert cycles == []


def test_cache_never_imports_builder(graph: nx.DiGraph) -> None:
    bad = [(a, b) for a, b in graph.edges if a.startswith("cache") and b.startswith("builder")]
    assert bad == []


def test_builder_imports_only_point_down(graph: nx.DiGraph) -> None:
    bad = [
        f"{a} -> {b}"
        for a, b in graph.edges
        if a.startswith("builder") and b.startswith("builder") and _layer(b) > _layer(a)
    ]
    assert bad == []


def test_nothing_imports_the_cli(graph: nx.DiGraph) -> None:
    bad = [a for a, b in graph.edges if b == "builder.cli" and a not in CLI_ENTRY_POINTS]
    assert bad == []


# Modules and functions over the limits, each with the reason it is not split (STYLE.md:
# modules under ~700 lines, functions under ~80, unless a comment says why).
SIZE_EXCEPTIONS: dict[str, str] = {}


def test_modules_and_functions_stay_small() -> None:
    over: list[str] = []
    for name, path in _modules().items():
        src = path.read_text()
        if src.count("\n") > SIZE_LIMIT_LINES and name not in SIZE_EXCEPTIONS:
            over.append(f"{name}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                where = f"{name}.{node.name}"
                if n > FUNCTION_LIMIT_LINES and where not in SIZE_EXCEPTIONS:
                    over.append(f"{where}: {n} lines")
    assert over == []
