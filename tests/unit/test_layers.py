"""The shape of the package: layers that import one way, no cycles, modules that read in
one sitting, and a client a forwarder can load without the node (docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _graph_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts/import_graph.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ig = _graph_module()
GRAPH: dict[str, set[str]] = ig.graph(ROOT)
OURS = {k: v for k, v in GRAPH.items() if not k.startswith("dht._proto")}


def test_every_module_has_a_layer() -> None:
    assert [m for m in OURS if ig.layer(m) < 0] == []


def test_imports_run_one_way_through_the_layers() -> None:
    assert ig.upward(GRAPH) == [], "a module imports one from a layer above its own"


def test_no_import_cycles() -> None:
    assert ig.cycles(GRAPH) == []


def test_the_graph_reader_sees_cycles_and_upward_imports() -> None:
    g = {"dht.core.a": {"dht.node.b"}, "dht.node.b": {"dht.core.a"}}
    assert ig.cycles(g) == [["dht.core.a", "dht.node.b"]]
    assert ig.upward(g) == [("dht.core.a", "dht.node.b")]


def _third_party(name: str) -> set[str]:
    tree = ast.parse(Path(ig.modules(ROOT)[name]).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_core_is_pure() -> None:
    """No wire, no event loop, no I/O library in dht.core."""
    for name in OURS:
        if name.startswith("dht.core"):
            bad = _third_party(name) & {"grpc", "aiohttp", "asyncio", "socket", "subprocess"}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_importing_the_client_loads_no_node_store_or_servers() -> None:
    code = "import json, sys, dht.client; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
    )
    servers = {
        "dht.edge.server",
        "dht.edge.servicers",
        "dht.edge.admin",
        "dht.edge.udp",
        "dht.edge.peer_grpc",
        "dht.edge.pop_grpc",
    }
    bad = [
        m
        for m in loaded
        if m == "aiohttp"
        or m.startswith(("aiohttp.", "dht.node", "dht.store", "dht.pops", "dht.tools"))
        or m in servers
    ]
    assert bad == []
    assert "dht.client.forwarder" in loaded


def test_modules_and_classes_read_in_one_sitting() -> None:
    for name, path in ig.modules(ROOT).items():
        if name.startswith("dht._proto"):
            continue
        text = Path(path).read_text()
        assert text.count("\n") <= 600, f"{name}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size <= 400, f"{name}.{node.name}: {size} lines"
