"""Replication inside a PoP with real nodes over gRPC: quorum writes and reads, hinted
hand-off, refill, anti-entropy (docs/protocol.md#replication-in-a-pop)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np
import pytest

from dht.client import Client
from dht.core.config import build_config
from dht.core.errors import ConfigError
from dht.core.record import Status
from dht.core.wire import ENTRY_DTYPE, KEY_DTYPE, RESULT_DTYPE, FlowKey, key_hashes
from dht.edge.server import NodeServer
from dht.node.replication import as_entries
from dht.tools.bench import synthetic_keys

from .conftest import MakePop, pop_configs, wait_for


def digests_of(srv: NodeServer) -> np.ndarray:  # type: ignore[type-arg]
    return srv.node.partition_digests()[0]


async def test_write_quorum_above_replicas_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="write_quorum 3 is impossible with 2 replicas"):
        build_config({"node_id": "a", "pop": "ams", "write_quorum": 3, "peers": ["b=127.0.0.1:1"]})
    with pytest.raises(ConfigError, match="write_quorum 4 is impossible with 3 replicas"):
        pop_configs(5, write_quorum=4)


async def test_quorum_survives_a_dead_node_and_it_refills(make_pop: MakePop) -> None:
    nodes = await make_pop(3)
    raw = synthetic_keys(3000, seed=3)
    async with Client([nodes[0].grpc_address], timeout_s=10) as c:
        first = await c.flow_packed("Claim", raw[: 1500 * 40], pop="ams")
        assert set(first["status"].tolist()) == {Status.CREATED}
        # One of three nodes goes away: W=2 still holds, hints queue up for it.
        victim = nodes[2]
        cfg = victim.config
        await victim.stop(leave=False)  # a crash, not a graceful leave
        second = await c.flow_packed("Claim", raw[1500 * 40 :], pop="ams")
        assert set(second["status"].tolist()) == {Status.CREATED}
        assert all(n.node.repair.hints.count(cfg.node_id) > 0 for n in nodes[:2]), (
            "the survivors keep hints for the dead replica"
        )
        # Reads answer from the survivors: nothing acknowledged is NOT_FOUND.
        seen = await c.flow_packed("Lookup", raw)
        assert set(seen["status"].tolist()) == {Status.OK}
        assert np.array_equal(
            seen["birth_hlc"], np.concatenate([first["birth_hlc"], second["birth_hlc"]])
        )
        # The node comes back empty on the same address: it refills before it is in
        # sync, and the hints reach it.
        back = NodeServer(cfg)
        await back.start()
        nodes.append(back)  # the fixture stops it
        await wait_for(lambda: back.node.in_sync, what="refill")
        assert len(back.node.store) == 3000
        await wait_for(
            lambda: all(n.node.repair.hints.count(cfg.node_id) == 0 for n in nodes[:2]),
            what="hints delivered",
        )
        await wait_for(
            lambda: all(np.array_equal(digests_of(n), digests_of(back)) for n in nodes[:2]),
            what="equal digests",
        )
        c.set_table(c.table)  # keep using the same table: the node has the same address
        again = await c.flow_packed("Lookup", raw)
        assert set(again["status"].tolist()) == {Status.OK}
    await back.stop()


async def test_primary_down_reads_come_from_a_read_quorum(make_pop: MakePop) -> None:
    nodes = await make_pop(3)
    raw = synthetic_keys(2000, seed=4)
    async with Client([nodes[0].grpc_address], timeout_s=10, no_forward=True) as c:
        await c.flow_packed("Confirm", raw, pop="fra")
        table = c.table
        hashes = key_hashes(raw)
        primaries = table.primaries[table.partitions_of(hashes)]
        victim_index = int(np.bincount(primaries).argmax())
        victim = next(n for n in nodes if n.config.node_id == table.members[victim_index].node_id)
        await victim.stop(leave=False)  # a crash, not a graceful leave
        res = await c.flow_packed("Lookup", raw)
        # Keys whose primary is dead were answered by the next replica after a quorum
        # read: found, never NOT_FOUND.
        assert set(res["status"].tolist()) == {Status.OK}
        assert set(res["owner_pop"].tolist()) == {2}
        survivors = [n for n in nodes if n is not victim]
        assert sum(n.node.replicator.stats.read_quorum_failures for n in survivors) == 0
        missing = synthetic_keys(50, seed=99, start=10_000_000)
        assert set((await c.flow_packed("Lookup", missing))["status"].tolist()) == {
            Status.NOT_FOUND
        }
        assert any(a == victim.grpc_address for _, a in c.failures)


async def test_no_quorum_means_unavailable_not_a_wrong_answer(make_pop: MakePop) -> None:
    nodes = await make_pop(3)
    raw = synthetic_keys(200, seed=5)
    async with Client([nodes[0].grpc_address], timeout_s=10) as c:
        await nodes[1].stop(leave=False)
        await nodes[2].stop(leave=False)
        res = await c.flow_packed("Claim", raw, pop="ams")
        # One replica of three cannot acknowledge (W=2) nor prove absence (R=2).
        assert set(res["status"].tolist()) == {Status.UNAVAILABLE}
        looked = await c.flow_packed("Lookup", synthetic_keys(100, seed=6, start=10_000_000))
        assert set(looked["status"].tolist()) <= {Status.UNAVAILABLE}
    text = nodes[0].node.metrics.render().decode()
    assert 'dht_quorum_failures_total{method="Claim"}' in text


async def test_anti_entropy_repairs_divergent_replicas(make_pop: MakePop) -> None:
    nodes = await make_pop(3, anti_entropy_interval_s=0.2)
    raw = synthetic_keys(500, seed=7)
    async with Client([nodes[0].grpc_address]) as c:
        await c.flow_packed("Confirm", raw, pop="ams")
    # Divergence behind replication's back: a record only one node has, and a later
    # expiry on another node only.
    stray = np.zeros(1, dtype=ENTRY_DTYPE)
    stray["key"] = np.frombuffer(
        synthetic_keys(1, seed=8, start=10_000_000), dtype=ENTRY_DTYPE["key"]
    )
    rec = np.zeros(1, dtype=RESULT_DTYPE)
    rec["status"], rec["state"], rec["owner_pop"], rec["birth_pop"] = Status.OK, 2, 3, 3
    rec["generation"], rec["birth_hlc"] = 1, nodes[0].node.clock.now()
    rec["expiry_ms"] = nodes[0].node.clock.wall_ms() + 600_000
    stray["rec"] = rec
    assert nodes[1].node.merge_entries(stray).applied == 1
    copy = np.frombuffer(nodes[0].node.internal_copies(raw[:40])[0], dtype=RESULT_DTYPE).copy()
    copy["expiry_ms"] += 1_000_000
    later = np.zeros(1, dtype=ENTRY_DTYPE)
    later["key"] = np.frombuffer(raw[:40], dtype=ENTRY_DTYPE["key"])
    later["rec"] = copy
    assert nodes[2].node.merge_entries(later).applied == 1
    await wait_for(
        lambda: all(np.array_equal(digests_of(n), digests_of(nodes[0])) for n in nodes),
        what="anti-entropy to converge",
    )
    for n in nodes:
        stored = np.frombuffer(
            n.node.internal_copies(raw[:40] + stray["key"].tobytes())[0], dtype=RESULT_DTYPE
        )
        assert stored["expiry_ms"][0] == copy["expiry_ms"][0]
        assert stored["owner_pop"][1] == 3
    assert sum(n.node.replicator.stats.ae_records_repaired for n in nodes) >= 2


async def test_digests_on_the_admin_endpoint(make_pop: MakePop) -> None:
    nodes = await make_pop(3)
    async with Client([nodes[0].grpc_address]) as c:
        await c.flow_packed("Confirm", synthetic_keys(300, seed=9), pop="ams")
    bodies = []
    async with aiohttp.ClientSession() as http:
        for n in nodes:
            async with http.get(f"http://{n.admin_address}/digests") as r:
                assert r.status == 200
                bodies.append(await r.json())
        async with http.get(
            f"http://{nodes[0].admin_address}/digests", params={"partitions": "1,2,x"}
        ) as r:
            assert r.status == 400
    assert all(len(b["partitions"]) == 4096 for b in bodies)
    assert bodies[0]["partitions"] == bodies[1]["partitions"] == bodies[2]["partitions"]
    # 300 flows (a lone PoP sets no affinity on confirm: every flow's PoP is this one).
    assert sum(p["records"] for p in bodies[0]["partitions"].values()) == 300
    metrics = nodes[0].node.metrics.render().decode()
    for name in (
        "dht_peer_up{",
        "dht_hints_queued{",
        "dht_hints_delivered_total",
        "dht_anti_entropy_rounds_total",
        "dht_anti_entropy_repaired_records_total",
        "dht_in_sync 1.0",
    ):
        assert name in metrics, name


async def test_a_write_older_than_anyone_can_be_told_is_refused(make_pop: MakePop) -> None:
    from dht.core.record import hlc_pack

    nodes = await make_pop(3)
    node = nodes[1].node
    entry = np.zeros(1, dtype=ENTRY_DTYPE)
    entry["key"] = np.frombuffer(
        synthetic_keys(1, seed=30, start=20_000_000), dtype=ENTRY_DTYPE["key"]
    )
    rec = np.zeros(1, dtype=RESULT_DTYPE)
    rec["status"], rec["state"], rec["owner_pop"], rec["birth_pop"], rec["generation"] = (
        1,
        1,
        2,
        2,
        1,
    )
    now = node.clock.wall_ms()
    rec["birth_hlc"], rec["expiry_ms"] = hlc_pack(now - 10_000, 0), now + 600_000
    entry["rec"] = rec
    # A coordinator paused mid-write resumes and sends it 10 s late: refused whole.
    late = hlc_pack(
        now - round(node.config.failure_timeout_s * 1000) - node.config.max_clock_offset_ms - 1, 0
    )
    res = node.internal_replicate(entry.tobytes(), late)
    assert res.stale
    assert len(node.store) == 0
    # Hints and anti-entropy carry old copies legitimately: no write stamp, applied.
    assert node.internal_replicate(entry.tobytes()).applied == 1


def replicas_of(nodes: list[NodeServer], raw: bytes) -> tuple[int, list[NodeServer]]:
    """The partition of the first key of ``raw``, and its replicas, primary first."""
    table = nodes[0].node.table
    part = int(table.partitions_of(key_hashes(raw[:40]))[0])
    by_id = {n.config.node_id: n for n in nodes}
    return part, [by_id[table.members[int(i)].node_id] for i in table.replicas[part]]


def _stub(srv: NodeServer) -> tuple[Any, Any]:
    import grpc

    from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc

    ch = grpc.aio.insecure_channel(srv.grpc_address)
    return ch, pb_grpc.FlowTableStub(ch)


async def test_a_coordinator_stalled_mid_write_is_fenced_by_a_take_over(
    make_pop: MakePop,
) -> None:
    """The race of a coordinator paused mid-write (docs/protocol.md#terms-and-fencing): its claim A
    is applied
    locally and in flight when another replica takes the partition over and gets a
    conflicting claim B acknowledged. A must not be acknowledged too (its earlier birth
    would later beat B everywhere): the take-over's promises fence A's term."""
    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.core.wire import decode_results

    nodes = await make_pop(3)
    raw = synthetic_keys(1, seed=40, start=30_000_000)
    _, (x, y, _) = replicas_of(nodes, raw)  # the primary, and the next replica

    # X's coordinated writes stall after X applied them locally, as a paused process's.
    gate, stalled = asyncio.Event(), asyncio.Event()
    transport = x.node.replicator.transport
    real = transport.replicate

    async def stalling(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        if terms is not None:
            stalled.set()
            await gate.wait()
        return await real(member, entries, hinted, issued_hlc, terms)

    transport.replicate = stalling  # type: ignore[method-assign]
    ch_x, stub_x = _stub(x)
    ch_y, stub_y = _stub(y)
    try:
        claim_a = asyncio.ensure_future(
            stub_x.Claim(pb.FlowBatchRequest(format_version=1, keys=raw, pop=1))
        )
        await stalled.wait()
        # Y coordinates the same key itself (no forward to the primary): it takes the
        # partition over, sees no copy of A (in flight, maybe undone), claims B.
        resp_b = await stub_y.Claim(
            pb.FlowBatchRequest(format_version=1, keys=raw, pop=2, no_forward=True)
        )
        b = decode_results(resp_b.results)[0]
        assert b.status == Status.CREATED and b.owner_pop == 2
        gate.set()
        a = decode_results((await claim_a).results)[0]
        # A was refused as fenced by both other replicas and undone; X took the
        # partition over again, retried, and found B: the claim is answered with B's
        # owner, never CREATED.
        assert a.status == Status.OWNED_ELSEWHERE and a.owner_pop == 2, a
        assert a.birth_hlc == b.birth_hlc
        assert x.node.replicator.stats.fenced_writes >= 1
        assert x.node.rollbacks == 1
    finally:
        gate.set()
        transport.replicate = real  # type: ignore[method-assign]
        await ch_x.close()
        await ch_y.close()

    # Every replica converges on B; a lookup anywhere answers B's owner.
    def copies() -> set[int]:
        return {
            int(
                n.node.store.copies(np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw))[
                    "birth_hlc"
                ][0]
            )
            for n in nodes
        }

    await wait_for(lambda: copies() == {b.birth_hlc}, what="every replica holds B")
    async with Client([x.grpc_address]) as c:
        seen = await c.lookup([FlowKey.from_bytes(raw)])
    assert seen[0].owner_pop == 2 and seen[0].birth_hlc == b.birth_hlc


async def test_a_write_that_missed_its_quorum_is_taken_back_where_replicas_took_it(
    make_pop: MakePop,
) -> None:
    """A claim that one replica took but that missed its quorum (W=3, the third replica
    unreachable) is answered UNAVAILABLE and undone on the coordinator *and* on that
    replica, and no hint keeps it. Else the failed claim's earlier birth would later beat
    a claim of the same flow that is acknowledged."""
    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.core.wire import decode_results
    from dht.node.transport import PeerUnreachable

    nodes = await make_pop(3, write_quorum=3)
    raw = synthetic_keys(1, seed=42, start=32_000_000)
    keys = np.frombuffer(raw, dtype=KEY_DTYPE)
    hashes = key_hashes(raw)
    _, (x, y, z) = replicas_of(nodes, raw)  # the primary and the two other replicas

    transport = x.node.replicator.transport
    real = transport.replicate

    async def z_unreachable(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        if member.node_id == z.config.node_id:
            raise PeerUnreachable(member.node_id, "test: unreachable")
        return await real(member, entries, hinted, issued_hlc, terms)

    def held_by(n: NodeServer) -> int:
        return int(n.node.store.copies(keys, hashes)["status"][0])

    transport.replicate = z_unreachable  # type: ignore[method-assign]
    ch, stub = _stub(x)  # not the client library: it would retry at another replica
    try:
        resp = await stub.Claim(
            pb.FlowBatchRequest(format_version=1, keys=raw, pop=1, no_forward=True)
        )
    finally:
        transport.replicate = real  # type: ignore[method-assign]
        await ch.close()
    assert decode_results(resp.results)[0].status == Status.UNAVAILABLE
    assert held_by(x) == Status.NOT_FOUND, "undone on the coordinator"
    assert held_by(y) == Status.NOT_FOUND, "undone on the replica that took it"
    assert x.node.replicator.stats.undone_remote == 1
    assert y.node.undone_for_others == 1
    assert x.node.repair.hints.count(z.config.node_id) == 0, "no hint of a failed write"

    # Another PoP's claim of the flow is then acknowledged, and stays the owner.
    async with Client([y.grpc_address], timeout_s=10) as c:
        won = await c.flow_packed("Claim", raw, pop="fra")
        assert won["status"][0] == Status.CREATED and won["owner_pop"][0] == 2
        again = await c.flow_packed("Lookup", raw)
    assert again["owner_pop"][0] == 2 and again["birth_hlc"][0] == won["birth_hlc"][0]

    # An undo that names keys but not their before-copies is refused, naming the field.
    from dht.core.errors import InvalidArgument

    entry = np.zeros(1, dtype=ENTRY_DTYPE).tobytes()
    with pytest.raises(InvalidArgument, match="before"):
        y.node.internal_undo(entry, b"", np.array([1], dtype=np.uint64), "")
    with pytest.raises(InvalidArgument, match="terms"):
        y.node.internal_undo(entry, entry, np.zeros(0, dtype=np.uint64), "")


async def test_anti_entropy_leaves_out_writes_still_open_to_an_undo(make_pop: MakePop) -> None:
    """A replica's copy of another coordinator's write stays out of anti-entropy (and
    cross-PoP exchange) until that coordinator can no longer take it back, so a write
    answered as failed does not spread before its undo arrives. Take-overs, refills and
    hand-offs still get it."""
    nodes = await make_pop(3)
    raw = synthetic_keys(1, seed=46, start=36_000_000)
    part, (x, y, _) = replicas_of(nodes, raw)
    async with Client([x.grpc_address], timeout_s=10) as c:
        assert (await c.flow_packed("Claim", raw, pop="ams"))["status"][0] == Status.CREATED
    parts = np.array([part], dtype=np.intp)

    def exported(settled_only: bool) -> bool:
        return raw in y.node.export_entries(parts, settled_only)["key"].tobytes()

    assert exported(False), "refills, hand-offs and take-overs see the copy at once"
    assert not exported(True), "anti-entropy does not, while the coordinator may undo it"
    window_s = (2 * y.config.rpc_timeout_ms + 1000) / 1000
    await wait_for(lambda: exported(True), timeout_s=window_s + 5, what="the window to end")


async def test_a_failed_write_a_quorum_read_saw_stands_and_is_pulled_back(
    make_pop: MakePop,
) -> None:
    """X's claim missed its quorum (W=3, Z unreachable) after Y took it; meanwhile a
    quorum read of another node pulled Y's copy. Y leaves it standing (the reader may
    have decided on it), and X pulls it back in: the claim stands, consistently."""
    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.core.wire import decode_results
    from dht.node.transport import PeerUnreachable

    nodes = await make_pop(3, write_quorum=3)
    raw = synthetic_keys(1, seed=49, start=39_000_000)
    keys, hashes = np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw)
    _, (x, y, z) = replicas_of(nodes, raw)
    transport = x.node.replicator.transport
    real = transport.replicate

    async def read_at_y_and_z_unreachable(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        if member.node_id == z.config.node_id:
            raise PeerUnreachable(member.node_id, "test: unreachable")
        res = await real(member, entries, hinted, issued_hlc, terms)
        if terms is not None:
            y.node.internal_copies(raw)  # another node's quorum read, before the undo
        return res

    transport.replicate = read_at_y_and_z_unreachable  # type: ignore[method-assign]
    ch, stub = _stub(x)
    try:
        resp = await stub.Claim(
            pb.FlowBatchRequest(format_version=1, keys=raw, pop=1, no_forward=True)
        )
    finally:
        transport.replicate = real  # type: ignore[method-assign]
        await ch.close()
    failed = decode_results(resp.results)[0]
    assert failed.status == Status.UNAVAILABLE
    stood = y.node.store.copies(keys, hashes)[0]
    assert stood["status"] == Status.OK and stood["birth_hlc"] == failed.birth_hlc
    assert x.node.replicator.stats.undo_refused == 1
    back = x.node.store.copies(keys, hashes)[0]
    assert back["status"] == Status.OK and back["birth_hlc"] == failed.birth_hlc, "pulled back"
    async with Client([x.grpc_address], timeout_s=10, no_forward=True) as c:
        other = await c.flow_packed("Claim", raw, pop="fra")
    assert other["status"][0] == Status.OWNED_ELSEWHERE and other["owner_pop"][0] == 1


async def test_an_undo_is_refused_by_a_replica_that_coordinated_since(
    make_pop: MakePop,
) -> None:
    """A replica puts back the copy from before a failed write unless it has itself
    taken the partition over under a higher term since (it may have decided claims on
    that copy). Promising a higher term to another node does not stop the undo."""
    nodes = await make_pop(3)
    raw = synthetic_keys(1, seed=47, start=37_000_000)
    keys, hashes = np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw)
    part, (x, y, _) = replicas_of(nodes, raw)
    parts = np.array([part], dtype=np.intp)

    async def claimed() -> tuple[bytes, bytes, bytes]:
        """Claim the flow afresh through X: Y's copy as written, and the write's term."""
        async with Client([x.grpc_address], timeout_s=10) as c:
            await c.flow_packed("Release", raw, pop="ams")
            await c.flow_packed("Claim", raw, pop="ams")
        written = as_entries(raw, y.node.store.copies(keys, hashes))
        before = written.copy()
        before["rec"]["status"] = Status.NOT_FOUND
        term = int(y.node.terms.promised[part])  # the write's, as Y accepted it
        return written.tobytes(), before.tobytes(), np.array([term], dtype=np.uint64)

    undo = await claimed()
    y.node.internal_promise(parts, int(y.node.terms.promised[part]) + 1, x.config.node_id)
    writer = x.node.config.node_id
    assert y.node.internal_undo(*undo, writer).tolist() == [], "a promise elsewhere: undone"
    assert y.node.store.copies(keys, hashes)["status"][0] == Status.NOT_FOUND
    undo = await claimed()
    assert (await y.node.coordinator.takeovers.take_over(np.array([part], dtype=np.uint16))).all()
    assert y.node.internal_undo(*undo, writer).tolist() == [0], "kept: Y coordinated since"
    assert y.node.store.copies(keys, hashes)["status"][0] == Status.OK


async def test_a_write_whose_caller_went_away_is_still_finished(make_pop: MakePop) -> None:
    """A claim whose caller gives up mid-write (its deadline passes while the
    coordinator waits for its replicas, as during a pause of the process) is still run
    to its end: here it misses its quorum, so it is undone, not left applied on the
    coordinator for anti-entropy to spread once it is no longer hidden as in flight."""
    import grpc

    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.node.transport import PeerUnreachable

    nodes = await make_pop(3)
    raw = synthetic_keys(1, seed=43, start=33_000_000)
    keys = np.frombuffer(raw, dtype=KEY_DTYPE)
    hashes = key_hashes(raw)
    _, (x, _, _) = replicas_of(nodes, raw)

    gate, stalled = asyncio.Event(), asyncio.Event()
    transport = x.node.replicator.transport
    real = transport.replicate

    async def stall_then_fail(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        if terms is None:
            return await real(member, entries, hinted, issued_hlc, terms)
        stalled.set()
        await gate.wait()
        raise PeerUnreachable(member.node_id, "test: unreachable")

    transport.replicate = stall_then_fail  # type: ignore[method-assign]
    ch, stub = _stub(x)
    try:
        call = stub.Claim(pb.FlowBatchRequest(format_version=1, keys=raw, pop=1), timeout=5)
        await stalled.wait()
        call.cancel()  # the caller goes away mid-write
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await call.code() == grpc.StatusCode.CANCELLED
        # Applied locally, still hidden as in flight; then the replicas fail it.
        assert x.node.store.copies(keys, hashes)["status"][0] == Status.OK
        gate.set()
        await wait_for(lambda: not x.node.coordinator.writes, what="the write ends")
    finally:
        gate.set()
        transport.replicate = real  # type: ignore[method-assign]
        await ch.close()
    assert x.node.store.copies(keys, hashes)["status"][0] == Status.NOT_FOUND
    assert x.node.rollbacks == 1


async def test_a_claim_that_loses_to_a_claim_on_one_replica_is_not_acknowledged(
    make_pop: MakePop,
) -> None:
    """One replica holds a claim of the flow the coordinator has not seen (a write
    answered as failed that could not be taken back there). A later claim of the flow
    must not be acknowledged on the other replicas' word, since the earlier claim wins
    every merge: the coordinator pulls that claim in and answers with it."""
    nodes = await make_pop(3)
    pool = synthetic_keys(20_000, seed=44, start=34_000_000)
    parts = nodes[0].node.table.partitions_of(key_hashes(pool))
    part = int(parts[0])
    first, second = np.flatnonzero(parts == part)[:2]
    raw_a = pool[first * 40 : (first + 1) * 40]
    raw_b = pool[second * 40 : (second + 1) * 40]
    _, (x, y, z) = replicas_of(nodes, raw_a)
    # Z's answer comes first, so it is heard before the quorum is (X and Y) met: a
    # replica that answers superseded after the quorum is not waited for.
    z_answered = asyncio.Event()
    transport = x.node.replicator.transport
    real = transport.replicate

    async def z_first(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        if terms is not None and member.node_id == y.config.node_id:
            await z_answered.wait()
        res = await real(member, entries, hinted, issued_hlc, terms)
        if member.node_id == z.config.node_id:
            z_answered.set()
        return res

    transport.replicate = z_first  # type: ignore[method-assign]
    async with Client([x.grpc_address], timeout_s=10) as c:
        # X takes the partition over (and pulls the replicas' copies) for flow A.
        assert (await c.flow_packed("Claim", raw_a, pop="ams"))["status"][0] == Status.CREATED
        # Flow B is claimed by fra on Z alone, behind X's back.
        keys_b = np.frombuffer(raw_b, dtype=KEY_DTYPE)
        planted = z.node.store.claim(
            keys_b,
            key_hashes(raw_b),
            pop=2,
            server=0,
            ttl_ms=60_000,
            now_ms=z.node.clock.wall_ms(),
        )[0]
        # ams claims B at X: Z reports it superseded (Y takes it).
        z_answered.clear()
        got = await c.flow_packed("Claim", raw_b, pop="ams")
    transport.replicate = real  # type: ignore[method-assign]
    assert got["status"][0] == Status.OWNED_ELSEWHERE, got
    assert got["owner_pop"][0] == 2 and got["birth_hlc"][0] == planted["birth_hlc"]
    assert x.node.replicator.stats.superseded_writes == 1
    held = x.node.store.copies(keys_b, key_hashes(raw_b))[0]
    assert held["owner_pop"] == 2 and held["birth_hlc"] == planted["birth_hlc"]


async def test_a_write_both_other_replicas_took_stands_after_a_take_over(
    make_pop: MakePop,
) -> None:
    """Both other replicas took X's claim A, then Y took the partition over before X
    heard back. Y's take-over pulled A from its promisers, so A stands: X acknowledges
    it (its own copy, hidden from Y as in flight, is not counted) and Y answers with A."""
    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.core.wire import decode_results

    nodes = await make_pop(3)
    raw = synthetic_keys(1, seed=45, start=35_000_000)
    part, (x, y, _) = replicas_of(nodes, raw)

    gate, answered = asyncio.Event(), asyncio.Event()
    transport = x.node.replicator.transport
    real = transport.replicate

    async def slow_answer(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        res = await real(member, entries, hinted, issued_hlc, terms)
        if terms is not None:
            answered.set()
            await gate.wait()
        return res

    transport.replicate = slow_answer  # type: ignore[method-assign]
    ch, stub = _stub(x)
    try:
        claim_a = asyncio.ensure_future(
            stub.Claim(pb.FlowBatchRequest(format_version=1, keys=raw, pop=1))
        )
        await answered.wait()
        await wait_for(
            lambda: all(
                n.node.store.copies(np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw))["status"][
                    0
                ]
                == Status.OK
                for n in nodes
            ),
            what="both replicas took A",
        )
        took = await y.node.coordinator.takeovers.take_over(np.array([part], dtype=np.uint16))
        assert took.all() and x.node.terms.held[part] == 0, "Y took over; X's term ended"
        gate.set()
        a = decode_results((await claim_a).results)[0]
    finally:
        gate.set()
        transport.replicate = real  # type: ignore[method-assign]
        await ch.close()
    assert a.status == Status.CREATED and a.owner_pop == 1, a
    async with Client([y.grpc_address], timeout_s=10, no_forward=True) as c:
        seen = await c.flow_packed("Claim", raw, pop="fra")
    assert seen["status"][0] == Status.OWNED_ELSEWHERE and seen["birth_hlc"][0] == a.birth_hlc


async def test_a_claim_beaten_on_its_coordinator_mid_write_is_not_acknowledged(
    make_pop: MakePop,
) -> None:
    """While X's claim B is out to its replicas, an earlier claim A of the flow is
    merged into X's own store (a quorum read of another call pulled it in). B has
    already lost there, so B is not acknowledged: X answers with A's owner."""
    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.core.wire import decode_results

    nodes = await make_pop(3)
    raw = synthetic_keys(1, seed=48, start=38_000_000)
    keys, hashes = np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw)
    _, (x, _, z) = replicas_of(nodes, raw)
    # Claim A (fra), born before B; made on Z's store and taken back there, so only
    # X's own store will hold it.
    empty = z.node.store.copies(keys, hashes)
    a = z.node.store.claim(
        keys, hashes, pop=2, server=0, ttl_ms=60_000, now_ms=z.node.clock.wall_ms()
    )
    z.node.store.restore(keys, hashes, empty)
    entry_a = as_entries(raw, a)

    gate, stalled = asyncio.Event(), asyncio.Event()
    transport = x.node.replicator.transport
    real = transport.replicate

    async def stalling(
        member: Any, entries: bytes, hinted: bool, issued_hlc: int = 0, terms: Any = None
    ) -> Any:
        if terms is not None:
            stalled.set()
            await gate.wait()
        return await real(member, entries, hinted, issued_hlc, terms)

    transport.replicate = stalling  # type: ignore[method-assign]
    ch, stub = _stub(x)
    try:
        claim_b = asyncio.ensure_future(
            stub.Claim(pb.FlowBatchRequest(format_version=1, keys=raw, pop=1))
        )
        await stalled.wait()
        x.node.merge_entries(entry_a)  # as a quorum read of another call would
        gate.set()
        b = decode_results((await claim_b).results)[0]
    finally:
        gate.set()
        transport.replicate = real  # type: ignore[method-assign]
        await ch.close()
    assert b.status == Status.OWNED_ELSEWHERE and b.owner_pop == 2, b
    assert b.birth_hlc == int(a["birth_hlc"][0])


async def test_promises_fence_lower_terms_and_bad_input_is_refused(make_pop: MakePop) -> None:
    from dht.core.errors import InvalidArgument
    from dht.core.record import hlc_pack

    nodes = await make_pop(3)
    node = nodes[1].node
    raw = synthetic_keys(1, seed=41, start=31_000_000)
    part = int(node.table.partitions_of(key_hashes(raw))[0])
    parts = np.array([part], dtype=np.intp)
    # A restart forgets its promises, so every term from before the start is fenced.
    floor = int(node.terms.promised[part])
    assert floor >= hlc_pack(node.clock.wall_ms() - 60_000, 0)
    term = node.clock.now() + 1000
    peer = nodes[0].config.node_id
    # Not to a node outside the table (declared dead, left, unknown).
    stranger, _ = node.internal_promise(parts, term, "ams-9")
    assert stranger.tolist() == [floor]
    granted, incomplete = node.internal_promise(parts, term, peer)
    assert granted.tolist() == [term]
    assert incomplete.tolist() == [not node.part_ready[int(parts[0])]]
    # A lower term is not promised; the answer says what was.
    lower, _ = node.internal_promise(parts, term - 1, peer)
    assert lower.tolist() == [term]

    entry = np.zeros(1, dtype=ENTRY_DTYPE)
    entry["key"] = np.frombuffer(raw, dtype=ENTRY_DTYPE["key"])
    now = node.clock.wall_ms()
    entry["rec"]["status"], entry["rec"]["state"], entry["rec"]["generation"] = 1, 1, 1
    entry["rec"]["owner_pop"] = entry["rec"]["birth_pop"] = 1
    entry["rec"]["birth_hlc"], entry["rec"]["expiry_ms"] = node.clock.now(), now + 600_000
    t_lo, t_hi = np.array([term - 1], np.uint64), np.array([term], np.uint64)
    assert node.internal_replicate(entry.tobytes(), 0, t_hi, "ams-9").fenced.size
    res = node.internal_replicate(entry.tobytes(), 0, t_lo, peer)
    assert res.fenced.tolist() == [part]
    assert res.fenced_by == term and len(node.store) == 0
    res = node.internal_replicate(entry.tobytes(), 0, t_hi, peer)
    assert not res.fenced.size and res.applied == 1 and not res.superseded.size
    # Another claim of the key (a later birth) loses to the one held here: merged, but
    # reported as not held, so it does not count toward its coordinator's quorum. (Once
    # a quorum read pulled it: a write still open and never pulled would be a failed one,
    # which the later write replaces, tests/sim/test_replication.py.)
    node.replica.read_copies(raw)
    other = entry.copy()
    other["rec"]["birth_hlc"], other["rec"]["owner_pop"] = node.clock.now(), 2
    res = node.internal_replicate(other.tobytes(), 0, t_hi, peer)
    assert res.superseded.tolist() == [0]
    held = node.store.copies(np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw))
    assert int(held["birth_hlc"][0]) == int(entry["rec"]["birth_hlc"][0])

    with pytest.raises(InvalidArgument, match="terms"):
        node.internal_replicate(entry.tobytes(), 0, np.zeros(2, np.uint64), peer)
    with pytest.raises(InvalidArgument, match="term"):
        node.internal_promise(parts, 0, peer)
    with pytest.raises(InvalidArgument, match="partitions"):
        node.internal_promise(np.array([0xFFFF], dtype=np.intp), term, peer)
    # Malformed packed fields are refused at the wire, naming the field.
    import grpc

    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(nodes[1].peer_address) as ch:
        internal = pb_grpc.NodeInternalStub(ch)
        bad = [
            (internal.Replicate, pb.EntryBatch(entries=entry.tobytes(), terms=b"\x00" * 7)),
            (internal.Promise, pb.PromiseRequest(partitions=b"\xff\xff", term=term)),
            (internal.Promise, pb.PromiseRequest(partitions=b"\x00", term=term)),
        ]
        for call, request in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "partitions" in (err.value.details() or "") or "terms" in (
                err.value.details() or ""
            )
