"""Two PoPs in one process over real gRPC on loopback: shipping, the policy, tombstones,
affinity, the resend buffer and resync, clock-offset rejection, bad input
(docs/protocol.md#shipping-between-pops)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.client import Client
from dht.core.ops import BatchCall, Op
from dht.core.record import State, Status
from dht.core.wire import ENTRY_DTYPE, FLAG_AFFINITY_FALLBACK, KEY_DTYPE, KEY_SIZE, FlowKey
from dht.edge.server import NodeServer
from dht.pops.shipping import Kind
from dht.tools.bench import synthetic_keys

from .conftest import MakePops, until, wait_for

POPS = {"ams": 1, "fra": 2, "lon": 3}


def shipped(servers: list[NodeServer], kind: Kind) -> int:
    return sum(link.stats.records.get(kind, 0) for s in servers for link in s.pops.links.values())


async def lookup(c: Client, raw: bytes) -> np.ndarray:  # type: ignore[type-arg]
    return await c.flow_packed("Lookup", raw)


async def test_established_records_ship_and_embryonic_ones_stay(make_pops: MakePops) -> None:
    pops = await make_pops()
    ams, fra = pops["ams"], pops["fra"]
    confirmed = synthetic_keys(400, seed=11)
    embryonic = synthetic_keys(300, seed=12, start=1000)
    async with (
        Client([ams[0].grpc_address], timeout_s=10) as a,
        Client([fra[0].grpc_address], timeout_s=10) as f,
    ):
        assert set((await a.flow_packed("Confirm", confirmed, pop="ams"))["status"]) == {
            Status.CREATED
        }
        assert set((await a.flow_packed("Claim", embryonic, pop="ams"))["status"]) == {
            Status.CREATED
        }

        async def all_found() -> bool:
            return bool(((await lookup(f, confirmed))["status"] == Status.OK).all())

        await until(all_found, "confirmed flows shipped to fra")
        got = await lookup(f, confirmed)
        assert set(got["owner_pop"].tolist()) == {POPS["ams"]}
        assert set(got["state"].tolist()) == {State.ESTABLISHED}
        # Embryonic claims never leave their PoP: fra holds none, and nothing but the
        # established records (and the affinity each confirm set) was shipped.
        assert (
            sum(s.node.store.counts()[(fam, "embryonic")] for s in fra for fam in ("ipv4", "ipv6"))
            == 0
        )
        # (fra may apply a batch a moment before ams hears its acknowledgement)
        await wait_for(lambda: shipped(ams, Kind.ESTABLISHED) >= 400, what="acknowledgements")
        assert shipped(ams, Kind.ESTABLISHED) == 400
        miss = await lookup(f, embryonic)
        assert set(miss["status"].tolist()) == {Status.NOT_FOUND}
        assert set(miss["flags"].tolist()) == {0}  # no affinity: these clients never confirmed
        # The confirms made ams the clients' preferred PoP, and that reached fra too: a
        # miss for another flow of a client that confirmed at ams names ams, flagged.
        other = np.frombuffer(confirmed, dtype=KEY_DTYPE).copy()
        other["sport"] = 8443
        fallback = await lookup(f, other.tobytes())
        assert set(fallback["status"].tolist()) == {Status.NOT_FOUND}
        assert (fallback["owner_pop"] == POPS["ams"]).all()
        assert (fallback["flags"] & FLAG_AFFINITY_FALLBACK).all()

        # Tombstones ship: released at ams, gone at fra, and a stale copy cannot bring
        # them back.
        released = confirmed[: 100 * KEY_SIZE]
        assert set((await a.flow_packed("Release", released, pop="ams"))["status"]) == {Status.OK}

        async def gone() -> bool:
            return bool(((await lookup(f, released))["status"] == Status.NOT_FOUND).all())

        await until(gone, "tombstones shipped")
        await wait_for(lambda: shipped(ams, Kind.TOMBSTONE) == 100, what="tombstones acked")
        stale = await a.flow_packed("Lookup", confirmed[100 * KEY_SIZE : 101 * KEY_SIZE])
        assert stale["status"][0] == Status.OK
        # Refreshes right after the confirm stay in the same expiry quantum: not shipped.
        await a.flow_packed("Refresh", confirmed[100 * KEY_SIZE :], pop="ams")
        assert shipped(ams, Kind.REFRESH) == 0


async def test_explicit_affinity_ships_on_change(make_pops: MakePops) -> None:
    pops = await make_pops()
    import ipaddress

    clients = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 21)]
    async with (
        Client([pops["ams"][0].grpc_address], timeout_s=10) as a,
        Client([pops["fra"][0].grpc_address], timeout_s=10) as f,
    ):

        async def preferred(n: int, pop: str) -> bool:
            return {r.owner_pop for r in await f.get_affinity(clients[:n])} == {POPS[pop]}

        await a.set_affinity(clients, "lon")
        await until(lambda: preferred(20, "lon"), "affinity shipped")
        await wait_for(lambda: shipped(pops["ams"], Kind.AFFINITY) == 20, what="affinity acked")
        await a.set_affinity(clients, "lon")  # unchanged: not shipped again
        await a.set_affinity(clients[:5], "fra")
        await until(lambda: preferred(5, "fra"), "changed affinity shipped")
        await wait_for(lambda: shipped(pops["ams"], Kind.AFFINITY) >= 25, what="change acked")
        assert shipped(pops["ams"], Kind.AFFINITY) == 25


async def test_a_peer_behind_the_resend_buffer_is_resynced(make_pops: MakePops) -> None:
    pops = await make_pops(ship_buffer_records=100, ship_batch_records=50)
    raw = synthetic_keys(3000, seed=13, start=5000)
    async with (
        Client([pops["ams"][0].grpc_address], timeout_s=10) as a,
        Client([pops["fra"][0].grpc_address], timeout_s=10) as f,
    ):
        ams = pops["ams"]

        def resyncs() -> int:
            return sum(link.stats.resyncs for s in ams for link in s.pops.links.values())

        at_start = resyncs()
        await a.flow_packed("Confirm", raw, pop="ams")
        assert sum(link.queue.dropped for s in ams for link in s.pops.links.values()) > 0

        async def repaired() -> bool:
            return bool(((await lookup(f, raw))["status"] == Status.OK).all())

        await until(repaired, "dropped records repaired by resync", 30)
        await wait_for(lambda: resyncs() > at_start, what="a resync after the overflow")


async def test_stamps_beyond_the_clock_offset_are_rejected(make_pops: MakePops) -> None:
    ahead = lambda: time.time_ns() // 1_000_000 + 10_000  # noqa: E731 - ams runs 10 s fast
    pops = await make_pops(wall_ms={"ams": ahead})
    raw = synthetic_keys(50, seed=14, start=9000)
    async with Client([pops["ams"][0].grpc_address], timeout_s=10) as a:
        await a.flow_packed("Confirm", raw, pop="ams")
    fra = pops["fra"]
    await wait_for(lambda: sum(s.pops.rejected for s in fra) >= 50, what="rejections at fra")
    assert sum(s.node.clock.rejected for s in fra) >= 50
    assert all(len(s.node.store) == 0 for s in fra)


async def test_malformed_shipments_are_invalid_argument(make_pops: MakePops) -> None:
    pops = await make_pops()
    target = pops["fra"][0]
    good = np.zeros(1, dtype=ENTRY_DTYPE)
    async with grpc.aio.insecure_channel(target.peer_address) as ch:
        stub = pb_grpc.PopLinkStub(ch)

        def batch(entries: bytes = b"", **kw: int) -> pb.ShipBatch:
            values = {"format_version": 1, "from_pop": 1, "num_partitions": 4096, **kw}
            return pb.ShipBatch(entries=entries, **values)

        cases = [
            (batch(b"x" * 71), "entries"),
            (batch(from_pop=9), "from_pop"),
            (batch(from_pop=2), "from_pop"),
            (batch(num_partitions=16), "num_partitions"),
            (batch(format_version=7), "format_version"),
        ]
        for req, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.PopPush(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
            assert (err.value.details() or "").startswith(field), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PopDigests(
                pb.PopDigestRequest(from_pop=1, partitions=b"\xff\xff", num_partitions=4096),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A bad record in a well-formed batch is refused on its own (dht.core.ingress).
        ack = await stub.PopPush(batch(good.tobytes()), timeout=5)
        assert ack.rejected == 1 and ack.applied == 0
    assert target.node.live()  # the node shrugged it all off


async def test_a_flow_released_before_its_record_shipped_ships_no_tombstone(
    make_pops: MakePops,
) -> None:
    """A tombstone ships only for a flow other PoPs saw: one released while its
    established record still waits in the delay line (old enough, but the line has
    not been stepped yet) stays home, like the record."""
    pops = await make_pops(pops=2, nodes=1)
    ams = pops["ams"]
    raw = synthetic_keys(50, seed=71)
    async with Client([ams[0].grpc_address], timeout_s=10) as a:
        assert set((await a.flow_packed("Confirm", raw, pop="ams"))["status"]) == {Status.CREATED}
        await wait_for(lambda: shipped(ams, Kind.ESTABLISHED) == 50, what="records shipped")
        # The first 20 are (as far as the policy can tell) still waiting to ship.
        waiting = [raw[i : i + KEY_SIZE] for i in range(0, 20 * KEY_SIZE, KEY_SIZE)]
        ams[0].pops.delay.add(waiting, [2**62] * len(waiting))
        assert set((await a.flow_packed("Release", raw, pop="ams"))["status"]) == {Status.OK}
        await wait_for(lambda: shipped(ams, Kind.TOMBSTONE) == 30, what="tombstones acked")
        assert ams[0].pops.skipped.get("Release", 0) == 20


async def test_a_confirm_writes_the_affinity_only_when_it_would_change(
    make_pops: MakePops,
) -> None:
    """A client's every connection used to rewrite its affinity (a quorum write, a third
    of a confirm's cost); now a confirm writes it only when this PoP's copy names another
    PoP (or is old)."""
    pops = await make_pops(pops=2, nodes=1)
    ams, fra = pops["ams"][0], pops["fra"][0]
    keys = np.frombuffer(synthetic_keys(3, seed=31), dtype=KEY_DTYPE).copy()
    keys["caddr"] = keys["caddr"][0]  # three connections of one client
    keys["cport"] = [40001, 40002, 40003]
    k = [keys[i : i + 1].tobytes() for i in range(3)]
    writes: list[int] = []
    batch = ams.node.batch

    async def counted(call: BatchCall) -> bytes:
        if call.op is Op.SET_AFFINITY:
            writes.append(len(call.payload))
        return await batch(call)

    ams.node.batch = counted  # type: ignore[method-assign]
    async with (
        Client([ams.grpc_address], timeout_s=10) as a,
        Client([fra.grpc_address], timeout_s=10) as f,
    ):

        async def preferred(pop: str) -> bool:
            (got,) = await a.get_affinity([FlowKey.from_bytes(k[0]).client])
            return got.owner_pop == POPS[pop]

        for key in k[:2]:
            await a.flow_packed("Claim", key, pop="ams")
            await a.flow_packed("Confirm", key, pop="ams")
        assert len(writes) == 1 and await preferred("ams")  # the second wrote nothing
        await f.flow_packed("Claim", k[2], pop="fra")
        await f.flow_packed("Confirm", k[2], pop="fra")  # the client moved to fra
        await until(lambda: preferred("fra"), "fra's affinity shipped to ams")
        await a.flow_packed("Confirm", k[1], pop="ams")  # and back: written again
        assert len(writes) == 2 and await preferred("ams")
