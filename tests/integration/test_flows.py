"""Flow calls across 3 real nodes over gRPC on loopback: the record's whole life."""

from __future__ import annotations

import asyncio
import ipaddress

from dht.client import Client
from dht.core.placement import PartitionMap
from dht.core.record import State, Status
from dht.core.wire import FlowKey, key_hashes, parse_flow

from .conftest import FakeTime, MakePop, wait_for


def flows(n: int, v6: bool = False, sport: int = 443) -> list[FlowKey]:
    out = []
    for i in range(n):
        if v6:
            c: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(
                0x20010DB8 << 96 | i
            )
            s: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address("2001:db8::1")
        else:
            c = ipaddress.IPv4Address(0xC6336400 + i % 256)
            s = ipaddress.IPv4Address("192.0.2.1")
        out.append(FlowKey(6 if i % 2 else 17, c, 1024 + i, s, sport))
    return out


async def test_life_of_a_flow_across_nodes_ipv4_and_ipv6(make_pop: MakePop, make_client) -> None:  # type: ignore[no-untyped-def]
    clock = FakeTime()
    nodes = await make_pop(3, wall_ms=clock)
    a = await make_client([nodes[0].grpc_address])
    b = await make_client([nodes[2].grpc_address])
    keys = flows(300) + flows(300, v6=True)

    claimed = await a.claim(keys, pop="ams")
    assert {r.status for r in claimed} == {Status.CREATED}
    assert all(
        r.state == State.EMBRYONIC and r.generation == 1 and r.owner_pop == 1 for r in claimed
    )
    # Acknowledged = held by the write quorum (2 of 3) when answered; the third copy
    # follows without holding up the answer.
    for key in keys:
        assert sum(n.node.store.get(key.to_bytes()) is not None for n in nodes) >= 2
    await wait_for(lambda: all(len(n.node.store) == len(keys) for n in nodes), what="3rd copies")
    # Each key was decided by the primary the table names.
    table = a.table
    for key, r in zip(keys, claimed, strict=True):
        assert table.partition_of(int(key_hashes(key.to_bytes())[0])) == r.partition

    seen = await b.lookup(keys)
    assert [r.status for r in seen] == [Status.OK] * len(keys)
    assert [r.birth_hlc for r in seen] == [r.birth_hlc for r in claimed]

    confirmed = await b.confirm(keys[:200], pop="ams")
    assert {r.status for r in confirmed} == {Status.OK}
    assert {r.state for r in await a.lookup(keys[:200])} == {State.ESTABLISHED}

    clock.advance(11)  # past the embryonic TTL (10 s), within the established one
    after = await a.lookup(keys)
    assert {r.status for r in after[:200]} == {Status.OK}
    assert {r.status for r in after[200:]} == {Status.NOT_FOUND}
    assert {r.status for r in await a.refresh(keys[200:210], pop="ams")} == {Status.NOT_FOUND}
    refreshed = await a.refresh(keys[:10], pop="ams", ttl_s=3600)
    assert all(r.expiry_ms == clock.ms + 3_600_000 for r in refreshed)

    released = await b.release(keys[:100], pop="ams")
    assert {r.status for r in released} == {Status.OK}
    assert {r.status for r in await a.lookup(keys[:100])} == {Status.NOT_FOUND}
    reclaimed = await a.claim(keys[:100], pop="fra")
    assert {(r.status, r.generation, r.owner_pop) for r in reclaimed} == {(Status.CREATED, 2, 2)}

    # Expired embryonic records are purged in the background slices, not just hidden:
    # each replica keeps only keys[:200] (established, or reclaimed over a tombstone).
    for n in nodes:
        n.node.purge_step()
    assert [len(n.node.store) for n in nodes] == [200, 200, 200]


async def test_racing_claims_have_exactly_one_owner(make_pop: MakePop, make_client) -> None:  # type: ignore[no-untyped-def]
    nodes = await make_pop(3)
    ams = await make_client([nodes[0].grpc_address])
    fra = await make_client([nodes[1].grpc_address])
    keys = flows(500, sport=8443)
    for _ in range(3):  # several rounds of concurrent calls, chunked to interleave
        chunks = [keys[i : i + 50] for i in range(0, len(keys), 50)]
        results = await asyncio.gather(
            *(ams.claim(c, pop="ams") for c in chunks), *(fra.claim(c, pop="fra") for c in chunks)
        )
        a = [r for rs in results[: len(chunks)] for r in rs]
        f = [r for rs in results[len(chunks) :] for r in rs]
        for ra, rf in zip(a, f, strict=True):
            assert ra.owner_pop == rf.owner_pop
            assert ra.birth_hlc == rf.birth_hlc
            created = [r for r in (ra, rf) if r.status == Status.CREATED]
            assert len(created) <= 1
    final = await ams.lookup(keys)
    owners = {r.owner_pop for r in final}
    assert owners <= {1, 2}
    assert all(r.status == Status.OK for r in final)
    assert [r.owner_pop for r in await fra.lookup(keys)] == [r.owner_pop for r in final]


async def test_stale_table_is_corrected_by_moved(make_pop: MakePop, make_client) -> None:  # type: ignore[no-untyped-def]
    nodes = await make_pop(4, replication_factor=2)
    client = await make_client([nodes[0].grpc_address], no_forward=True)
    right = client.table
    # A deliberately stale table: only two of the four members, another epoch.
    stale = PartitionMap.build(right.members[:2], right.num_partitions, 2)
    assert stale.epoch != right.epoch
    client.set_table(stale)
    refreshes = client.table_refreshes
    keys = flows(400)
    res = await client.claim(keys, pop="ams")
    assert {r.status for r in res} == {Status.CREATED}
    assert client.table_refreshes > refreshes
    assert client.table.epoch == right.epoch
    # Each record sits on exactly the node the real table names.
    for key, r in zip(keys, res, strict=True):
        owner = right.members[int(right.primaries[r.partition])].node_id
        holder = next(n for n in nodes if n.config.node_id == owner)
        assert holder.node.store.get(key.to_bytes()) is not None


async def test_stale_table_with_forwarding_answers_correctly(
    make_pop: MakePop, make_client
) -> None:  # type: ignore[no-untyped-def]
    nodes = await make_pop(3)
    client = await make_client([nodes[0].grpc_address])
    right = client.table
    # Everything to node 0: it forwards each key one hop to its owner.
    everything_to_0 = PartitionMap(
        right.epoch + 1, right.members, right.num_partitions, right.replicas * 0
    )
    client.set_table(everything_to_0)
    keys = flows(300, v6=True)
    res = await client.claim(keys, pop="ams")
    assert {r.status for r in res} == {Status.CREATED}
    assert nodes[0].node.metrics.forwarded._value.get() > 0
    assert client.table.epoch == right.epoch  # the epoch in the answers made it refresh
    assert {r.status for r in await Client.lookup(client, keys)} == {Status.OK}


async def test_forwarded_request_is_never_forwarded_again(make_pop: MakePop) -> None:
    import grpc

    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc

    # 4 nodes, 2 replicas: node 0 replicates about half of the partitions.
    nodes = await make_pop(4, replication_factor=2)
    keys = flows(100)
    raw = b"".join(k.to_bytes() for k in keys)
    async with grpc.aio.insecure_channel(nodes[0].grpc_address) as ch:
        stub = pb_grpc.FlowTableStub(ch)
        resp = await stub.Claim(pb.FlowBatchRequest(format_version=1, keys=raw, forwarded=True))
    from dht.core.wire import decode_results

    node0 = nodes[0].node
    results = decode_results(resp.results)
    for r in results:
        replica = node0.table.index_of(node0.config.node_id) in node0.table.replicas[r.partition]
        # A replica coordinates (after a quorum read); anything else is MOVED, not forwarded.
        assert r.status == (Status.CREATED if replica else Status.MOVED)
    assert 0 < [r.status for r in results].count(Status.MOVED) < len(keys)
    assert node0.metrics.forwarded._value.get() == 0


async def test_affinity_get_and_set(make_pop: MakePop, make_client) -> None:  # type: ignore[no-untyped-def]
    nodes = await make_pop(3)
    c = await make_client([nodes[1].grpc_address])
    clients = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(50)]
    clients += [ipaddress.ip_address(f"2001:db8:0:{i}::5") for i in range(50)]
    assert {r.status for r in await c.get_affinity(clients)} == {Status.NOT_FOUND}
    res = await c.set_affinity(clients, "fra")
    assert {(r.status, r.owner_pop) for r in res} == {(Status.OK, 2)}
    # Another address in the same /64 shares the IPv6 client's affinity.
    same64 = ipaddress.ip_address("2001:db8:0:7::9999")
    got = await c.get_affinity([*clients, same64])
    assert {(r.status, r.owner_pop) for r in got} == {(Status.OK, 2)}


async def test_single_key_cli_grammar_flow_round_trip(make_pop: MakePop, make_client) -> None:  # type: ignore[no-untyped-def]
    nodes = await make_pop(1)
    c = await make_client([nodes[0].grpc_address])
    key = parse_flow("udp/[2001:db8::7]:51000/[2001:db8::1]:443")
    (r,) = await c.claim([key], pop="lon", server=7)
    assert (r.status, r.owner_pop, r.owner_server) == (Status.CREATED, 3, 7)
