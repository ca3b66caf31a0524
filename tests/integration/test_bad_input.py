"""Bad input: a clear error naming the field, nothing applied, the node keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
