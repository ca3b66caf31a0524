"""Bad input: a clear error naming the field, nothing applied, the node keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.wire import decode_results, parse_flow
from dht.edge.server import NodeServer

from .conftest import MakePop

GOOD = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443").to_bytes()


def patched(offset: int, value: bytes) -> bytes:
    raw = bytearray(GOOD)
    raw[offset : offset + len(value)] = value
    return bytes(raw)


@pytest.fixture
async def node(make_pop: MakePop) -> AsyncIterator[NodeServer]:
    (srv,) = await make_pop(1, max_batch_keys=100)
    yield srv


CASES = [
    # (request fields, method, expected code, text that must appear in the message)
    (
        {"keys": GOOD + patched(2, b"\x20\x01" + b"\0" * 8)},
        "Claim",
        "INVALID_ARGUMENT",
        "keys[1]: mixed address families",
    ),
    ({"keys": patched(18, b"\0\0")}, "Claim", "INVALID_ARGUMENT", "keys[0].client_port: port 0"),
    ({"keys": patched(36, b"\0\0")}, "Lookup", "INVALID_ARGUMENT", "keys[0].service_port: port 0"),
    (
        {"keys": patched(1, b"\x84")},
        "Claim",
        "INVALID_ARGUMENT",
        "keys[0].protocol: unknown protocol 132",
    ),
    (
        {"keys": patched(0, b"\x07")},
        "Lookup",
        "INVALID_ARGUMENT",
        "keys[0].kind: unknown or unexpected key kind 7",
    ),
    (
        {"keys": GOOD + GOOD[:13]},
        "Lookup",
        "INVALID_ARGUMENT",
        "keys: length 53 is not a multiple of the 40-byte",
    ),
    (
        {"keys": GOOD * 101},
        "Lookup",
        "RESOURCE_EXHAUSTED",
        "keys: batch of 101 records exceeds the limit of 100",
    ),
    ({"keys": GOOD, "pop": 99}, "Claim", "INVALID_ARGUMENT", "pop: unknown PoP id 99"),
    (
        {"keys": GOOD, "ttl_s": 10**6},
        "Claim",
        "INVALID_ARGUMENT",
        "ttl_s: 1000000 outside the allowed",
    ),
    (
        {"keys": GOOD, "format_version": 2},
        "Lookup",
        "INVALID_ARGUMENT",
        "format_version: 2 is not supported",
    ),
    ({"keys": GOOD, "server": 70000}, "Claim", "INVALID_ARGUMENT", "server: 70000 outside"),
    ({"keys": patched(38, b"\0\1")}, "Claim", "INVALID_ARGUMENT", "keys[0].reserved: must be zero"),
]


@pytest.mark.parametrize(
    ("fields", "method", "code", "text"), CASES, ids=[c[3].split(":")[0] for c in CASES]
)
async def test_bad_flow_batches(
    node: NodeServer, fields: dict, method: str, code: str, text: str
) -> None:  # type: ignore[type-arg]
    req = pb.FlowBatchRequest(format_version=fields.pop("format_version", 1), **fields)
    async with grpc.aio.insecure_channel(node.grpc_address) as ch:
        stub = pb_grpc.FlowTableStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, method)(req)
        assert err.value.code().name == code
        assert text in (err.value.details() or "")
        # Nothing was applied, and the node keeps serving.
        assert len(node.node.store) == 0
        ok = await stub.Claim(pb.FlowBatchRequest(format_version=1, keys=GOOD))
        assert decode_results(ok.results)[0].status.name == "CREATED"


async def test_bad_affinity_calls(node: NodeServer) -> None:
    async with grpc.aio.insecure_channel(node.grpc_address) as ch:
        stub = pb_grpc.FlowTableStub(ch)
        for req, text in [
            (pb.AffinityRequest(format_version=1, clients=b"\0" * 17), "clients: length 17"),
            (pb.AffinityRequest(format_version=1, clients=b"\0" * 16), "pop: SetAffinity needs"),
            (
                pb.AffinityRequest(format_version=1, clients=b"\0" * 16, pop=42),
                "pop: unknown PoP id 42",
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SetAffinity(req)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in (err.value.details() or "")
        ok = await stub.GetAffinity(pb.AffinityRequest(format_version=1, clients=b"\0" * 16))
        assert len(ok.results) == 32


async def test_empty_batch_is_fine(node: NodeServer) -> None:
    async with grpc.aio.insecure_channel(node.grpc_address) as ch:
        resp = await pb_grpc.FlowTableStub(ch).Lookup(pb.FlowBatchRequest(format_version=1))
    assert resp.results == b""
    assert resp.epoch == node.node.table.epoch


# Bytes that do not parse as any message: field 1, length-delimited, 5 bytes promised, 2 sent.
TRUNCATED = b"\x0a\x05ab"


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/dht.v1.FlowTable/Claim", "unary_unary"),
        ("/dht.v1.FlowTable/GetPartitionTable", "unary_unary"),
        ("/dht.v1.NodeInternal/Replicate", "unary_unary"),
        ("/dht.v1.NodeInternal/FetchPartitions", "unary_stream"),
        ("/dht.v1.PopLink/PopPush", "unary_unary"),
        ("/dht.v1.PopLink/PopFetch", "unary_stream"),
        ("/dht.v1.PopLink/Ship", "stream_stream"),
    ],
)
async def test_undecodable_request_is_invalid_argument(
    node: NodeServer, method: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: bytes that are not the method's message answered UNKNOWN with a traceback
    in the log. Now: INVALID_ARGUMENT naming the message, nothing logged as an error.
    NodeInternal and PopLink are served on the peer plane only (docs/security.md#planes)."""
    public = method.startswith("/dht.v1.FlowTable/")
    address = node.grpc_address if public else node.peer_address
    async with grpc.aio.insecure_channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if kind == "unary_unary":
                await ch.unary_unary(method)(TRUNCATED)
            elif kind == "unary_stream":
                async for _ in ch.unary_stream(method)(TRUNCATED):
                    pass
            else:
                call = ch.stream_stream(method)(iter([TRUNCATED]))
                async for _ in call:
                    pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "is not a valid" in (err.value.details() or "")
        ok = await pb_grpc.FlowTableStub(ch).Claim(pb.FlowBatchRequest(format_version=1, keys=GOOD))
        assert decode_results(ok.results)[0].status.name == "CREATED"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert node.node.live()


@pytest.mark.parametrize("op", ["Lookup", "GetAffinity"])
async def test_lookup_ignores_an_unknown_pop(node: NodeServer, op: str) -> None:
    """Issue 13: the .proto says Lookup (and GetAffinity) ignore pop; an unknown id was
    refused. Claim still refuses it (test_bad_flow_batches)."""
    async with grpc.aio.insecure_channel(node.grpc_address) as ch:
        stub = pb_grpc.FlowTableStub(ch)
        if op == "Lookup":
            resp = await stub.Lookup(pb.FlowBatchRequest(format_version=1, keys=GOOD, pop=99))
            assert decode_results(resp.results)[0].status.name == "NOT_FOUND"
        else:
            aresp = await stub.GetAffinity(
                pb.AffinityRequest(format_version=1, clients=b"\0" * 16, pop=42)
            )
            assert len(aresp.results) == 32


@pytest.mark.parametrize(
    "value",
    ["9" * 30, "7" * 5000, "-1", "65536", "1e3", "0x10", "", "1,,2", "٣"],
)
async def test_digests_with_bad_partitions_is_400(node: NodeServer, value: str) -> None:
    """Issue 13: /digests?partitions=<huge> answered 500. Now 400 naming the parameter."""
    async with aiohttp.ClientSession() as http:
        url = f"http://{node.admin_address}/digests"
        async with http.get(url, params={"partitions": value}) as r:
            body = await r.json()
        if value == "":
            assert r.status == 200  # empty = all partitions, as before
            return
        assert r.status == 400, body
        assert body["error"].startswith("partitions:")
        async with http.get(url, params={"partitions": "0,1"}) as r:
            assert r.status == 200
