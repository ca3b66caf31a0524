"""Bounded resources against real nodes (docs/operations.md#configuration): the UDP
listener's full-path tasks are capped, the affinity store has a capacity, and an
embryonic flood is refused without taking the PoP out of /readyz."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import aiohttp
import numpy as np
import pytest

from dht.client import Client
from dht.core.ops import BatchCall, Op
from dht.core.record import Status
from dht.core.wire import KEY_SIZE, RESULT_DTYPE, FlowKey, key_hashes
from dht.edge.udp import HEADER

from .conftest import MakePop, wait_for
from .test_udp_lookup import _raw_socket, _request


async def test_udp_full_path_tasks_are_capped_and_the_rest_dropped(
    make_pop: MakePop, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers = await make_pop(2, udp_lookup_port=0, udp_max_inflight=2)
    srv = servers[0]
    client = await make_client([srv.grpc_address])
    table = client.table
    me = table.index_of(srv.node.config.node_id)
    # Keys node 0 is not the primary of: each takes the full path there.
    keys = [
        FlowKey(
            6, ipaddress.ip_address(f"198.51.100.{i}"), 1000, ipaddress.ip_address("192.0.2.1"), 443
        ).to_bytes()
        for i in range(1, 250)
    ]
    others = [k for k in keys if int(table.primaries[table.partitions_of(key_hashes(k))[0]]) != me]
    assert len(others) >= 10
    gate = asyncio.Event()
    real = srv.node.batch

    async def held(call: BatchCall) -> bytes:
        await gate.wait()
        return await real(call)

    monkeypatch.setattr(srv.node, "batch", held)

    def dropped() -> float:
        value = srv.node.metrics.registry.get_sample_value(
            "dht_requests_total", {"method": "UdpLookup", "code": "DROPPED"}
        )
        return value or 0.0

    transport, proto = await _raw_socket(srv.udp_lookup_port)
    try:
        for rid, key in enumerate(others[:10], start=1):
            transport.sendto(_request(key, rid=rid))
        await wait_for(lambda: dropped() == 8.0, 5.0, "8 datagrams dropped")
        assert proto.got.empty()
        gate.set()
        answers = [await asyncio.wait_for(proto.got.get(), 5) for _ in range(2)]
        rids = sorted(int.from_bytes(a[4:8], "big") for a in answers)
        assert rids == [1, 2]
        for a in answers:
            res = np.frombuffer(a[HEADER.size :], dtype=RESULT_DTYPE)
            assert int(res["status"][0]) == Status.NOT_FOUND
        # The cap frees as the full path answers: the next datagram is served.
        transport.sendto(_request(others[0], rid=99))
        answer = await asyncio.wait_for(proto.got.get(), 5)
        assert int.from_bytes(answer[4:8], "big") == 99
        assert dropped() == 8.0
    finally:
        transport.close()


def _prefixes(n: int, start: int = 0) -> bytes:
    out = np.zeros((n, 16), dtype=np.uint8)
    for i in range(n):
        out[i, :4] = list(
            ipaddress.ip_address(f"10.1.{(start + i) // 250}.{(start + i) % 250 + 1}").packed
        )
    return out.tobytes()


async def test_affinity_store_capacity_refuses_new_prefixes_per_key(make_pop: MakePop) -> None:
    servers = await make_pop(
        1, limits={"max_affinity_records": 20, "hard_max_affinity_records": 25}
    )
    node = servers[0].node
    first = _prefixes(30)
    raw = await node.batch(BatchCall(Op.SET_AFFINITY, first, pop=2))
    res = np.frombuffer(raw, dtype=RESULT_DTYPE)
    assert list(res["status"]) == [Status.OK] * 20 + [Status.REFUSED_FULL] * 10
    # Held prefixes are still updated when full; new ones refused.
    again = first[: 5 * 16] + _prefixes(3, start=100)
    res = np.frombuffer(await node.batch(BatchCall(Op.SET_AFFINITY, again, pop=3)), RESULT_DTYPE)
    assert list(res["status"]) == [Status.OK] * 5 + [Status.REFUSED_FULL] * 3
    assert int(res["owner_pop"][0]) == 3
    assert len(node.affinity) == 20
    # Copies merged in past the hard ceiling are refused and counted, never raised.
    copies = np.zeros(10, dtype=node.export_entries(np.arange(1), False).dtype)
    copies["key"]["kind"] = 2
    copies["key"]["caddr"] = np.frombuffer(_prefixes(10, start=200), np.uint8).reshape(-1, 16)
    copies["rec"]["owner_pop"] = 2
    copies["rec"]["birth_pop"] = 2
    copies["rec"]["birth_hlc"] = node.clock.now()
    copies["rec"]["expiry_ms"] = node.clock.wall_ms() + 60_000
    node.merge_entries(copies)
    assert len(node.affinity) == 25
    text = node.metrics.render().decode()
    assert 'dht_affinity_refusals_total{reason="full"} 13.0' in text
    assert 'dht_affinity_refusals_total{reason="hard"} 5.0' in text
    assert node.readiness() == (True, [])


async def test_an_embryonic_flood_from_many_clients_keeps_the_pop_ready(
    make_pop: MakePop,
) -> None:
    # Soft and hard ceilings equal: replicas refuse the flood's copies at once.
    nodes = await make_pop(
        4, limits={"max_records": 200, "hard_max_records": 200, "embryonic_quota_per_prefix": 5}
    )
    async with Client([n.grpc_address for n in nodes]) as c:

        async def flood(r: int, j: int) -> list[Status]:
            keys = [
                FlowKey(
                    6,
                    ipaddress.ip_address(f"10.{r}.{j}.{i}"),
                    1000,
                    ipaddress.ip_address("192.0.2.1"),
                    443,
                )
                for i in range(1, 201)
            ]
            return [x.status for x in await c.claim(keys, pop="ams")]

        statuses = [
            s
            for r in range(3)
            for got in await asyncio.gather(*(flood(r, j) for j in range(10)))
            for s in got
        ]
        assert Status.REFUSED_FULL in statuses
        assert Status.CREATED in statuses
        assert {s for s in statuses} <= {Status.CREATED, Status.REFUSED_FULL, Status.UNAVAILABLE}
    assert sum(n.node.store.refusals["embryonic_copy"] for n in nodes) > 0
    async with aiohttp.ClientSession() as http:
        for n in nodes:
            async with http.get(f"http://{n.admin_address}/readyz") as r:
                assert r.status == 200, await r.text()
    assert KEY_SIZE == 40


async def test_the_embryonic_quota_holds_across_the_pop(make_pop: MakePop) -> None:
    """Each node enforced the whole quota on its own copies: a 4-node PoP with 3 replicas
    admitted ~4/3 of it from one client (150 of 100 in this run); each node's part is now
    its share of the key space (docs/protocol.md#capacity-and-quota)."""
    nodes = await make_pop(4, limits={"embryonic_quota_per_prefix": 100})
    one_client = [
        FlowKey(
            6, ipaddress.ip_address("10.1.1.1"), 1000 + i, ipaddress.ip_address("192.0.2.1"), 443
        )
        for i in range(1000)
    ]
    async with Client([n.grpc_address for n in nodes]) as c:
        created = 0
        for at in range(0, len(one_client), 50):  # one batch after another: no writes in flight
            got = await c.claim(one_client[at : at + 50], pop="ams")
            assert {r.status for r in got} <= {Status.CREATED, Status.REFUSED_QUOTA}
            created += sum(r.status == Status.CREATED for r in got)
        assert 90 <= created <= 110
        # Confirms of flows never claimed are held to the same quota.
        fresh = [
            FlowKey(
                6,
                ipaddress.ip_address("10.1.1.2"),
                1000 + i,
                ipaddress.ip_address("192.0.2.1"),
                443,
            )
            for i in range(1000)
        ]
        got = await c.confirm(fresh, pop="ams")
        assert {r.status for r in got} <= {Status.CREATED, Status.REFUSED_QUOTA}
        assert 90 <= sum(r.status == Status.CREATED for r in got) <= 110
    # Each node's shares of the key space: 3 replicas of 4 nodes, a quarter as primary.
    assert sum(n.node.store.quota.held for n in nodes) == pytest.approx(3.0)
    assert sum(n.node.store.quota.led for n in nodes) == pytest.approx(1.0)
