"""Factory fixtures: real nodes over real gRPC on loopback, in the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dht.client import Client
from dht.core.config import build_config
from dht.edge.server import NodeServer
from dht.tools.cluster import plan

MakePop = Callable[..., Awaitable[list[NodeServer]]]


def pop_configs(n: int, pop: str = "ams", **overrides: Any) -> list[Any]:
    """Configs for one PoP of n nodes on free loopback ports (test timing profile)."""
    specs = plan(1, n)
    out = []
    for spec in specs:
        values: dict[str, Any] = {
            "profile": "test",
            "node_id": spec.node_id,
            "pop": pop,
            "pops": {"ams": 1, "fra": 2, "lon": 3},
            "grpc_port": spec.grpc_port,
            "admin_port": spec.admin_port,
            "peers": [f"{s.node_id}={s.grpc},{s.admin}" for s in specs if s is not spec],
        }
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
    """``await make_pops(pops=2, nodes=2, wall_ms={pop: clock}, **config)``."""
    started: list[NodeServer] = []

    async def make(
        pops: int = 2,
        nodes: int = 2,
        wall_ms: dict[str, Callable[[], int]] | None = None,
        **overrides: Any,
    ) -> dict[str, list[NodeServer]]:
        specs = plan(pops, nodes)
        out: dict[str, list[NodeServer]] = {}
        for spec in specs:
            others: dict[str, list[str]] = {}
            for s in specs:
                if s.pop != spec.pop:
                    others.setdefault(s.pop, []).append(s.grpc)
            values: dict[str, Any] = {
                "profile": "test",
                "node_id": spec.node_id,
                "pop": spec.pop,
                "pops": {"ams": 1, "fra": 2, "lon": 3},
                "grpc_port": spec.grpc_port,
                "admin_port": -1,
                "peers": [
                    f"{s.node_id}={s.grpc}" for s in specs if s.pop == spec.pop and s is not spec
                ],
                "pop_peers": others,
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
