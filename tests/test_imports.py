"""The package's import graph has no cycles, counting imports inside functions too.

A function-level import that closes a cycle works at run time but hides a dependency in both
directions; the architecture keeps the core's modules layered (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mope

ROOT = Path(mope.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, path: Path, node: ast.AST, modules: set[str]) -> set[str]:
    """The mope modules an import statement in ``module`` loads (the longest existing prefix of each name)."""
    if isinstance(node, ast.ImportFrom):
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
        target = ".".join(part for part in (base, node.module or "") if part) if node.level else node.module or ""
        names = [f"{target}.{alias.name}" for alias in node.names]
    else:
        names = [alias.name for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        nodes = ast.walk(ast.parse(path.read_text()))
        statements = [n for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)]
        graph[module] = set().union(*(imported(module, path, n, set(paths)) for n in statements))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "mope.tuner" in graph["mope"] and "mope.routing.base" in graph["mope.routing.top_k"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
