"""The forwarder client against real nodes over gRPC on loopback (docs/api.md#forwarder): cache
hits,
coalescing, micro-batching, failover when a node is gone, the loop guard, the owner-change
bound and invalidation, live-flow refresh, close."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dht.client import CacheLimits, Client, Forwarder, ForwarderConfig
from dht.client.decision import Action, Packet
from dht.core.errors import Unavailable
from dht.core.record import Status
from dht.core.wire import FlowKey
from dht.edge.server import NodeServer

from .conftest import MakePop, MakePops, wait_for

MakeForwarder = Callable[..., Awaitable[Forwarder]]


class Clock:
    """Monotonic seconds the test moves by hand (the forwarder's cache clock)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def make_forwarder() -> AsyncIterator[MakeForwarder]:
    made: list[Forwarder] = []

    async def make(servers: list[NodeServer], pop: str = "ams", **kwargs: Any) -> Forwarder:
        fw = Forwarder(Client([s.grpc_address for s in servers]), pop, owns_client=True, **kwargs)
        await fw.start()
        made.append(fw)
        return fw

    yield make
    for fw in made:
        await fw.close()


def flows(n: int, port: int = 443, base: int = 0) -> list[FlowKey]:
    return [
        FlowKey(
            6, ipaddress.IPv4Address(0xC6120000 + base + i), 40_000 + i,
            ipaddress.IPv4Address("192.0.2.1"), port,
        )
        for i in range(n)
    ]  # fmt: skip


async def test_a_new_flow_is_claimed_then_served_from_the_cache(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    fw = await make_forwarder(await make_pop(3))
    (key,) = flows(1)
    syn = await fw.handle(key, Packet.SYN)
    assert (syn.action, syn.reason) == (Action.SERVE, "new-flow")
    assert (await fw.established(key)).status == Status.OK
    sent = fw.stats.lookups_sent
    for _ in range(5):
        out = await fw.handle(key, Packet.DATA)
        assert (out.action, out.reason, out.cached) == (Action.SERVE, "owner", True)
    assert fw.stats.lookups_sent == sent  # no table traffic for cached packets
    assert fw.stats.hits == 5
    # The table holds what the forwarder claimed and confirmed.
    (r,) = await fw.client.lookup([key])
    assert (r.status, r.owner_pop) == (Status.OK, fw.here)
    fin = await fw.handle(key, Packet.FIN)
    assert fin.action is Action.SERVE
    assert fw.stats.releases == 1
    await fw.flush()  # the FIN did not wait for its release
    assert fw.stats.release_failures == 0
    (r,) = await fw.client.lookup([key])
    assert r.status == Status.NOT_FOUND


async def test_concurrent_misses_for_one_key_share_one_lookup(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    fw = await make_forwarder(await make_pop(1))
    (key,) = flows(1)
    answers = await asyncio.gather(*(fw.lookup(key) for _ in range(20)))
    assert {a.status for a in answers} == {Status.NOT_FOUND}
    assert fw.stats.lookups_sent == 1
    assert fw.stats.coalesced == 19


async def test_misses_from_many_callers_are_micro_batched(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    servers = await make_pop(3)
    owner = Client([servers[0].grpc_address])
    await owner.refresh_table()
    keys = flows(200)
    await owner.confirm(keys[:100], pop="fra")
    await owner.close()
    cfg = ForwarderConfig(batch_window_ms=50, batch_max_keys=64)
    fw = await make_forwarder(servers, config=cfg)
    answers = await asyncio.gather(*(fw.lookup(k) for k in keys))
    assert fw.stats.lookups_sent == 200
    assert fw.stats.lookup_batches == 4  # 64 + 64 + 64 + 8
    assert [a.owner for a in answers] == [2] * 100 + [0] * 100


async def test_lookups_fail_over_when_a_node_is_gone(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    servers = await make_pop(3)
    fw = await make_forwarder(servers)
    keys = flows(60)
    for k in keys:
        assert (await fw.handle(k, Packet.SYN)).action is Action.SERVE
    await asyncio.gather(*(fw.established(k) for k in keys))
    await servers[0].stop(leave=False)
    # A fresh forwarder (empty cache) still finds every owner: the dead node's keys go
    # to the next replica, which reads a quorum of the two left.
    fresh = await make_forwarder(servers)
    answers = await asyncio.gather(*(fresh.lookup(k) for k in keys))
    assert {(a.status, a.owner) for a in answers} == {(Status.OK, fresh.here)}
    assert fresh.stats.table_errors == 0
    assert any(addr == servers[0].grpc_address for _, addr in fresh.client.failures)


async def test_loop_guard_across_two_pops(
    make_pops: MakePops, make_forwarder: MakeForwarder
) -> None:
    pops = await make_pops(pops=2, nodes=1)
    ams = await make_forwarder(pops["ams"], "ams")
    fra = await make_forwarder(pops["fra"], "fra")
    (key,) = flows(1)
    assert (await fra.handle(key, Packet.SYN)).action is Action.SERVE
    await fra.established(key)

    async def shipped() -> bool:
        (r,) = await ams.client.lookup([key])
        return r.owner_pop == fra.here

    deadline = asyncio.get_running_loop().time() + 20
    while not await shipped():
        assert asyncio.get_running_loop().time() < deadline, "record never reached ams"
        await asyncio.sleep(0.02)
    out = await ams.handle(key, Packet.DATA)
    assert (out.action, out.target) == (Action.TUNNEL, fra.here)
    # At the owner the same packet arriving tunnelled is served, and at ams a packet
    # that arrived tunnelled is served too, whatever the table says: never sent on.
    at_owner = await fra.handle(key, Packet.DATA, tunnelled=True)
    assert (at_owner.action, at_owner.reason) == (Action.SERVE, "tunnelled-in")
    tunnelled = ams.stats.tunnelled
    back = await ams.handle(key, Packet.DATA, tunnelled=True)
    assert (back.action, back.reason) == (Action.SERVE, "tunnelled-in")
    assert ams.stats.tunnelled == tunnelled
    # The owner never tunnels to itself.
    own = await fra.handle(key, Packet.DATA)
    assert (own.action, own.reason) == (Action.SERVE, "owner")


async def test_an_owner_change_reaches_the_cache_within_owner_ttl(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    servers = await make_pop(3)
    clock = Clock()
    cfg = ForwarderConfig(
        cache=CacheLimits(owner_ttl_s=5, negative_ttl_s=0.5), background_refresh=False
    )
    fw = await make_forwarder(servers, config=cfg, clock=clock)
    other = Client([servers[1].grpc_address])
    await other.refresh_table()
    key, key2 = flows(2)
    await other.confirm([key, key2], pop="fra")
    assert (await fw.lookup(key)).owner == 2
    assert (await fw.lookup(key2)).owner == 2
    # The owner changes in the table: fra releases, lon claims.
    await other.release([key, key2], pop="fra")
    await other.claim([key, key2], pop="lon")
    await other.close()
    clock.t += 4.9
    assert (await fw.lookup(key)).owner == 2  # cached, inside the bound
    fw.invalidate(key2)
    assert (await fw.lookup(key2)).owner == 3  # invalidated: read again at once
    clock.t += 0.1
    assert (await fw.lookup(key)).owner == 3  # the bound passed: read again


async def test_live_flows_are_refreshed_in_batches(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    servers = await make_pop(3)
    clock = Clock()
    cfg = ForwarderConfig(
        cache=CacheLimits(owner_ttl_s=5),
        refresh_interval_s=1,
        refresh_ahead_s=3_600,  # every record we own is due
        confirm_ttl_s=30,
        background_refresh=False,  # rounds by hand
    )
    fw = await make_forwarder(servers, config=cfg, clock=clock)
    live, idle = flows(2)
    for k in (live, idle):
        await fw.handle(k, Packet.SYN)
        await fw.established(k)
    (before,) = await fw.client.lookup([live])
    clock.t += 1.0
    assert await fw.refresh_live() == 0  # nothing lapses within two rounds yet
    clock.t += 2.5
    await fw.handle(live, Packet.DATA)  # only this one is used in this round
    assert await fw.refresh_live() == 1
    assert fw.stats.refreshes == 1
    (after,) = await fw.client.lookup([live])
    assert after.status == Status.OK
    assert after.expiry_ms >= before.expiry_ms
    # The refreshed entry is good for another owner_ttl_s; the idle one lapsed.
    clock.t += 4.0
    assert fw.cache.get(live.to_bytes(), clock.t) is not None
    assert fw.cache.get(idle.to_bytes(), clock.t) is None


async def test_a_lone_miss_never_waits_for_the_batch_window(
    make_pop: MakePop, make_forwarder: MakeForwarder
) -> None:
    """Nagle's rule: with no call of its kind in flight a miss leaves at once (it used to
    wait the whole window for company: +2 ms on every miss at low load)."""
    cfg = ForwarderConfig(batch_window_ms=60_000, background_refresh=False)
    fw = await make_forwarder(await make_pop(1), config=cfg)
    a, b = flows(2)
    async with asyncio.timeout(30):  # far below the window
        assert (await fw.lookup(a)).status == Status.NOT_FOUND
        assert (await fw.handle(b, Packet.SYN)).action is Action.SERVE
    assert (fw.stats.lookup_batches, fw.stats.claim_batches) == (1, 1)


async def test_close_fails_waiting_callers_and_is_idempotent(make_pop: MakePop) -> None:
    servers = await make_pop(1)
    fw = Forwarder(Client([servers[0].grpc_address]), "ams", owns_client=True)
    # Not started: its batchers do not run, so the miss stays queued until close().
    (key,) = flows(1)
    waiting = asyncio.create_task(fw.lookup(key))
    await wait_for(lambda: fw.stats.misses == 1, what="the miss to be queued")
    await fw.close()
    with pytest.raises(Unavailable):
        await waiting
    await fw.close()
