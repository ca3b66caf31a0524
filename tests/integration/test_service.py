"""The service around the table: health, reflection, admin endpoint, metrics, mutual
TLS, capacity and quota."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.client import Client
from dht.core.errors import Unavailable
from dht.core.identity import Role
from dht.core.placement import PartitionMap
from dht.core.record import Status
from dht.core.wire import FlowKey, parse_flow
from dht.edge.server import NodeServer

from .conftest import MakePop, pop_configs, tls_of

REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


async def test_health_and_reflection(make_pop: MakePop) -> None:
    (srv,) = await make_pop(1)
    async with grpc.aio.insecure_channel(srv.grpc_address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="dht.v1.FlowTable"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = refl.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {s.name for s in answer.list_services_response.service}
        assert {"dht.v1.FlowTable", "grpc.health.v1.Health"} <= names


async def list_services(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as ch:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
    return {s.name for s in answer.list_services_response.service}


async def test_the_public_port_serves_only_the_public_plane(make_pop: MakePop) -> None:
    """docs/security.md#planes: NodeInternal and PopLink are not on the public port (not
    even listed by its reflection); the peer port serves them, and FlowTable for forwards."""
    srv, _ = await make_pop(2)
    assert srv.grpc_address != srv.peer_address
    public = {"dht.v1.FlowTable", "grpc.health.v1.Health", REFLECTION}
    assert await list_services(srv.grpc_address) == public
    assert await list_services(srv.peer_address) == public | {
        "dht.v1.NodeInternal",
        "dht.v1.PopLink",
    }
    other = srv.node.membership.members["ams-2"]
    known = {m.node_id: m.incarnation for m in srv.node.membership.view()}
    calls: list[tuple[Any, str, Any]] = [
        (
            pb_grpc.NodeInternalStub,
            "Ping",
            pb.PingRequest(
                from_node="ams-2",
                members=[
                    pb.MemberState(
                        node_id="ams-2",
                        address=other.address,
                        incarnation=other.incarnation + 1,
                        status=pb.MEMBER_STATUS_LEFT,
                    )
                ],
            ),
        ),
        (pb_grpc.NodeInternalStub, "PartitionDigests", pb.DigestRequest()),
        (
            pb_grpc.PopLinkStub,
            "PopDigests",
            pb.PopDigestRequest(from_pop=2, num_partitions=4096),
        ),
    ]
    async with grpc.aio.insecure_channel(srv.grpc_address) as ch:
        for stub, method, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub(ch), method)(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, (method, err.value)
    # The "LEFT" rumour never arrived: ams-2 is still an active member.
    assert {m.node_id: m.incarnation for m in srv.node.membership.view()} == known
    assert [m.node_id for m in srv.node.membership.active()] == ["ams-1", "ams-2"]
    # The same services on the peer port are served (the rumour left out: it would be
    # adopted; PopDigests from a PoP with no link here is refused, but by the servicer).
    async with grpc.aio.insecure_channel(srv.peer_address) as ch:
        digests = await pb_grpc.NodeInternalStub(ch).PartitionDigests(pb.DigestRequest())
        assert digests.epoch == srv.node.table.epoch
        try:
            await pb_grpc.PopLinkStub(ch).PopDigests(calls[2][2], timeout=5)
        except grpc.aio.AioRpcError as e:
            assert e.code() != grpc.StatusCode.UNIMPLEMENTED, e


async def test_admin_endpoint(make_pop: MakePop, tmp_path: Path) -> None:
    nodes = await make_pop(3, admin_token="s3cret")
    client = Client([nodes[0].grpc_address])
    await client.refresh_table()
    flow = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443")
    await client.claim([flow], pop="fra")
    await client.claim([parse_flow("tcp/198.51.100.9:1/192.0.2.1:443")] * 1, pop="ams")
    await client.close()
    base = f"http://{nodes[1].admin_address}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/livez") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["ready"] is True
        async with http.get(f"{base}/partitions") as r:
            table = await r.json()
            assert len(table["members"]) == 3
            assert sum(m["primary_partitions"] for m in table["members"]) == 4096
        async with http.get(f"{base}/flow", params={"flow": str(flow)}) as r:
            body = await r.json()
            assert (body["status"], body["owner_pop"], body["state"]) == ("ok", "fra", "embryonic")
        async with http.get(f"{base}/flow", params={"flow": "tcp/1.2.3.4:0/1.2.3.4:1"}) as r:
            assert r.status == 400
            assert "flow.client.port" in (await r.json())["error"]
        async with http.delete(f"{base}/flow", params={"flow": str(flow), "pop": "fra"}) as r:
            assert r.status == 403
        headers = {"Authorization": "Bearer s3cret"}
        async with http.delete(
            f"{base}/flow", params={"flow": str(flow), "pop": "fra"}, headers=headers
        ) as r:
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
        async with http.get(f"{base}/flow", params={"flow": str(flow)}) as r:
            assert (await r.json())["status"] == "not_found"
        metrics = ""
        for n in nodes:
            async with http.get(f"http://{n.admin_address}/metrics") as r:
                metrics += await r.text()
    for name in (
        'dht_requests_total{code="OK",method="Claim"}',
        "dht_request_seconds_bucket",
        'dht_records{family="ipv4",state="released"} 1.0',
        'dht_keys_total{method="Claim",status="created"}',
        "dht_expirations_total",
        "dht_refusals_total",
        "dht_ready 1.0",
    ):
        assert name in metrics, name


async def test_readyz_fails_when_stopping(make_pop: MakePop) -> None:
    (srv,) = await make_pop(1)
    srv.node.accepting = False
    async with aiohttp.ClientSession() as http, http.get(f"http://{srv.admin_address}/readyz") as r:
        assert r.status == 503
        assert "not accepting" in (await r.json())["reasons"][0]


async def test_capacity_and_quota_refuse_only_new_claims(make_pop: MakePop) -> None:
    (srv,) = await make_pop(
        1, limits={"max_records": 20, "hard_max_records": 30, "embryonic_quota_per_prefix": 5}
    )
    async with Client([srv.grpc_address]) as c:
        one_client = [
            FlowKey(
                6,
                ipaddress.ip_address("198.51.100.1"),
                1000 + i,
                ipaddress.ip_address("192.0.2.1"),
                443,
            )
            for i in range(8)
        ]
        res = await c.claim(one_client, pop="ams")
        assert [r.status for r in res] == [Status.CREATED] * 5 + [Status.REFUSED_QUOTA] * 3
        await c.confirm(one_client[:5], pop="ams")  # established: no longer counts to the quota
        res = await c.claim(one_client[5:], pop="ams")
        assert {r.status for r in res} == {Status.CREATED}
        many = [
            FlowKey(
                6,
                ipaddress.ip_address(f"198.51.100.{i}"),
                1000,
                ipaddress.ip_address("192.0.2.1"),
                443,
            )
            for i in range(2, 30)
        ]
        res = await c.claim(many, pop="ams")
        statuses = [r.status for r in res]
        assert statuses.count(Status.CREATED) == 20 - 8
        assert set(statuses[12:]) == {Status.REFUSED_FULL}
        # Existing records keep working when full: the owner's claim and refresh, confirm.
        assert {r.status for r in await c.claim(one_client, pop="ams")} == {Status.ALREADY_OWNED}
        assert {r.status for r in await c.refresh(one_client, pop="ams")} == {Status.OK}
        assert {r.status for r in await c.confirm(many[:12], pop="ams")} == {Status.OK}
        assert {r.status for r in await c.lookup(one_client + many[:12])} == {Status.OK}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{srv.admin_address}/metrics") as r,
    ):
        text = await r.text()
    assert 'dht_refusals_total{reason="quota"} 3.0' in text
    assert 'dht_refusals_total{reason="full"} 16.0' in text


async def test_mutual_tls(make_pop: MakePop, tmp_path: Path) -> None:
    # Each node its own certificate (a node checks at start that its certificate names it).
    nodes = await make_pop(3, certs=tmp_path)
    tls = tls_of(tmp_path, Role.FORWARDER, "ams")
    keys = [parse_flow(f"tcp/198.51.100.{i}:1000/192.0.2.1:443") for i in range(1, 100)]
    async with Client([nodes[0].grpc_address], tls=tls) as c:
        assert {r.status for r in await c.claim(keys, pop="ams")} == {Status.CREATED}
        # Forwarding between nodes runs over mutual TLS too: send everything to node 0.
        t = c.table
        c.set_table(PartitionMap(t.epoch, t.members, t.num_partitions, t.replicas * 0))
        assert {r.status for r in await c.lookup(keys)} == {Status.OK}
    assert nodes[0].node.metrics.forwarded._value.get() > 0
    assert nodes[0].node.metrics.forward_errors._value.get() == 0
    # A client that verifies the server but presents no certificate is refused.
    creds = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(nodes[0].grpc_address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.FlowTableStub(ch).GetPartitionTable(pb.PartitionTableRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plaintext is refused too.
    with pytest.raises(Unavailable):
        async with Client([nodes[0].grpc_address], timeout_s=5):
            pass


async def test_the_client_dials_a_restarted_node_at_once() -> None:
    """A node stops and starts again on the same ports. The client's call while it was
    down failed; its next call, right after the restart, reaches the node. (gRPC keeps
    a channel whose connection failed in reconnect backoff for up to 2 s and fails every
    call meanwhile without dialing: the client took a node that was back for a down one,
    and during a rolling restart a claim could find every replica 'unavailable'.)"""
    (cfg,) = pop_configs(1)
    flow = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443")
    srv = NodeServer(cfg)
    await srv.start()
    try:
        async with Client([srv.grpc_address], timeout_s=2) as client:
            (r,) = await client.claim([flow], pop="ams")
            assert r.status == Status.CREATED
            await srv.stop(leave=False)
            with pytest.raises(Unavailable):
                await client.refresh_table()
            srv = NodeServer(cfg)
            await srv.start()
            table = await client.refresh_table()
            assert [m.address for m in table.members] == [srv.grpc_address]
            (r,) = await client.lookup([flow])
            assert r.status == Status.NOT_FOUND  # a fresh process: nothing persisted
    finally:
        await srv.stop(leave=False)
