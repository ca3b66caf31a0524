"""The UDP lookup listener (dht.edge.udp): same answers as gRPC Lookup, from any node,
and bad datagrams rejected with an error naming the field, the node serving on."""

from __future__ import annotations

import asyncio
import struct

import grpc
import numpy as np
import pytest

from dht.client import Client, Forwarder
from dht.client.decision import Action, Packet
from dht.client.forwarder import ForwarderConfig
from dht.core.config import build_config
from dht.core.errors import ConfigError, InvalidArgument
from dht.core.wire import KEY_SIZE, RESULT_DTYPE, RESULT_SIZE, parse_flow
from dht.edge.server import NodeServer
from dht.edge.udp import HEADER, MAX_KEYS, OP_LOOKUP, VERSION, UdpLookupClient
from dht.tools.bench import synthetic_keys

from .conftest import POP_IDS, MakePop, MakePops

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.got.put_nowait(data)


async def _raw_socket(port: int) -> tuple[asyncio.DatagramTransport, _Datagrams]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Datagrams, remote_addr=("127.0.0.1", port)
    )
    return transport, proto


def _request(keys: bytes, rid: int = 7, count: int | None = None) -> bytes:
    n = len(keys) // KEY_SIZE if count is None else count
    return HEADER.pack(VERSION, OP_LOOKUP, n, rid) + keys


def _udp_port(srv: NodeServer) -> int:
    return srv.udp_lookup_port


async def test_answers_match_grpc_lookup_from_any_node(make_pop: MakePop, make_client) -> None:
    servers = await make_pop(3, udp_lookup_port=0)
    assert all(_udp_port(s) == s.node.grpc_port for s in servers)
    client = await make_client([servers[0].grpc_address])
    stored = synthetic_keys(300, 1)
    v6 = parse_flow("udp/[2001:db8::7]:51000/[2001:db8::1]:443").to_bytes()
    await client.flow_packed("Claim", stored, pop="ams")
    await client.flow_packed("Confirm", stored[: 100 * KEY_SIZE], pop="fra")
    await client.flow_packed("Claim", v6, pop="ams")
    await client.flow_packed("Release", stored[200 * KEY_SIZE :], pop="ams")
    missing = synthetic_keys(100, 2, start=10_000)
    keys = stored + v6 + missing
    want = await client.flow_packed("Lookup", keys)
    assert set(np.unique(want["status"]).tolist()) == {1, 5}  # OK and NOT_FOUND

    with UdpLookupClient(client.table) as udp:
        got = await asyncio.to_thread(udp.lookup, keys)
        np.testing.assert_array_equal(got, want)
        one = await asyncio.to_thread(udp.lookup_one, stored[:KEY_SIZE])
        assert one == want[:1].tobytes()

    # Every key to one node, primary or not: the full path (forward) answers the same.
    for srv in servers:
        port = _udp_port(srv)
        with UdpLookupClient(client.table, port_of=_everything_to(client, port)) as udp:
            got = await asyncio.to_thread(udp.lookup, keys)
        np.testing.assert_array_equal(got, want)


def _everything_to(client, port: int) -> dict[str, tuple[str, int]]:
    return {m.address: ("127.0.0.1", port) for m in client.table.members}


@pytest.fixture
async def udp_node(make_pop: MakePop) -> NodeServer:
    (srv,) = await make_pop(1, udp_lookup_port=0)
    return srv


KEY = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443").to_bytes()


def _with(offset: int, value: bytes) -> bytes:
    return KEY[:offset] + value + KEY[offset + len(value) :]


@pytest.mark.parametrize(
    ("datagram", "field"),
    [
        (HEADER.pack(9, OP_LOOKUP, 1, 7) + KEY, "version"),
        (HEADER.pack(VERSION, 5, 1, 7) + KEY, "op"),
        (_request(b"", count=0) + KEY, "count"),  # count 0 with a key's worth of bytes
        (_request(KEY * (MAX_KEYS + 1)), "count"),
        (_request(KEY + b"\0" * 3, count=1), "keys"),
        (_request(KEY * 2, count=1), "keys"),
        (_request(_with(0, b"\x07")), "keys[0].kind"),
        (_request(KEY + _with(1, b"\x63")), "keys[1].protocol"),
        (_request(_with(18, b"\0\0")), "keys[0].client_port"),
        (_request(_with(36, b"\0\0")), "keys[0].service_port"),
        (_request(_with(20, b"\x20\x01" + b"\0" * 10)), "keys[0]"),
        (_request(_with(38, b"\0\1")), "keys[0].reserved"),
    ],
)
async def test_bad_datagrams_get_an_error_naming_the_field(
    udp_node: NodeServer, datagram: bytes, field: str
) -> None:
    transport, proto = await _raw_socket(_udp_port(udp_node))
    try:
        transport.sendto(datagram)
        answer = await asyncio.wait_for(proto.got.get(), 5)
        version, code, count, rid = HEADER.unpack_from(answer)
        assert (version, code, count, rid) == (VERSION, INVALID, 0, 7)
        text = answer[HEADER.size :].decode()
        assert text.startswith(f"{field}: "), text
        assert len(answer) <= len(datagram)  # never amplifies
        # The node serves on.
        transport.sendto(_request(KEY, rid=8))
        answer = await asyncio.wait_for(proto.got.get(), 5)
        assert HEADER.unpack_from(answer) == (VERSION, 0, 1, 8)
        assert len(answer) == HEADER.size + RESULT_SIZE
    finally:
        transport.close()


async def test_runt_datagrams_are_dropped_and_counted(udp_node: NodeServer) -> None:
    transport, proto = await _raw_socket(_udp_port(udp_node))
    try:
        transport.sendto(b"\x01\x01")
        transport.sendto(_request(KEY, rid=9))
        # The first answer is the valid request's: the runt got none.
        answer = await asyncio.wait_for(proto.got.get(), 5)
        assert struct.unpack_from(">I", answer, 4)[0] == 9
        res = np.frombuffer(answer[HEADER.size :], dtype=RESULT_DTYPE)
        assert int(res["status"][0]) == 5  # NOT_FOUND
        text = udp_node.node.metrics.registry.get_sample_value(
            "dht_requests_total", {"method": "UdpLookup", "code": "DROPPED"}
        )
        assert text == 1.0
    finally:
        transport.close()


async def test_client_raises_the_error_answer(udp_node: NodeServer, make_client) -> None:
    client = await make_client([udp_node.grpc_address])
    with (
        UdpLookupClient(client.table) as udp,
        pytest.raises(InvalidArgument, match=r"keys\[0\]\.client_port"),
    ):
        await asyncio.to_thread(udp.lookup_one, _with(18, b"\0\0"))


def test_config_refuses_udp_with_tls_and_bad_ports() -> None:
    base = {"node_id": "a", "pop": "ams"}
    assert build_config(base).udp_lookup_port == -1
    with pytest.raises(ConfigError, match="udp_lookup_port"):
        build_config({**base, "udp_lookup_port": 70000})
    with pytest.raises(ConfigError, match="TLS"):
        build_config(
            {
                **base,
                "udp_lookup_port": 0,
                "tls": {"cert_file": "c", "key_file": "k", "ca_file": "a"},
            }
        )


# --------------------------------------------------------------------------- the forwarder


async def test_a_forwarder_asks_its_misses_over_udp_with_the_second_chance(
    make_pops: MakePops,
) -> None:
    """With udp_lookups on, a miss is one datagram: a flow this PoP knows comes back from
    its table, one only fra knows (an embryonic claim, never shipped) from the second
    chance the node runs for op 2, exactly as over gRPC."""
    pops = await make_pops(pops=2, nodes=1, udp_lookup_port=0)
    ams, fra = pops["ams"][0], pops["fra"][0]
    here, there = synthetic_keys(2, seed=51)[:KEY_SIZE], synthetic_keys(2, seed=51)[KEY_SIZE:]
    async with Client([ams.grpc_address]) as a, Client([fra.grpc_address]) as f:
        await a.flow_packed("Claim", here, pop="ams")
        await a.flow_packed("Confirm", here, pop="ams")
        await f.flow_packed("Claim", there, pop="fra")
    fw = Forwarder(
        Client([ams.grpc_address]), "ams", ForwarderConfig(udp_lookups=True), owns_client=True
    )
    await fw.start()
    try:
        out = await fw.handle(here, Packet.DATA)
        assert out.action is Action.SERVE and not out.cached
        out = await fw.handle(there, Packet.DATA)
        assert (out.action, out.target) == (Action.TUNNEL, POP_IDS["fra"])
        assert out.answer is not None and out.answer.second_chance
        assert fw.stats.udp_lookups == 2 and fw.stats.udp_fallbacks == 0
        assert fw.stats.second_chance_found == 1
    finally:
        await fw.close()


async def test_a_forwarder_falls_back_to_grpc_when_udp_gets_no_answer(
    make_pop: MakePop,
) -> None:
    """No listener on the node (udp_lookup_port off): the datagram goes unanswered, and
    after udp_timeout_s the miss is asked over gRPC; the packet still gets its owner."""
    (srv,) = await make_pop(1)
    key = synthetic_keys(1, seed=52)
    async with Client([srv.grpc_address]) as c:
        await c.flow_packed("Claim", key, pop="ams")
        await c.flow_packed("Confirm", key, pop="ams")
    cfg = ForwarderConfig(udp_lookups=True, udp_timeout_s=0.05)
    fw = Forwarder(Client([srv.grpc_address]), "ams", cfg, owns_client=True)
    await fw.start()
    try:
        out = await fw.handle(key, Packet.DATA)
        assert out.action is Action.SERVE and out.answer is not None
        assert out.answer.owner == POP_IDS["ams"]
        assert fw.stats.udp_fallbacks == 1 and fw.stats.udp_lookups == 0
    finally:
        await fw.close()


def test_a_forwarder_refuses_a_udp_timeout_that_is_not_positive() -> None:
    with pytest.raises(InvalidArgument, match="udp_timeout_s"):
        Forwarder(
            Client(["127.0.0.1:1"]), "ams", ForwarderConfig(udp_lookups=True, udp_timeout_s=0)
        )
