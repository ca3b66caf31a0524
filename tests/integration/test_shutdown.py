"""Bounded shutdown (docs/operations.md#stopping-a-node): a node stopped in the middle of
each kind of work finishes within its stated bound, and nothing it started is left
hanging (a client and a forwarder: tests/system/test_shutdown.py).

Stalled peers are made with a proxy (dht.tools.chaos.proxy) that holds every byte far
longer than any timeout (``--dial-via`` to it), or with a socket that accepts and never
answers; both leave calls in flight until their deadlines, which is the case a stop must
not wait out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from dht.client import Client
from dht.core.errors import DhtError
from dht.core.wire import KEY_SIZE
from dht.edge.server import NodeServer
from dht.tools.bench import synthetic_keys
from dht.tools.chaos.proxy import Proxy

from .conftest import MakePops, pop_configs, pop_settled, wait_for

STALL_S = 3600.0  # a stalled link holds bytes this long: past every timeout of a test


@pytest.fixture
async def blackhole() -> AsyncIterator[str]:
    """The address of a socket that accepts connections and never answers."""
    hung: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hung.append(w)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for w in hung:
            w.close()
        server.close()


async def timed_stop(srv: NodeServer, leave: bool) -> float:
    t = time.monotonic()
    await srv.stop(leave=leave)
    return time.monotonic() - t


async def keep_busy(call: Callable[[int], Awaitable[object]], stop: asyncio.Event) -> int:
    """Call ``call(i)`` back to back until ``stop``; every failure is an answer too (the
    node is being stopped). Returns the number of calls made."""
    i = 0
    while not stop.is_set():
        with contextlib.suppress(DhtError, asyncio.TimeoutError):
            await call(i)
        i += 1
    return i


@pytest.mark.parametrize("leave", [False, True], ids=["stop", "leave"])
async def test_a_node_with_writes_to_stalled_replicas_stops_within_its_bound(
    leave: bool,
) -> None:
    """ams-1's links to both its peers stall: its promise rounds, writes and their undos
    wait on replicas that never answer (and a leave's hand-off on peers that never
    take it). Stopped mid-load, it finishes within its bound, and every call to it has
    an answer by then."""
    configs = pop_configs(3)
    peers = [f"{c.advertised}:{c.peer_port}" for c in configs[1:]]
    proxies = [await Proxy(a).start() for a in peers]
    via = {a: p.address for a, p in zip(peers, proxies, strict=True)}
    servers = [NodeServer(replace(configs[0], dial_via=via))]
    servers += [NodeServer(c) for c in configs[1:]]
    try:
        for s in servers:
            await s.start()
        await wait_for(lambda: all(pop_settled(s) for s in servers), what="nodes ready")
        for p in proxies:
            p.delay_s = STALL_S
        keys = synthetic_keys(10_000, seed=7)
        stop = asyncio.Event()
        async with Client([servers[0].grpc_address], timeout_s=60) as c:

            async def claim(i: int) -> object:
                raw = keys[(i % 1000) * 10 * KEY_SIZE : ((i % 1000) + 1) * 10 * KEY_SIZE]
                return await c.flow_packed("Claim", raw, pop="ams")

            load = [asyncio.create_task(keep_busy(claim, stop)) for _ in range(8)]
            await wait_for(
                lambda: len(servers[0].node.coordinator.writes) > 0,
                what="writes in flight at ams-1",
            )
            took = await timed_stop(servers[0], leave)
            stop.set()
            assert took <= servers[0].stop_bound_s(leave), (took, servers[0].stop_bound_s(leave))
            # No call to the stopped node is left hanging (the client's timeout is 60 s).
            async with asyncio.timeout(5):
                made = await asyncio.gather(*load)
            assert sum(made) >= 8
    finally:
        for s in servers:
            await s.stop(leave=False)
        for p in proxies:
            await p.close()


async def test_a_node_stops_at_once_with_other_pops_streaming_to_it(make_pops: MakePops) -> None:
    """fra ships every confirm to ams over a Ship stream that never ends on its own; ams
    ends the streams it serves when it stops, instead of waiting out its whole grace."""
    pops = await make_pops(pops=2, nodes=1)
    ams, fra = pops["ams"][0], pops["fra"][0]
    keys = synthetic_keys(2_000, seed=8)
    stop = asyncio.Event()
    async with Client([fra.grpc_address], timeout_s=10) as c:

        async def claim_and_confirm(i: int) -> object:
            raw = keys[(i % 200) * 10 * KEY_SIZE : ((i % 200) + 1) * 10 * KEY_SIZE]
            await c.flow_packed("Claim", raw, pop="fra")
            return await c.flow_packed("Confirm", raw, pop="fra")

        load = asyncio.create_task(keep_busy(claim_and_confirm, stop))
        await wait_for(
            lambda: (ams.node.metrics.registry.get_sample_value(
                "dht_pop_received_records_total", {"from_pop": "fra"}
            ) or 0) > 0,
            what="fra's records shipped to ams",
        )  # fmt: skip
        took = await timed_stop(ams, leave=False)
        stop.set()
        await load
    assert took < ams.config.shutdown_grace_s, took


async def test_a_node_shipping_to_a_silent_pop_stops_within_its_bound(
    make_pops: MakePops, blackhole: str
) -> None:
    """ams's link to fra leads to a socket that never answers: its shipping is stuck in
    flight when it stops."""
    pops = await make_pops(pops=2, nodes=1)
    ams = pops["ams"][0]
    ams.pops.links["fra"].addresses = [blackhole]
    keys = synthetic_keys(200, seed=9)
    async with Client([ams.grpc_address], timeout_s=10) as c:
        await c.flow_packed("Claim", keys, pop="ams")
        await c.flow_packed("Confirm", keys, pop="ams")
    took = await timed_stop(ams, leave=False)
    assert took <= ams.stop_bound_s(leave=False), took
