"""Every connection survives: the owner is right at the moments that matter (a SYN-ACK
lost before a flap, a flap before the record was shipped, mid-handshake, flows held in the
data plane). Real nodes of two or three PoPs over real gRPC on loopback
(docs/protocol.md#merge-rule, docs/protocol.md#second-chance, docs/api.md#forwarder)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dht.client import Client
from dht.client.decision import Action, Packet
from dht.client.forwarder import Forwarder, ForwarderConfig
from dht.client.packet import parse_packet
from dht.core.record import State, Status
from dht.core.wire import parse_flow
from dht.edge.server import NodeServer
from dht.tools.bench import synthetic_keys

from .conftest import FakeTime, MakePops, until

POPS = {"ams": 1, "fra": 2, "lon": 3}


async def test_an_abandoned_half_open_claim_never_beats_the_connection_that_completed(
    make_pops: MakePops,
) -> None:
    """The SYN reached ams and was claimed; ams's SYN-ACK was lost; the route moved to fra,
    where the retransmitted SYN was claimed and the handshake completed. ams's earlier
    embryonic claim must give way to fra's established record, and a confirm at ams (its
    forwarder saw a later packet) must change nothing."""
    pops = await make_pops(nodes=1)
    key = key_no(41)
    async with (
        Client([pops["ams"][0].grpc_address], timeout_s=10) as ams,
        Client([pops["fra"][0].grpc_address], timeout_s=10) as fra,
    ):
        first = await ams.flow_packed("Claim", key, pop="ams")
        assert first["status"][0] == Status.CREATED
        second = await fra.flow_packed("Claim", key, pop="fra")
        assert second["status"][0] == Status.CREATED  # embryonic claims are not shipped
        assert int(second["birth_hlc"][0]) > int(first["birth_hlc"][0])
        done = await fra.flow_packed("Confirm", key, pop="fra")
        assert done["status"][0] == Status.OK

        async def ams_names_fra() -> bool:
            got = await ams.flow_packed("Lookup", key)
            return int(got["owner_pop"][0]) == POPS["fra"]

        await until(ams_names_fra, "fra's established record wins at ams")
        got = await ams.flow_packed("Lookup", key)
        assert got["state"][0] == State.ESTABLISHED
        confirm = await ams.flow_packed("Confirm", key, pop="ams")
        assert confirm["status"][0] == Status.OWNED_ELSEWHERE
        assert confirm["owner_pop"][0] == POPS["fra"]
        for c in (ams, fra):
            got = await c.flow_packed("Lookup", key)
            assert (int(got["owner_pop"][0]), got["state"][0]) == (POPS["fra"], State.ESTABLISHED)


# --------------------------------------------------------------------------- helpers


def key_no(i: int) -> bytes:
    """A flow key of its own per test number."""
    return synthetic_keys(1, seed=0, start=i)


def metric(server: NodeServer, name: str, labels: dict[str, str] | None = None) -> float:
    value = server.node.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def forwarder(
    servers: list[NodeServer], pop: str, config: ForwarderConfig | None = None, **kw: Any
) -> Forwarder:
    cfg = config or ForwarderConfig(background_refresh=False)
    fw = Forwarder(Client([s.grpc_address for s in servers], timeout_s=10), pop, cfg,
                   owns_client=True, **kw)  # fmt: skip
    await fw.start()
    return fw


@pytest.fixture
async def forwarders() -> AsyncIterator[Callable[..., Awaitable[Forwarder]]]:
    made: list[Forwarder] = []

    async def make(servers: list[NodeServer], pop: str, **kw: Any) -> Forwarder:
        fw = await forwarder(servers, pop, **kw)
        made.append(fw)
        return fw

    yield make
    for fw in made:
        await fw.close()


Forwarders = Callable[..., Awaitable[Forwarder]]


# --------------------------------------------------------------------------- second chance


async def test_a_flap_mid_handshake_or_before_shipping_is_saved_by_the_second_chance(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    """The SYN was claimed at ams; the client's ACK lands on fra, which has never heard of
    the flow (embryonic claims are not shipped, established ones only after
    replicate_after_s): fra asks the other PoPs and tunnels the packet to ams."""
    pops = await make_pops(nodes=1, replicate_after_s=600)
    ams = await forwarders(pops["ams"], "ams")
    fra = await forwarders(pops["fra"], "fra")
    handshaking, confirmed, unknown = (key_no(s) for s in (42, 43, 44))
    for k in (handshaking, confirmed):
        assert (await ams.handle(k, Packet.SYN)).action is Action.SERVE
    await ams.established(confirmed)

    for k, state in ((handshaking, State.EMBRYONIC), (confirmed, State.ESTABLISHED)):
        out = await fra.handle(k, Packet.DATA)
        assert (out.action, out.target) == (Action.TUNNEL, POPS["ams"]), out
        assert out.answer is not None and out.answer.second_chance
        assert out.answer.state == state
    # Cached like any answer: the next packet costs no call.
    sent = fra.stats.lookups_sent
    assert (await fra.handle(handshaking, Packet.DATA)).target == POPS["ams"]
    assert fra.stats.lookups_sent == sent
    assert fra.stats.second_chance_found == 2
    # No PoP knows this one: served as unknown (no affinity either).
    out = await fra.handle(unknown, Packet.DATA)
    assert out.action is Action.SERVE_UNKNOWN
    node = pops["fra"][0]
    assert metric(node, "dht_second_chance_keys_total", {"result": "found"}) == 2
    assert metric(node, "dht_second_chance_keys_total", {"result": "not_found"}) == 1
    assert metric(node, "dht_second_chance_seconds_count") == 3
    # The tunnelled packets are served at ams, where the connection lives.
    assert (await ams.handle(handshaking, Packet.DATA, tunnelled=True)).action is Action.SERVE


async def test_a_retransmitted_syn_that_completed_elsewhere_wins_over_the_abandoned_claim(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    """ams claimed the SYN; its SYN-ACK was lost; the retransmitted SYN landed on fra,
    which claimed it too (embryonic claims are not shipped) and completed the handshake.
    When the route comes back to ams before fra's record was shipped, ams must not serve
    the flow from its own abandoned claim (its cache, then its table, said "ams": a
    reset in the lab). Its look-up asks the other PoPs, and fra's completed copy wins."""
    pops = await make_pops(nodes=1, replicate_after_s=600)
    t = [1_000.0]
    ams = await forwarders(pops["ams"], "ams", clock=lambda: t[0])
    fra = await forwarders(pops["fra"], "fra")
    key = key_no(60)
    assert (await ams.handle(key, Packet.SYN)).action is Action.SERVE
    # The retransmitted SYN at fra: fra's handshake is under way, its own claim stands.
    assert (await fra.handle(key, Packet.SYN)).action is Action.SERVE
    fra.invalidate(key)
    out = await fra.handle(key, Packet.DATA)
    assert (out.action, out.reason) == (Action.SERVE, "owner")
    await fra.established(key)
    # Back at ams after TCP's first retransmission timeout: the embryonic entry is gone
    # from the cache (it was good for owner_ttl_s: 5 s), and the table asks fra.
    t[0] += 1.5
    out = await ams.handle(key, Packet.DATA)
    assert (out.action, out.target) == (Action.TUNNEL, POPS["fra"]), out
    assert out.answer is not None and out.answer.second_chance
    assert out.answer.state == State.ESTABLISHED


async def test_a_down_or_silent_pop_never_holds_a_packet_past_the_deadline(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    """lon's node accepts connections and never answers (a stalled peer): ams still gets
    fra's answer, within its deadline, and counts lon's miss as a deadline."""
    hung: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hung.append(w)  # read nothing, answer nothing

    blackhole = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        pops = await make_pops(pops=3, nodes=1, second_chance_timeout_s=0.3)
        port = blackhole.sockets[0].getsockname()[1]
        pops["ams"][0].pops.links["lon"].addresses = [f"127.0.0.1:{port}"]
        key = key_no(45)
        fra = await forwarders(pops["fra"], "fra")
        assert (await fra.handle(key, Packet.SYN)).action is Action.SERVE
        ams = await forwarders(pops["ams"], "ams")
        out = await ams.handle(key, Packet.DATA)
        assert (out.action, out.target) == (Action.TUNNEL, POPS["fra"])
        labels = {"peer_pop": "lon", "reason": "deadline"}
        assert metric(pops["ams"][0], "dht_second_chance_peer_failures_total", labels) == 1
        # A PoP that is down (connection refused) is a miss too, not an error.
        for srv in pops["lon"]:
            await srv.stop(leave=False)
        pops["ams"][0].pops.links["lon"].addresses = [pops["lon"][0].peer_address]
        other = key_no(46)
        assert (await fra.handle(other, Packet.SYN)).action is Action.SERVE
        out = await ams.handle(other, Packet.DATA)
        assert (out.action, out.target) == (Action.TUNNEL, POPS["fra"])
    finally:
        for w in hung:
            w.close()
        blackhole.close()


# --------------------------------------------------------------------------- keep-alive


async def test_flows_held_in_the_data_plane_are_kept_alive(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    """A pinned flow sends no packet through handle(): with alive() its record outlives
    many TTLs, without it the record lapses. Time is moved by hand on nodes and
    forwarder alike."""
    now = FakeTime()
    pops = await make_pops(pops=1, nodes=1, wall_ms={"ams": now})
    cfg = ForwarderConfig(background_refresh=False, confirm_ttl_s=10, refresh_ahead_s=5)
    fw = await forwarders(pops["ams"], "ams", config=cfg, clock=lambda: now.ms / 1000,
                          wall_ms=now)  # fmt: skip
    pinned, forgotten = key_no(47), key_no(48)
    for k in (pinned, forgotten):
        await fw.handle(k, Packet.SYN)
        assert (await fw.established(k)).state == State.ESTABLISHED
    for _ in range(12):  # 30 s: three TTLs, a call every 2.5 s (docs/api.md#keep-alive)
        now.advance(2.5)
        (answer,) = await fw.alive([pinned])
        assert (answer.owner, answer.state) == (POPS["ams"], State.ESTABLISHED)
    assert fw.stats.kept_alive == 12
    assert 3 <= fw.stats.refreshes <= 12
    got = await fw.client.flow_packed("Lookup", pinned + forgotten)
    assert got["status"].tolist() == [Status.OK, Status.NOT_FOUND]


# --------------------------------------------------------------------------- the SYN and FIN paths


async def test_the_syn_path_is_one_call_and_a_fin_does_not_wait_for_its_release(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    pops = await make_pops(pops=1, nodes=1)
    fw = await forwarders(pops["ams"], "ams")
    keys = [key_no(50 + i) for i in range(3)]
    for k in keys:
        out = await fw.handle(k, Packet.SYN)
        assert (out.action, out.reason) == (Action.SERVE, "new-flow")
    assert (fw.stats.claim_batches, fw.stats.lookups_sent) == (3, 0)
    node = pops["ams"][0]
    assert metric(node, "dht_requests_total", {"method": "Lookup", "code": "OK"}) == 0
    assert metric(node, "dht_requests_total", {"method": "Claim", "code": "OK"}) == 3
    # The PoP's node goes away: the FIN is still decided at once (the owner is cached)
    # and its release fails in the background, counted.
    await node.stop(leave=False)
    out = await fw.handle(keys[0], Packet.FIN)
    assert out.action is Action.SERVE
    assert fw.releases_in_flight == 1
    await fw.flush()
    assert (fw.releases_in_flight, fw.stats.release_failures) == (0, 1)


# --------------------------------------------------------------------------- local sockets


async def test_a_packet_of_a_local_socket_is_served_here_whatever_the_table_says(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    pops = await make_pops(nodes=1)
    fra = await forwarders(pops["fra"], "fra")
    ams = await forwarders(pops["ams"], "ams")
    key = key_no(55)
    await fra.handle(key, Packet.SYN)
    await fra.established(key)
    assert (await ams.handle(key, Packet.DATA)).target == POPS["fra"]  # the table: fra
    sent = ams.stats.lookups_sent
    out = await ams.handle(key, Packet.DATA, local=True)
    assert (out.action, out.reason) == (Action.SERVE, "local-socket")
    assert ams.stats.lookups_sent == sent and ams.stats.local == 1


# --------------------------------------------------------------------------- packet to key


async def test_a_raw_packet_becomes_the_key_the_table_knows(
    make_pops: MakePops, forwarders: Forwarders
) -> None:
    pops = await make_pops(pops=1, nodes=1)
    fw = await forwarders(pops["ams"], "ams")
    client, service = ipaddress.IPv4Address("198.18.7.9"), ipaddress.IPv4Address("192.0.2.1")
    syn = _ipv4_tcp(client, service, 40_001, 443, flags=0x02)
    ack = _ipv4_tcp(client, service, 40_001, 443, flags=0x10)
    key, kind = parse_packet(syn)
    assert kind is Packet.SYN
    assert (await fw.handle(key, kind)).action is Action.SERVE
    assert parse_packet(ack) == (key, Packet.DATA)
    (r,) = await fw.client.lookup([parse_flow("tcp/198.18.7.9:40001/192.0.2.1:443")])
    assert (r.status, r.owner_pop, r.state) == (Status.OK, POPS["ams"], State.EMBRYONIC)
    fw.invalidate(key)
    assert (await fw.handle(key, Packet.DATA)).action is Action.SERVE
    assert (fw.stats.lookups_sent, fw.stats.lookup_batches, fw.stats.misses) == (1, 1, 1)


def _ipv4_tcp(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int, flags: int
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 65535, 0, 0)
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src.packed, dst.packed
    )
    return head + tcp
