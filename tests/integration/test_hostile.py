"""Hostile callers of the internal services (docs/protocol.md#what-is-validated-where,
"Validate every ingress the same way"): forged, overflowing and poison values sent over
real gRPC on loopback to real nodes are refused (INVALID_ARGUMENT for a malformed call,
or the entry refused and counted in dht_ingress_refused_total), nothing is stored, and
the node goes on answering Claim and Lookup with its loops alive. Each case failed before
dht/core/ingress.py: the forged copies were applied (or the call died with UNKNOWN after
storing the row), and a term of 2^64-1 made every later write answer INTERNAL."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.client import Client
from dht.core.packing import pack_partitions
from dht.core.record import State, Status, hlc_pack
from dht.core.wire import ENTRY_DTYPE, KEY_DTYPE, key_hashes, parse_flow
from dht.edge.server import NodeServer
from dht.tools.bench import synthetic_keys

from .conftest import MakePop, MakePops

KEY = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443").to_bytes()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def forged(key: bytes = KEY, **rec: int) -> np.ndarray:
    """One entry as a replica would send it, good unless ``rec`` spoils it."""
    e = np.zeros(1, dtype=ENTRY_DTYPE)
    e["key"] = np.frombuffer(key, dtype=KEY_DTYPE)
    now = _now_ms()
    values = {
        "status": Status.OK,
        "state": State.ESTABLISHED,
        "owner_pop": 1,
        "birth_pop": 1,
        "generation": 1,
        "birth_hlc": hlc_pack(now, 0),
        "expiry_ms": now + 60_000,
        **rec,
    }
    for f, v in values.items():
        e["rec"][f] = v
    return e


def patched_key(offset: int, value: bytes) -> bytes:
    return KEY[:offset] + value + KEY[offset + len(value) :]


def held(srv: NodeServer, key: bytes = KEY) -> int:
    """How many copies of ``key`` the node's store holds (0 or 1)."""
    copies = srv.node.store.copies(np.frombuffer(key, dtype=KEY_DTYPE), key_hashes(key))
    return int(np.count_nonzero(copies["status"] == Status.OK))


def refused(srv: NodeServer, reason: str) -> int:
    return srv.node.replica.ingress_refused.get(reason, 0)


async def still_serves(nodes: list[NodeServer]) -> None:
    """Claim and Lookup answer on every node; the node is live."""
    raw = synthetic_keys(20, seed=31)
    async with Client([nodes[0].grpc_address], timeout_s=10) as c:
        claimed = np.frombuffer(await c.flow_packed("Claim", raw, pop="ams"), ENTRY_DTYPE["rec"])
        assert (claimed["status"] == Status.CREATED).all()
        found = np.frombuffer(await c.flow_packed("Lookup", raw), ENTRY_DTYPE["rec"])
        assert (found["status"] == Status.OK).all()
    assert all(s.node.live() for s in nodes)


CASES = [
    ("state 9", KEY, {"state": 9}, "state"),
    ("protocol 99", patched_key(1, b"\x63"), {}, "key_protocol"),
    ("client port 0", patched_key(18, b"\0\0"), {}, "key_client_port"),
    ("reserved bytes", patched_key(38, b"\0\1"), {}, "key_reserved"),
    ("owner PoP 77", KEY, {"owner_pop": 77}, "owner_pop"),
    ("birth 1 ms after the epoch", KEY, {"birth_hlc": hlc_pack(1, 0)}, "birth_too_old"),
    ("expiry 2^62", KEY, {"expiry_ms": 1 << 62}, "expiry_too_far"),
    ("generation 10^9", KEY, {"generation": 10**9}, "generation"),
]


@pytest.mark.parametrize(
    ("what", "key", "rec", "reason"), CASES, ids=[c[0].replace(" ", "_") for c in CASES]
)
async def test_forged_replicate_entries_are_refused(
    make_pop: MakePop, what: str, key: bytes, rec: dict[str, int], reason: str
) -> None:
    nodes = await make_pop(2)
    target = nodes[1]
    bad = forged(key, **rec)
    good = forged(parse_flow("tcp/198.51.100.8:51000/192.0.2.1:443").to_bytes())
    async with grpc.aio.insecure_channel(target.peer_address) as ch:
        internal = pb_grpc.NodeInternalStub(ch)
        resp = await internal.Replicate(
            pb.EntryBatch(
                format_version=1,
                entries=bad.tobytes() + good.tobytes(),
                from_node="nobody",
            ),
            timeout=5,
        )
    # The good entry beside it is applied; the bad one refused on its own, counted.
    assert resp.applied == 1 and resp.refused == 1, what
    assert held(target, key) == 0, what
    assert held(target, good["key"].tobytes()) == 1
    assert refused(target, reason) == 1, target.node.replica.ingress_refused
    await still_serves(nodes)


async def test_a_coordinated_replicate_does_not_count_refused_entries(
    make_pop: MakePop,
) -> None:
    """Under terms (a coordinator's write) a refused entry is no acknowledgement."""
    nodes = await make_pop(2)
    node = nodes[1].node
    bad = forged(state=9)
    term = node.terms.next_term(np.arange(node.table.num_partitions), node.clock.now())
    res = node.internal_replicate(
        bad.tobytes(), 0, np.array([term], dtype=np.uint64), nodes[0].node.config.node_id
    )
    assert res.superseded.tolist() == [0] and res.applied == 0
    assert held(nodes[1]) == 0
    # Nothing of the refused entry counted as a promise.
    assert int(node.terms.promised.max()) < term


async def test_an_undo_with_poison_before_changes_nothing(make_pop: MakePop) -> None:
    nodes = await make_pop(2)
    srv = nodes[1]
    good = forged()
    ack = srv.node.internal_replicate(good.tobytes(), 0, None, "")
    assert ack.applied == 1
    poison = forged(state=9, owner_pop=77)
    async with grpc.aio.insecure_channel(srv.peer_address) as ch:
        internal = pb_grpc.NodeInternalStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await internal.Undo(
                pb.UndoRequest(
                    written=good.tobytes(),
                    before=poison.tobytes(),
                    terms=np.full(1, (1 << 64) - 1, dtype=">u8").tobytes(),
                ),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    copies = srv.node.store.copies(np.frombuffer(KEY, dtype=KEY_DTYPE), key_hashes(KEY))
    assert int(copies["state"][0]) == State.ESTABLISHED
    await still_serves(nodes)


async def test_an_undo_whose_before_is_poison_is_left_standing(make_pop: MakePop) -> None:
    nodes = await make_pop(2)
    srv = nodes[1]
    good = forged()
    assert srv.node.internal_replicate(good.tobytes(), 0, None, "").applied == 1
    poison = forged(state=9)
    kept = srv.node.internal_undo(
        good.tobytes(), poison.tobytes(), np.zeros(1, np.uint64), nodes[0].node.config.node_id
    )
    assert kept.tolist() == [0]
    copies = srv.node.store.copies(np.frombuffer(KEY, dtype=KEY_DTYPE), key_hashes(KEY))
    assert int(copies["state"][0]) == State.ESTABLISHED
    assert refused(srv, "state") == 1
    await still_serves(nodes)


async def test_a_promise_of_term_2_to_the_64_is_invalid_argument(make_pop: MakePop) -> None:
    nodes = await make_pop(2)
    target = nodes[1]
    member = nodes[0].node.config.node_id
    async with grpc.aio.insecure_channel(target.peer_address) as ch:
        internal = pb_grpc.NodeInternalStub(ch)
        parts = pack_partitions(np.arange(target.node.table.num_partitions))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await internal.Promise(
                pb.PromiseRequest(from_node=member, partitions=parts, term=(1 << 64) - 1),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("term")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await internal.Replicate(
                pb.EntryBatch(
                    format_version=1,
                    entries=forged().tobytes(),
                    from_node=member,
                    terms=np.full(1, (1 << 64) - 1, dtype=">u8").tobytes(),
                ),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert int(target.node.terms.promised.max()) < 1 << 63
    assert held(target) == 0
    assert refused(target, "term") == 2
    await still_serves(nodes)


async def test_poison_shipped_from_another_pop_is_refused(make_pops: MakePops) -> None:
    """PopLink: a tombstone at generation 10^9, a birth 1 ms after the epoch with an
    expiry of 2^62, an affinity record stamped in 2100; each refused and counted."""
    pops = await make_pops()
    ams = pops["ams"]
    raw = KEY
    async with Client([ams[0].grpc_address], timeout_s=10) as c:
        res = np.frombuffer(await c.flow_packed("Confirm", raw, pop="ams"), ENTRY_DTYPE["rec"])
    assert int(res["status"][0]) == Status.CREATED
    mine = res[0]
    tomb = forged(
        state=State.RELEASED,
        owner_pop=1,
        birth_pop=1,
        generation=10**9,
        birth_hlc=int(mine["birth_hlc"]),
    )
    ancient = forged(
        owner_pop=2, birth_pop=2, generation=int(mine["generation"]), birth_hlc=hlc_pack(1, 0)
    )
    ancient["rec"]["expiry_ms"] = 1 << 62
    prefix = np.zeros(1, dtype=KEY_DTYPE)
    prefix["kind"] = 2
    prefix["caddr"][0, 10:] = (0xFF, 0xFF, 198, 51, 100, 7)
    affinity = forged(
        key=prefix.tobytes(),
        state=0,
        generation=0,
        owner_pop=2,
        birth_pop=2,
        birth_hlc=hlc_pack(4_102_444_800_000, 0),  # 2100
    )
    target = ams[0]
    async with grpc.aio.insecure_channel(target.peer_address) as ch:
        stub = pb_grpc.PopLinkStub(ch)
        for entry, reason in (
            (tomb, "generation"),
            (ancient, "birth_too_old"),
            (affinity, "birth_ahead"),
        ):
            ack = await stub.PopPush(
                pb.ShipBatch(
                    format_version=1, from_pop=2, num_partitions=4096, entries=entry.tobytes()
                ),
                timeout=5,
            )
            assert ack.rejected == 1 and ack.applied == 0, (reason, ack)
            assert refused(target, reason) == 1, (reason, target.node.replica.ingress_refused)
    async with Client([target.grpc_address], timeout_s=10) as c:
        found = np.frombuffer(await c.flow_packed("Lookup", raw), ENTRY_DTYPE["rec"])
    assert int(found["status"][0]) == Status.OK
    assert int(found["owner_pop"][0]) == 1 and int(found["generation"][0]) == int(
        mine["generation"]
    )
    for s in ams:  # the client's preferred PoP is still the one that confirmed
        pref = s.node.affinity.get(prefix["caddr"], _now_ms())
        assert int(pref["owner_pop"][0]) in (0, 1), pref
    assert all(s.node.live() for s in ams)


# ---------------------------------------------------------------------------- membership
# (docs/protocol.md#swim-states, "Membership only from members": without TLS (these nodes)
# nothing authenticates gossip, and what it can do is bounded; with TLS only the PoP's
# nodes gossip, each as itself: test_authz.py. Each case failed before: the rumour was
# adopted, the refutation overflowed the uint64 wire field and killed the probe loop, the
# view grew without bound, and PingReq dialed whatever address it was given.)


def member_pb(node_id: str, address: str, incarnation: int, status: int) -> pb.MemberState:
    return pb.MemberState(node_id=node_id, address=address, incarnation=incarnation, status=status)  # type: ignore[arg-type]


async def ping(srv: NodeServer, members: list[pb.MemberState]) -> pb.PingResponse:
    async with grpc.aio.insecure_channel(
        srv.peer_address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        resp: pb.PingResponse = await pb_grpc.NodeInternalStub(ch).Ping(
            pb.PingRequest(from_node="nobody", members=members), timeout=10
        )
        return resp


def active_ids(srv: NodeServer) -> list[str]:
    return [m.node_id for m in srv.node.membership.active()]


async def test_a_left_rumour_at_2_to_the_64_is_refused_and_cannot_overflow(
    make_pop: MakePop,
) -> None:
    """ "ams-2 LEFT, incarnation 2^64-1" sent to both nodes: neither adopts it, the
    victim does not refute past what uint64 holds, and its probe loop lives."""
    nodes = await make_pop(2)
    victim = nodes[1].node
    before = victim.membership.self_state.incarnation
    rumour = member_pb(victim.config.node_id, nodes[1].grpc_address, (1 << 64) - 1, 4)
    for srv in nodes:
        await ping(srv, [rumour])
    # Just under the bound a rumour is still refuted, within the bound.
    bound = victim.membership.incarnation_bound(victim.mono_ms())
    await ping(nodes[1], [member_pb(victim.config.node_id, "", bound, 3)])
    await asyncio.sleep(1.0)  # several probe rounds
    assert (
        active_ids(nodes[0]) == active_ids(nodes[1]) == sorted(s.node.config.node_id for s in nodes)
    )
    assert before <= victim.membership.self_state.incarnation < 1 << 63
    assert all(s.node.membership.refused["incarnation"] >= 1 for s in nodes)
    await still_serves(nodes)


async def test_gossip_cannot_grow_the_view_without_bound(make_pop: MakePop) -> None:
    """100,000 fake LEFT members (rumours about nodes never admitted), five fakes at
    incarnation 2^62, and more fake joins than the view holds: ignored and counted."""
    nodes = await make_pop(2, max_members=8)
    target = nodes[0]
    ms = target.node.membership
    left = [member_pb(f"f{i}", "10.255.0.1:1", 5, 4) for i in range(100_000)]
    resp = await ping(target, left)
    assert len(resp.members) == 2 and len(ms.members) == 2
    assert ms.refused["unknown"] == 100_000
    huge = [member_pb(f"g{i}", f"127.0.0.1:{i + 1}", 1 << 62, 1) for i in range(5)]
    await ping(target, huge)
    assert len(ms.members) == 2 and ms.refused["incarnation"] == 5
    await still_serves(nodes)
    # Without TLS joins are not authenticated (test_authz.py: with TLS they are): a fake
    # ALIVE state is admitted, but never past max_members.
    joins = [member_pb(f"h{i}", f"127.0.0.1:{i + 1}", 1, 1) for i in range(20)]
    await ping(target, joins)
    assert len(ms.members) == 8 and ms.refused["full"] == 14
    assert all(s.node.live() for s in nodes)


async def test_ping_req_dials_only_members_of_the_view(make_pop: MakePop) -> None:
    nodes = await make_pop(2)
    dialed: list[int] = []

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dialed.append(1)
        w.close()

    bait = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = bait.sockets[0].getsockname()[1]
    other = nodes[1].node.config.node_id
    try:
        async with grpc.aio.insecure_channel(nodes[0].peer_address) as ch:
            stub = pb_grpc.NodeInternalStub(ch)
            for node_id in ("stranger", other):  # unknown node; a member at another address
                resp = await stub.PingReq(
                    pb.PingReqRequest(
                        from_node="nobody",
                        target_node=node_id,
                        target_address=f"127.0.0.1:{port}",
                    ),
                    timeout=5,
                )
                assert not resp.ok
            good = await stub.PingReq(
                pb.PingReqRequest(
                    from_node="nobody", target_node=other, target_address=nodes[1].peer_address
                ),
                timeout=5,
            )
            assert good.ok
    finally:
        bait.close()
        await bait.wait_closed()
    assert dialed == []
    assert nodes[0].node.liveness.ping_req_refused == 2


# ---------------------------------------------------------------------------- undo
# (docs/protocol.md#undo, "Undo only by its writer": ReadCopies then Undo(written=copy) deleted the
# record. The caller must be a member of the tables in force, the term at most what the
# replica promised, and the copy one that caller itself wrote there, still open to an undo.)


async def test_an_undo_only_by_the_member_that_wrote_the_copy(make_pop: MakePop) -> None:
    nodes = await make_pop(3)
    srv = nodes[2]
    node = srv.node
    writer, other = (n.node.config.node_id for n in nodes[:2])
    part = int(node.table.partitions_of(key_hashes(KEY))[0])
    term = int(node.terms.promised[part])
    good = forged()
    # The writer's coordinated write of KEY, under the term promised here.
    wrote = node.internal_replicate(good.tobytes(), 0, np.full(1, term, np.uint64), writer)
    assert wrote.applied == 1 and not wrote.fenced.size
    # A copy of another key that came by anti-entropy (no writer): nobody may undo it.
    key2 = parse_flow("tcp/198.51.100.8:51000/192.0.2.1:443").to_bytes()
    assert node.internal_replicate(forged(key2).tobytes(), 0, None, "").applied == 1

    async def undo(from_node: str, t: int, key: bytes = KEY) -> pb.UndoResponse:
        written = forged(key) if key != KEY else good
        before = written.copy()
        before["rec"]["status"] = Status.NOT_FOUND
        async with grpc.aio.insecure_channel(srv.peer_address) as ch:
            resp: pb.UndoResponse = await pb_grpc.NodeInternalStub(ch).Undo(
                pb.UndoRequest(
                    from_node=from_node,
                    written=written.tobytes(),
                    before=before.tobytes(),
                    terms=np.full(1, t, dtype=">u8").tobytes(),
                ),
                timeout=5,
            )
            return resp

    now_term = node.clock.now()  # within the term bound, above the promise
    assert now_term > term
    for who, t in (("nobody", term), ("", term), (writer, now_term), (other, term)):
        resp = await undo(who, t)
        assert resp.undone == 0, (who, t)
        assert held(srv) == 1, (who, t)
    assert (await undo(writer, term, key2)).undone == 0
    assert held(srv, key2) == 1
    assert node.replica.undo_refused == {"not_member": 2, "term": 1, "not_writer": 2}
    # The writer, under the term promised here: undone.
    assert (await undo(writer, term)).undone == 1
    assert held(srv) == 0
    await still_serves(nodes)
