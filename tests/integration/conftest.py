"""Factory fixtures: real nodes over real gRPC on loopback, in the test's event loop.

A node serves two gRPC planes (docs/security.md#planes): ``NodeServer.grpc_address`` (the
public one: FlowTable) and ``NodeServer.peer_address`` (NodeInternal, PopLink, forwards).
Peers, seeds and other PoPs' nodes are named by their peer-plane addresses.

``make_pop(..., certs=DIR)`` and ``make_pops(..., certs=DIR)`` run the nodes with mutual
TLS, each with a node certificate of its own from the CA in DIR (made there if missing,
with a forwarder ``fw`` per PoP and an operator ``admin``: dht.tools.certs).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dht.client import Client
from dht.core.config import TlsConfig, build_config
from dht.core.identity import Identity, Role
from dht.edge.server import NodeServer
from dht.tools.certs import FORWARDER_NAME, OPERATOR_NAME, cert_paths, ensure_cluster_certs
from dht.tools.cluster import CLUSTER, NodeSpec, plan, pop_names

MakePop = Callable[..., Awaitable[list[NodeServer]]]
POP_IDS = {"ams": 1, "fra": 2, "lon": 3}


def peer_spec(s: NodeSpec, admin: bool = True) -> str:
    """``--peers`` entry of a planned node: ``ID=PUBLIC,ADMIN,PEER``."""
    return f"{s.node_id}={s.grpc},{s.admin if admin else ''},{s.peer}"


def make_certs(directory: Path, specs: Sequence[NodeSpec]) -> None:
    """The CA (if missing) and the certificates of these nodes, a forwarder ``fw`` per
    PoP and the operator ``admin`` (trust domain dht.tools.cluster.CLUSTER)."""
    ensure_cluster_certs(directory, CLUSTER, [(s.pop, s.node_id) for s in specs], list(POP_IDS))


def tls_of(directory: Path, role: Role, pop: str = "", name: str | None = None) -> TlsConfig:
    """TLS settings of a certificate made by :func:`make_certs` (default names: the node
    ``name``, the forwarder ``fw``, the operator ``admin``)."""
    if name is None:
        name = OPERATOR_NAME if role is Role.OPERATOR else FORWARDER_NAME
    cert, key = cert_paths(directory, Identity(role, CLUSTER, pop, name))
    return TlsConfig(str(cert), str(key), str(directory / "ca.pem"))


def node_tls(directory: Path, s: NodeSpec) -> dict[str, str]:
    t = tls_of(directory, Role.NODE, s.pop, s.node_id)
    return {"cert_file": t.cert_file, "key_file": t.key_file, "ca_file": t.ca_file or ""}


def pop_configs(n: int, pop: str = "ams", certs: Path | None = None, **overrides: Any) -> list[Any]:
    """Configs for one PoP of n nodes on free loopback ports (test timing profile); with
    ``certs``, mutual TLS with a certificate per node from that directory."""
    specs = [replace(s, pop=pop, node_id=f"{pop}-{i + 1}") for i, s in enumerate(plan(1, n))]
    if certs is not None:
        make_certs(certs, specs)
    out = []
    for spec in specs:
        values: dict[str, Any] = {
            "profile": "test",
            "node_id": spec.node_id,
            "pop": pop,
            "pops": POP_IDS,
            "grpc_port": spec.grpc_port,
            "peer_port": spec.peer_port,
            "admin_port": spec.admin_port,
            "peers": [peer_spec(s) for s in specs if s is not spec],
        }
        if certs is not None:
            values["tls"] = node_tls(certs, spec)
        values.update(overrides)
        out.append(build_config(values))
    return out


@pytest.fixture
async def make_pop() -> AsyncIterator[MakePop]:
    started: list[NodeServer] = []

    async def make(
        n: int = 3, wall_ms: Callable[[], int] | None = None, **overrides: Any
    ) -> list[NodeServer]:
        servers = [NodeServer(cfg, wall_ms) for cfg in pop_configs(n, **overrides)]
        for s in servers:
            await s.start()
            started.append(s)
        await wait_for(
            lambda: all(pop_settled(s) for s in servers), what="nodes ready and peers up"
        )
        return servers

    yield make
    for s in started:
        await s.stop()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(targets: list[str], **kwargs: Any) -> Client:
        c = Client(targets, **kwargs)
        await c.refresh_table()
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


def pop_settled(srv: NodeServer) -> bool:
    """In sync, and every peer seen up with no hints left to deliver."""
    node = srv.node
    return (
        node.in_sync
        and all(h.up for h in node.view.health.values())
        and not any(node.repair.hints.count(p) for p in node.view.health)
    )


async def wait_for(
    cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Wait on a condition (polled every 20 ms), failing after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15) -> None:
    """Poll an async condition every 20 ms until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.02)


class FakeTime:
    """A wall clock the test moves by hand (Unix ms), shared by in-process nodes."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


MakePops = Callable[..., Awaitable[dict[str, list[NodeServer]]]]


@pytest.fixture
async def make_pops() -> AsyncIterator[MakePops]:
    """``await make_pops(pops=2, nodes=2, wall_ms={pop: clock}, certs=None, **config)``:
    PoPs ams, fra, lon, ... with their nodes (``nodes``: a count per PoP, or one for all),
    each PoP's peers and the other PoPs' nodes (``pop_peers``) by peer-plane address."""
    started: list[NodeServer] = []

    async def make(
        pops: int = 2,
        nodes: int | Sequence[int] = 2,
        wall_ms: dict[str, Callable[[], int]] | None = None,
        certs: Path | None = None,
        **overrides: Any,
    ) -> dict[str, list[NodeServer]]:
        """``nodes``: per PoP, or one count for every PoP (``[2, 1]``: ams 2, fra 1)."""
        counts = [nodes] * pops if isinstance(nodes, int) else list(nodes)
        planned = plan(pops, max(counts))
        specs = [
            s
            for pop, count in zip(pop_names(pops), counts, strict=True)
            for s in [s for s in planned if s.pop == pop][:count]
        ]
        if certs is not None:
            make_certs(certs, specs)
        out: dict[str, list[NodeServer]] = {}
        for spec in specs:
            others: dict[str, list[str]] = {}
            for s in specs:
                if s.pop != spec.pop:
                    others.setdefault(s.pop, []).append(s.peer)
            values: dict[str, Any] = {
                "profile": "test",
                "node_id": spec.node_id,
                "pop": spec.pop,
                "pops": POP_IDS,
                "grpc_port": spec.grpc_port,
                "peer_port": spec.peer_port,
                "admin_port": -1,
                "peers": [
                    peer_spec(s, admin=False) for s in specs if s.pop == spec.pop and s is not spec
                ],
                "pop_peers": others,
                **({"tls": node_tls(certs, spec)} if certs is not None else {}),
                **overrides,
            }
            srv = NodeServer(build_config(values), (wall_ms or {}).get(spec.pop))
            out.setdefault(spec.pop, []).append(srv)
        for servers in out.values():
            for srv in servers:
                await srv.start()
                started.append(srv)
        every = [s for servers in out.values() for s in servers]
        await wait_for(
            lambda: all(pop_settled(s) and s.pops.startup.is_set() for s in every),
            what="nodes ready",
        )
        return out

    yield make
    for s in started:
        await s.stop(leave=False)
