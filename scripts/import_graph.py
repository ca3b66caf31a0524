"""The package's import graph, read from the source (AST), and the layer rule it keeps.

    python scripts/import_graph.py [ROOT]   # modules, import edges, longest chain, cycles

tests/unit/test_layers.py holds the tree to the rules with the same functions. Every
``import`` counts, wherever it stands (a function-level import is still a dependency).
Generated code (dht/_proto) is a leaf: nothing of ours is imported from it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

# Lowest first; a module may import only from its own layer or a lower one (see
# docs/architecture.md). dht/_proto is generated wire code, usable from edge up.
LAYERS = ["core", "store", "node", "pops", "_proto", "edge", "client", "tools"]
TOP = {"dht", "dht.__main__"}  # the package itself and `python -m dht`


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the dht package under ``root`` (generated code included)."""
    return {module_name(root, p): p for p in sorted((root / "dht").rglob("*.py"))}


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts as a.b
    when a.b is a module, else as a)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer(name: str) -> int:
    """The layer index of a module (the top for the package itself)."""
    if name in TOP:
        return len(LAYERS)
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that point to a higher layer than the importer's."""
    return sorted((a, b) for a, deps in g.items() for b in deps if layer(b) > layer(a))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def longest_chain(g: dict[str, set[str]]) -> list[str]:
    """The longest import path (modules on one cycle count once)."""

    @cache
    def longest(v: str, seen: frozenset[str]) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for w in sorted(g.get(v, ())):
            if w not in seen:
                path = longest(w, seen | {w})
                if len(path) > len(best):
                    best = path
        return (v, *best)

    starts = [longest(v, frozenset({v})) for v in sorted(g)]
    return list(max(starts, key=len)) if starts else []


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    g = {k: v for k, v in graph(root).items() if not k.startswith("dht._proto")}
    g = {k: {d for d in v if not d.startswith("dht._proto")} for k, v in g.items()}
    chain = longest_chain(g)
    print(f"modules: {len(g)}")
    print(f"import edges: {sum(len(v) for v in g.values())}")
    print(f"longest chain: {len(chain)} modules: {' -> '.join(chain)}")
    for c in cycles(g):
        print(f"cycle: {' <-> '.join(c)}")
    for a, b in upward(g):
        print(f"upward: {a} -> {b}")


if __name__ == "__main__":
    main()
