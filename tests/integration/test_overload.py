"""Shedding under overload (docs/operations.md#overload): while a node's event loop runs
behind (here: the test stalls the loop it shares with the node, 150 ms at a time), its
client-plane calls are refused at once with RESOURCE_EXHAUSTED, a forwarder decides its
packets from the cache and affinity instead of waiting, and calls are served again once
the loop catches up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dht.client import Client, Forwarder
from dht.client.decision import Action, Packet
from dht.client.forwarder import ForwarderConfig
from dht.core.errors import LimitExceeded
from dht.edge.server import NodeServer
from dht.tools.bench import synthetic_keys

from .conftest import MakePop, wait_for


@pytest.fixture
async def node(make_pop: MakePop) -> NodeServer:
    (srv,) = await make_pop(1, overload_lag_ms=100)
    return srv


@pytest.fixture
async def stall() -> AsyncIterator[asyncio.Event]:
    """Set the event to stall the event loop 150 ms at a time (a node short of CPU)."""
    on, done = asyncio.Event(), asyncio.Event()

    async def staller() -> None:
        while not done.is_set():
            await on.wait()
            time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop is the overload tested
            await asyncio.sleep(0.002)

    task = asyncio.create_task(staller())
    yield on
    done.set()
    on.set()
    await task


async def test_a_node_behind_sheds_client_calls_and_serves_again_after(
    node: NodeServer, stall: asyncio.Event
) -> None:
    key = synthetic_keys(1, seed=21)
    async with Client([node.grpc_address], timeout_s=10) as c:
        assert (await c.flow_packed("Claim", key, pop="ams"))["status"][0] == 2  # CREATED
        stall.set()
        await wait_for(lambda: node.node.overload.overloaded, what="the node overloaded")
        with pytest.raises(LimitExceeded, match="overloaded"):
            await c.flow_packed("Lookup", key)
        shed = node.node.metrics.registry.get_sample_value("dht_shed_calls_total")
        assert shed is not None and shed >= 1
        stall.clear()
        await wait_for(lambda: not node.node.overload.overloaded, what="the node caught up")
        got = await c.flow_packed("Lookup", key)
        assert got["status"][0] == 1  # OK: served again


async def test_a_forwarder_decides_from_its_cache_while_the_node_sheds(
    node: NodeServer, stall: asyncio.Event
) -> None:
    keys = synthetic_keys(2, seed=22)
    known, unknown = keys[:40], keys[40:]
    fw = Forwarder(Client([node.grpc_address], timeout_s=10), "ams", ForwarderConfig())
    await fw.start()
    try:
        assert (await fw.handle(known, Packet.SYN)).action is Action.SERVE
        stall.set()
        await wait_for(lambda: node.node.overload.overloaded, what="the node overloaded")
        cached = await fw.handle(known, Packet.DATA)  # from the cache: no call
        assert cached.cached
        out = await fw.handle(unknown, Packet.DATA)  # a miss the node refuses
        assert not out.cached and fw.stats.shed_batches >= 1
        assert out.answer is not None and out.answer.status.name == "UNAVAILABLE"
    finally:
        stall.clear()
        await fw.close()
        await fw.client.close()
