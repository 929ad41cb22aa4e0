"""The package's structure: no import cycle between the modules of ``mhc_compile``.

The module import graph is read with ``ast`` from the source (nothing is imported): every
``import`` / ``from ... import`` anywhere in a module (function-level and ``TYPE_CHECKING``-free
imports included) is an edge to the module it names, and to each package above it, because
Python runs a package's ``__init__`` before any of its submodules (``from .io.atomic import x``
runs ``io/__init__.py`` first). ``from .pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``. Imports under ``if TYPE_CHECKING:`` are left out: they never run.

Run as a script (``python tests/test_structure.py``) it prints the edges, for docs/design.md's
"Structure" numbers.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mhc_compile"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set:
    """The ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skip |= {id(n) for n in ast.walk(inner)}
    return skip


def _with_parents(name: str, modules: dict) -> list:
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]


def import_graph() -> dict[str, set]:
    """``module -> {modules of mhc_compile it imports}`` (see the module docstring)."""
    modules = _modules()
    graph: dict[str, set] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.update(_with_parents(alias.name, modules))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets.update(_with_parents(base, modules))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        targets.add(f"{base}.{alias.name}")
        # a package's __init__ is run before each submodule; that edge is the language's, not an import
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set]) -> list:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]``."""
    state: dict = {}
    stack: list = []

    def visit(node: str) -> list:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle inside mhc_compile: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    g = import_graph()
    edges = sorted((a, b) for a, bs in g.items() for b in bs)
    for a, b in edges:
        print(f"{a} -> {b}")
    print(f"{len(g)} modules, {len(edges)} imports between them; cycle: {' -> '.join(find_cycle(g)) or 'none'}",
          file=sys.stderr)
