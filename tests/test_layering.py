"""The layout's rules, checked by parsing the imports (nothing is imported here).

- The lower floors (`runtimes/`, `cgroups/`, `images/`, `network/`, `common/`) import nothing
  from `agent/`: not at module level, not inside a function, not under TYPE_CHECKING.
- The modules of `agent/` import each other without a circle. Every import counts: module level,
  inside functions and under TYPE_CHECKING alike, because a circle is a reading problem before it
  is an import-time one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOWER = ("runtimes", "cgroups", "images", "network", "common")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((REPO / package).rglob("*.py")):
        yield module_name(path), path


def imports(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, wherever it sits.
    `from X import y` yields X and X.y (y may be a module); relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                if node.level > 1:
                    parent = parent[: -(node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


@pytest.mark.parametrize("package", LOWER)
def test_lower_floors_import_nothing_from_agent(package: str) -> None:
    found: dict[str, str] = {}  # "file:line (module)" -> the agent module it imports
    for name, path in modules(package):
        for line, target in imports(name, path):
            if target == "agent" or target.startswith("agent."):
                found.setdefault(f"{path.relative_to(REPO)}:{line} ({name})", target)
    assert not found, "the lower floors must not know the agent:\n" + "\n".join(
        f"{where} imports {target}" for where, target in sorted(found.items())
    )


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (a package counts as its __init__)."""
    known = dict(modules(package))
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for _, target in imports(name, path):
            if target in known and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_agent_modules_import_each_other_without_a_circle() -> None:
    graph = import_graph("agent")
    # A package's __init__ is imported on the way to each of its modules; an edge from a module
    # back up to its own package's __init__ is Python's doing, not a circle the code made.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    found = cycles(graph)
    assert not found, "import circles among agent/ modules:\n" + "\n".join(" <-> ".join(c) for c in found)
