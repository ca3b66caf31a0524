"""The simulator on small scripted scenarios against three in-process PoPs (docs/simulator.md):
connections break under plain anycast and not with the table; a flap before the record is
shipped, during a handshake, or between a lost SYN-ACK and the SYN sent again is saved (by
the second chance, or by the merge rule once the record is shipped) and breaks when the
second chance is off; pinned flows live on with ``alive()`` and lapse without it; UDP
flows across a flap are saved."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dht.edge.server import NodeServer
from dht.tools.simulate import Endpoint, SimSettings, Simulation, format_report
from dht.tools.traffic import FlowSpec, Traffic

from .conftest import MakePops

SCALE = 10.0  # 30 simulated seconds in 3 real ones
MOVED = 3


def scenario(clients: range) -> Traffic:
    """Six clients (two per PoP), one long connection each from 0.5 s to 25 s with a
    packet every second; at 12 s the first three clients' routes move to the next PoP
    (about 1.1 real seconds after the connections were confirmed)."""
    homes = [i % 3 for i in range(clients.stop)]
    flows = [(c, 0.5, 25.0, [1.0 + i for i in range(24)]) for c in clients]
    flaps = [(12.0, c, (homes[c] + 1) % 3) for c in list(clients)[:MOVED]]
    return Traffic.build(3, homes, flows, flaps, duration_s=30.0)


def endpoints(pops: dict[str, list[NodeServer]]) -> list[Endpoint]:
    return [Endpoint(pop, s.grpc_address, s.admin_address) for pop, ss in pops.items() for s in ss]


async def simulate(pops: dict[str, list[NodeServer]], tr: Traffic, **kw: Any) -> dict[str, Any]:
    settings = replace(SimSettings(duration_s=3.0, time_scale=SCALE), **kw)
    report = await Simulation(settings, endpoints(pops), tr).run(progress=False)
    print(format_report(report))
    return report


def moved_next(clients: range, t: float, homes: list[int]) -> list[tuple[float, int, int]]:
    return [(t, c, (homes[c] + 1) % 3) for c in clients]


async def test_flaps_break_plain_anycast_but_not_the_table(make_pops: MakePops) -> None:
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)
    r = await simulate(pops, scenario(range(6)))
    assert r["connections"] == 6
    assert r["broken_without_table"] == MOVED
    assert r["broken_with_table"] == 0
    # Every packet of a moved client after the flap (14 each, with the FIN) was
    # tunnelled home because the landing PoP had the record.
    assert r["tunnelled_packets"] == MOVED * 14
    assert r["foreign_packets"] == {"record": MOVED * 14}
    assert r["flap_before_ship"] == {}
    # The rest landed home, on the PoP holding the socket: no table call.
    assert r["home_packets"] == {"local": 6 * 26 - MOVED * 14}
    assert r["shipped_records"]["established"] >= 6 * 2  # every flow, to both other PoPs
    assert r["lookups_sent"] > 0
    assert 0 < r["cache_hit_rate"] < 1


async def test_a_flap_before_the_record_is_shipped_is_saved_by_the_second_chance(
    make_pops: MakePops,
) -> None:
    # Records are shipped only once 60 real seconds old: never during the run. Affinity
    # records ship at once.
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=60)
    r = await simulate(pops, scenario(range(6)), replicate_after_s=600)
    assert r["broken_without_table"] == MOVED
    assert r["broken_with_table"] == 0
    assert r["shipped_records"]["established"] == 0
    # The landing PoP did not know the flow; the home PoP answered its second chance.
    assert r["foreign_packets"] == {"second-chance": MOVED * 14}
    assert r["flap_before_ship"] == {"saved-by-second-chance": MOVED * 14}
    assert r["second_chance"]["found"] >= MOVED

    # No second chance: the client's affinity (its preferred PoP is its connection's)
    # saves them.
    r = await simulate(pops, scenario(range(6, 12)), replicate_after_s=600, second_chance=False)
    assert r["broken_with_table"] == 0
    assert r["foreign_packets"] == {"affinity": MOVED * 14}
    assert r["flap_before_ship"] == {"saved-by-affinity": MOVED * 14}
    assert r["second_chance"]["found"] == 0

    # Neither: the first packet after the flap breaks each moved connection, explained.
    r = await simulate(
        pops, scenario(range(12, 18)), replicate_after_s=600, second_chance=False,
        use_affinity=False,
    )  # fmt: skip
    assert r["broken_without_table"] == MOVED
    assert r["broken_with_table"] == MOVED
    assert r["broken_reasons"] == {"no-owner-known": MOVED}
    assert r["flap_before_ship"] == {"no-owner-known": MOVED}
    assert {b["t_s"] for b in r["broken"]} == {12.0}
    assert {(b["step"], b["detail"]) for b in r["broken"]} == {("data", "unknown")}
    text = format_report(r)  # every breakage, with its reason
    for b in r["broken"]:
        assert (
            f"flow {b['flow']} at 12.000 s: tcp data landed {b['landed']}, home {b['home']}: "
            "no-owner-known (unknown)"
        ) in text


async def test_a_flap_during_the_handshake_is_saved_by_the_second_chance(
    make_pops: MakePops,
) -> None:
    """The SYN is claimed at its PoP, the route moves, the handshake's ACK lands on the
    next PoP: only the SYN's PoP knows the flow (an embryonic claim, never shipped)."""
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)

    def cut(clients: range) -> Traffic:
        homes = [i % 3 for i in range(clients.stop)]
        flows = [(c, 1.0, 20.0, [2.0 + i for i in range(18)]) for c in clients]
        # The SYN at 1.0 s, the flap at 1.05 s, the ACK at 1.1 s.
        return Traffic.build(3, homes, flows, moved_next(clients, 1.05, homes), duration_s=25.0)

    r = await simulate(pops, cut(range(3)))
    assert r["broken_without_table"] == 3  # plain anycast: the ACK reaches a stranger
    assert r["broken_with_table"] == 0
    assert r["handshakes"] == {"route-changed": 3, "saved": 3}
    assert r["foreign_packets"]["second-chance"] >= 3  # the ACKs, at least
    assert r["confirms"] == {"ok": 3}  # each at the SYN's PoP, after its ACK got there

    r = await simulate(pops, cut(range(3, 6)), second_chance=False)
    assert r["broken_with_table"] == 3
    assert r["broken_reasons"] == {"handshake-elsewhere": 3}
    assert r["handshakes"] == {"route-changed": 3, "broken": 3}
    assert {(b["step"], b["detail"]) for b in r["broken"]} == {("ack", "no-owner-known")}
    assert r["confirms"] == {}


async def test_a_syn_sent_again_after_a_flap_lives_at_the_new_pop(make_pops: MakePops) -> None:
    """The first SYN is claimed at PoP A and its SYN-ACK lost; the route moves to B, where
    the SYN sent again is claimed and the handshake completes. The route moves back to A
    while A's abandoned claim is still live: A's table holds B's established record by
    then, and the merge rule lets it win over A's older embryonic claim."""
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)
    homes = [0, 1, 2]
    flows = [
        FlowSpec(c, 1.0, 25.0, [3.0 + i for i in range(22)], syn_again_s=1.0) for c in range(3)
    ]
    # The first SYN at 1.0 s lands on A; the flap at 1.5 s; the SYN again at 2.0 s and the
    # ACK at 2.1 s land on B; back to A at 8.0 s, within A's 10 s embryonic TTL.
    flaps = moved_next(range(3), 1.5, homes) + [(8.0, c, homes[c]) for c in range(3)]
    r = await simulate(pops, Traffic.build(3, homes, flows, flaps, duration_s=30.0))
    assert r["syn_again"] == {"sent": 3, "landed-elsewhere": 3, "lived-elsewhere": 3}
    assert r["broken_without_table"] == 3  # plain anycast: A resets the packets from 8 s
    assert r["broken_with_table"] == 0
    # From 8 s every packet landed on A and went to B by the record A holds.
    assert r["foreign_packets"] == {"record": 3 * 18}
    assert r["confirms"] == {"ok": 3}


async def test_pinned_flows_live_on_with_alive_and_lapse_without(make_pops: MakePops) -> None:
    """Established records live 10 simulated seconds (1 real second, the shortest TTL a
    caller may ask). Three pinned connections from 0.5 s to 28 s: their packets at home
    never reach handle(). At 20.5 s their clients move; each client starts a new
    connection there at 20.6 s (so its affinity names the new PoP), and the old
    connection's next packet comes at 22 s."""
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)

    def pinned(clients: range) -> Traffic:
        homes = [i % 3 for i in range(clients.stop)]
        data = [1.0 + i for i in range(20)] + [22.0 + i for i in range(6)]
        flows = [FlowSpec(c, 0.5, 28.0, data, pinned=True) for c in clients]
        flows += [FlowSpec(c, 20.6, 21.5, [21.0]) for c in clients]
        return Traffic.build(3, homes, flows, moved_next(clients, 20.5, homes), duration_s=30.0)

    r = await simulate(pops, pinned(range(3)), established_ttl_s=10.0)
    assert r["broken_without_table"] == 3
    assert r["broken_with_table"] == 0
    assert r["pinned"]["flows"] == 3
    assert r["pinned"]["data-plane-packets"] >= 3 * 25  # up to the FIN, tunnelled or not
    assert r["keepalive"]["calls"] > 0
    assert r["keepalive"].get("not-owned", 0) == 0

    r = await simulate(pops, pinned(range(3, 6)), established_ttl_s=10.0, keepalive=False)
    assert r["broken_with_table"] == 3
    assert r["broken_reasons"] == {"record-lapsed": 3}
    assert {(b["t_s"], b["pinned"]) for b in r["broken"]} == {(22.0, True)}
    assert "calls" not in r["keepalive"]


async def test_udp_flows_across_a_flap_are_saved(make_pops: MakePops) -> None:
    """UDP flows: an old one (confirmed and shipped before its client moves) and a young
    one (its client moves before it lived udp_confirm_after_s: only an embryonic claim at
    its PoP)."""
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)

    def udp(clients: range) -> Traffic:
        homes = [i % 3 for i in range(clients.stop)]
        flows = [FlowSpec(c, 0.5, 25.0, [1.0 + i for i in range(24)], udp=True) for c in clients]
        flows += [FlowSpec(c, 11.8, 25.0, [12.1 + i for i in range(12)], udp=True) for c in clients]
        return Traffic.build(3, homes, flows, moved_next(clients, 12.0, homes), duration_s=30.0)

    r = await simulate(pops, udp(range(3)))
    assert r["broken_without_table"] == 6
    assert r["broken_with_table"] == 0
    assert r["udp"] == {"flows": 6, "confirmed": 6}
    assert r["traffic"] == {"udp": 6}

    # No second chance: the young flows' packets reach a PoP that never heard of them,
    # and a UDP packet of an unknown flow is claimed there as a new flow.
    r = await simulate(pops, udp(range(3, 6)), second_chance=False)
    assert r["broken_with_table"] == 3
    assert r["broken_reasons"] == {"claimed-as-new": 3}
    assert {(b["proto"], b["t_s"]) for b in r["broken"]} == {("udp", 12.1)}


async def test_connections_served_from_local_sockets_keep_their_records(
    make_pops: MakePops,
) -> None:
    """Not pinned: every packet reaches handle(), with local=True where the socket is
    (at home, or tunnelled home). Established records live 10 simulated seconds; the
    connections live 28. Client 0 moves at 2 s (its packets are tunnelled home from
    then on), clients 1 and 2 at 20 s. No affinity, so nothing but the record saves them."""
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)
    flows = [(c, 0.5, 28.0, [1.0 + i for i in range(27)]) for c in range(3)]
    flaps = [(2.0, 0, 1), (20.0, 1, 2), (20.0, 2, 0)]
    tr = Traffic.build(3, [0, 1, 2], flows, flaps, duration_s=30.0)
    r = await simulate(pops, tr, established_ttl_s=10.0, use_affinity=False)
    assert r["broken_reasons"] == {}
