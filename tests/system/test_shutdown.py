"""Bounded shutdown of the callers (docs/operations.md#stopping-a-node): a client and a
forwarder whose calls are in flight to a node that stopped answering (SIGSTOP: a paused
process, its socket open) close at once, and their callers get an error, not a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from dht.client import Forwarder
from dht.client.decision import Packet
from dht.client.forwarder import ForwarderConfig
from dht.core.wire import KEY_SIZE
from dht.tools.bench import synthetic_keys

from .conftest import MakeCluster, connect

pytestmark = pytest.mark.system


async def test_a_client_and_a_forwarder_close_at_once_with_calls_in_flight(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster(nodes=1)
    node = cluster.nodes[0]
    client = connect([node.spec.grpc], timeout_s=60)
    await client.refresh_table()
    fw = Forwarder(connect([node.spec.grpc], timeout_s=60), "ams", ForwarderConfig())
    await fw.start()
    keys = synthetic_keys(8, seed=10)
    os.kill(node.pid, signal.SIGSTOP)
    try:
        calls = [
            asyncio.create_task(
                client.flow_packed("Lookup", keys[i * KEY_SIZE : (i + 1) * KEY_SIZE])
            )
            for i in range(4)
        ]
        packets = [
            asyncio.create_task(fw.handle(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE], Packet.DATA))
            for i in range(4, 8)
        ]
        # The calls are in flight once every task has reached its first await on the
        # network: a few loop turns, and none can finish while the node is stopped.
        for _ in range(20):
            await asyncio.sleep(0)
        assert not any(t.done() for t in [*calls, *packets])
        t = time.monotonic()
        await client.close()
        await fw.close()
        await fw.client.close()
        took = time.monotonic() - t
        async with asyncio.timeout(2):
            results = await asyncio.gather(*calls, *packets, return_exceptions=True)
    finally:
        os.kill(node.pid, signal.SIGCONT)
    assert took < 1.0, took
    assert all(isinstance(r, Exception) for r in results), results
