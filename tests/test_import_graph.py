"""The package has no import circle, and its parts import each other in one direction only.

Issue 12: "no import circle in the package (a test or a lint rule keeps it so)". A circle that
works today (because one side imports lazily, inside a function) breaks the day someone moves
that import to the top, and it hides which part is the base of which. So this test counts EVERY
import that can execute: module-level ones and the lazy ones inside functions or methods alike.
Only imports under ``if TYPE_CHECKING:`` are left out: they never run.

The layering, bottom to top. A module may import modules of its own layer and of the layers
below it, never above (``LAYERS`` below names the members of each):

1. wire: the ``agentwatch`` modules producers need (codec, key schema, labels, URLs, signing,
   run file, errors). They import nothing else from the package.
2. ``producers``: the client library agents import. Standalone: besides itself it imports only
   the wire modules, so an agent never loads the spine, a detector or a notifier.
3. spine: the rest of ``agentwatch`` (config, Redis connection, alerts, halts, the worker
   runtime, OTLP ingest...). It imports no detector and no notifier, not even lazily.
4. ``detectors``: plugins on the spine.
5. readers: the few spine modules whose job is to read the detectors' state for a view (the
   report, the rollup snapshots and chart series). Here because notifiers send reports.
6. ``notifiers``: plugins fed by the alerts stream. Of ``detectors`` they may import only the
   modules in ``NOTIFIERS_MAY_IMPORT`` (the agents' views, detector names for routing): a new
   entry there is a decision, not an accident.
7. top: the spine modules whose job is to assemble workers from plugins or to serve views of
   everything (CLI, HTTP server, worker assembly, pipeline loading, fleet view, demo).

How an import counts: ``import a.b`` and ``from a.b import c`` point at the nearest module that
exists (``a.b.c`` if it is a module, else ``a.b``), plus every package above it that the importer
is not itself inside (those ``__init__`` files run too). A module's own enclosing packages are
not edges: Python initialises them before the module in any case.

Run this file as a script (``python tests/test_import_graph.py``) to print every circle and every
edge that breaks the layering, with file and line.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agentwatch", "detectors", "notifiers", "producers")

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "wire",
        (
            "agentwatch",  # the package itself: only its version
            "agentwatch.codec",
            "agentwatch.errors",
            "agentwatch.keys",
            "agentwatch.labels",
            "agentwatch.runfile",
            "agentwatch.signing",
            "agentwatch.urls",
        ),
    ),
    ("producers", ("producers",)),
    ("spine", ("agentwatch",)),
    ("detectors", ("detectors",)),
    ("readers", ("agentwatch.report", "agentwatch.rollups", "agentwatch.series")),
    ("notifiers", ("notifiers",)),
    (
        "top",
        (
            "agentwatch.__main__",
            "agentwatch.activity",
            "agentwatch.cli",
            "agentwatch.demo",
            "agentwatch.fleet",
            "agentwatch.http",
            "agentwatch.loading",
            "agentwatch.workers",
        ),
    ),
)
"""Layer name -> modules or packages in it, bottom first. A module belongs to the layer naming it
or its nearest enclosing package (``agentwatch`` as a module is wire; its other modules spine)."""

NOTIFIERS_MAY_IMPORT = frozenset({"detectors", "detectors.agent", "detectors.children", "detectors.schedule"})
"""The detectors modules notifiers use: agents' views (holds: who is overdue) and the alert names of
the silence detector's companions (routing: which ``on`` names exist)."""


@dataclass(frozen=True)
class Edge:
    """One executed import: ``source`` imports ``target`` at ``line`` of ``path``."""

    source: str
    target: str
    path: str  # relative to the root scanned
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.path}:{self.line})"


def find_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the four packages, by dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _executed_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import under ``node`` except those in the body of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _executed_imports_of(other)
            continue
        yield from _executed_imports_of(child)


def _executed_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _executed_imports(node)


def _nearest(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(
    module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]
) -> set[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{alias.name}" for alias in node.names]
    found: set[str] = set()
    for name in names:
        target = _nearest(name, modules)
        while target:
            # The target and every package above it run, except the importer's own packages.
            if not (module == target or module.startswith(target + ".")):
                found.add(target)
            target = target.rpartition(".")[0]
    return found


def build_graph(root: Path = ROOT) -> dict[str, list[Edge]]:
    """Module -> the executed imports it makes of other modules of the package."""
    modules = find_modules(root)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: dict[str, Edge] = {}
        for node in _executed_imports(tree):
            for target in sorted(_targets(module, path, node, modules)):
                edges.setdefault(target, Edge(module, target, str(path.relative_to(root)), node.lineno))
        graph[module] = sorted(edges.values(), key=lambda edge: edge.target)
    return graph


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Components of more than one module (Tarjan, iterative: no recursion limit to mind)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            edges = graph[node]
            if position < len(edges):
                work.append((node, position + 1))
                target = edges[position].target
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def shortest_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """One shortest circle through the first module of a component, as its import edges."""
    members = set(component)
    start = component[0]
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members or edge.target in came_from:
                    continue
                came_from[edge.target] = edge
                if edge.target == start:
                    cycle = [edge]
                    while cycle[0].source != start:
                        cycle.insert(0, came_from[cycle[0].source])
                    return cycle
                following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def describe_cycles(graph: dict[str, list[Edge]]) -> str:
    lines: list[str] = []
    for component in strongly_connected(graph):
        lines.append(f"{len(component)} modules import each other in a circle: {', '.join(component)}")
        lines.append("  for example:")
        lines.extend(f"    {edge}" for edge in shortest_cycle(graph, component))
    return "\n".join(lines)


def layer_of(module: str) -> tuple[int, str]:
    """(rank, name) of the layer holding ``module``: the one naming it or its nearest package."""
    best: tuple[int, int, str] | None = None  # (length of the matched name, rank, layer)
    for rank, (layer, members) in enumerate(LAYERS):
        for member in members:
            exact = module == member
            if exact or (
                module.startswith(member + ".") and not (layer == "wire" and member == "agentwatch")
            ):
                length = len(member) + (1 if exact else 0)  # a module named exactly beats its package
                if best is None or length > best[0]:
                    best = (length, rank, layer)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1], best[2]


def layer_violations(graph: dict[str, list[Edge]]) -> list[Edge]:
    """Edges going up a layer, and notifiers' imports of detectors outside the allowed ones."""
    bad = []
    for edges in graph.values():
        for edge in edges:
            (source_rank, source_layer), (target_rank, target_layer) = (
                layer_of(edge.source),
                layer_of(edge.target),
            )
            if target_rank > source_rank or (
                source_layer == "notifiers"
                and target_layer == "detectors"
                and edge.target not in NOTIFIERS_MAY_IMPORT
            ):
                bad.append(edge)
    return bad


def _describe(edge: Edge) -> str:
    return f"[{layer_of(edge.source)[1]} -> {layer_of(edge.target)[1]}] {edge}"


@functools.cache
def package_graph() -> dict[str, list[Edge]]:
    """The graph of this checkout, built once for the tests below (parsing is most of their time)."""
    return build_graph()


def test_no_import_cycle() -> None:
    graph = package_graph()
    if strongly_connected(graph):
        pytest.fail("import circles (lazy imports count):\n" + describe_cycles(graph), pytrace=False)


def test_layers_import_downwards_only() -> None:
    bad = layer_violations(package_graph())
    if bad:
        lines = "\n".join(f"  {_describe(edge)}" for edge in bad)
        pytest.fail(f"imports against the layering (see this file's docstring):\n{lines}", pytrace=False)


def test_graph_sees_lazy_imports_and_skips_type_checking(tmp_path: Path) -> None:
    """The checker itself: a lazy import closing a loop is a cycle; a TYPE_CHECKING one is not."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "agentwatch" / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from detectors.high import X\n"
    )
    (tmp_path / "detectors" / "high.py").write_text("from agentwatch import low\nX = 1\n")
    assert not strongly_connected(build_graph(tmp_path))
    (tmp_path / "agentwatch" / "low.py").write_text(
        "def late():\n    from detectors.high import X\n    return X\n"
    )
    graph = build_graph(tmp_path)
    assert strongly_connected(graph) == [["agentwatch.low", "detectors.high"]]
    assert "agentwatch.low -> detectors.high" in describe_cycles(graph)


if __name__ == "__main__":
    full = build_graph()
    print(describe_cycles(full) or "no cycle")
    for edge in layer_violations(full):
        print(_describe(edge))
    sys.exit(0)
