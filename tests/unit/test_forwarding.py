"""The forwarder's pure parts: the decision table (docs/protocol.md#decision-table) with its loop
guard,
the flow cache's bounds, and the traffic model's baseline verdicts."""

from __future__ import annotations

import pytest

from dht.client.cache import Answer, CacheLimits, FlowCache
from dht.client.decision import Action, Decision, Packet, decide
from dht.core.record import State, Status
from dht.tools.traffic import Traffic, TrafficConfig

P, Q, R = 1, 2, 3


@pytest.mark.parametrize(
    ("packet", "owner", "affinity", "sticky", "want"),
    [
        # TCP SYN
        (Packet.SYN, Q, 0, False, Decision(Action.TUNNEL, Q, "owner")),
        (Packet.SYN, 0, 0, False, Decision(Action.CLAIM, reason="new-flow")),
        (Packet.SYN, 0, Q, True, Decision(Action.TUNNEL, Q, "affinity")),
        (Packet.SYN, 0, Q, False, Decision(Action.CLAIM, reason="new-flow")),
        (Packet.SYN, P, 0, False, Decision(Action.SERVE, reason="owner")),
        # TCP non-SYN
        (Packet.DATA, P, 0, False, Decision(Action.SERVE, reason="owner")),
        (Packet.DATA, Q, R, False, Decision(Action.TUNNEL, Q, "owner")),
        (Packet.DATA, 0, Q, False, Decision(Action.TUNNEL, Q, "affinity")),
        (Packet.DATA, 0, 0, False, Decision(Action.SERVE_UNKNOWN, reason="unknown")),
        # FIN / RST: the owner releases; elsewhere it goes to the owner
        (Packet.FIN, P, 0, False, Decision(Action.SERVE, reason="owner", release=True)),
        (Packet.FIN, Q, 0, False, Decision(Action.TUNNEL, Q, "owner")),
        # UDP
        (Packet.UDP, 0, Q, True, Decision(Action.CLAIM, reason="new-flow")),
        (Packet.UDP, P, 0, False, Decision(Action.SERVE, reason="owner")),
        (Packet.UDP, Q, 0, False, Decision(Action.TUNNEL, Q, "owner")),
    ],
)
def test_decision_table(
    packet: Packet, owner: int, affinity: int, sticky: bool, want: Decision
) -> None:
    got = decide(
        packet, here=P, tunnelled=False, owner=owner, affinity=affinity, sticky_clients=sticky
    )
    assert got == want


@pytest.mark.parametrize("packet", list(Packet))
@pytest.mark.parametrize("owner", [0, P, Q])
def test_a_tunnelled_packet_is_never_tunnelled_again(packet: Packet, owner: int) -> None:
    d = decide(packet, here=P, tunnelled=True, owner=owner, affinity=Q, sticky_clients=True)
    assert d.action is not Action.TUNNEL
    if d.action is Action.CLAIM:
        # A tunnelled-in new flow is claimed here, and its claim may not send it on.
        assert not d.may_tunnel


@pytest.mark.parametrize("packet", list(Packet))
@pytest.mark.parametrize("owner", [0, P, Q])
@pytest.mark.parametrize("tunnelled", [False, True])
def test_a_packet_of_a_local_socket_is_always_served_here(
    packet: Packet, owner: int, tunnelled: bool
) -> None:
    # decide(DATA, here=1, owner=none, affinity=2) used to tunnel away a packet whose
    # connection is served right here.
    d = decide(packet, here=P, tunnelled=tunnelled, owner=owner, affinity=Q, local=True)
    assert d == Decision(Action.SERVE, reason="local-socket", release=packet is Packet.FIN)


@pytest.mark.parametrize("packet", list(Packet))
def test_nothing_is_tunnelled_to_this_pop(packet: Packet) -> None:
    # Affinity naming this PoP: no tunnel to ourselves.
    for owner in (0, P):
        d = decide(packet, here=P, tunnelled=False, owner=owner, affinity=P, sticky_clients=True)
        assert not (d.action is Action.TUNNEL and d.target == P)


def _answer(owner: int, expiry_ms: int = 0, affinity: int = 0) -> Answer:
    status = Status.OK if owner else Status.NOT_FOUND
    return Answer(status, owner, State.ESTABLISHED if owner else State.NONE, affinity, expiry_ms)


def test_cache_bounds_owner_lifetime_by_owner_ttl_and_record_expiry() -> None:
    cache = FlowCache(CacheLimits(capacity=10, owner_ttl_s=5, negative_ttl_s=0.5))
    wall = 1_000_000
    cache.put(b"a", _answer(Q, expiry_ms=wall + 60_000), now=100.0, wall_ms=wall)
    cache.put(b"b", _answer(Q, expiry_ms=wall + 2_000), now=100.0, wall_ms=wall)
    cache.put(b"n", _answer(0, affinity=R), now=100.0, wall_ms=wall)
    assert cache.get(b"n", 100.4) is not None
    assert cache.get(b"n", 100.5) is None  # negative: 0.5 s
    assert cache.get(b"b", 101.9) is not None
    assert cache.get(b"b", 102.0) is None  # the record's own expiry came first
    assert cache.get(b"a", 104.9) is not None
    assert cache.get(b"a", 105.0) is None  # the owner-change bound
    # An expired record or an unavailable table is not cached at all.
    assert cache.put(b"x", _answer(Q, expiry_ms=wall - 1), now=100.0, wall_ms=wall) is None
    unavailable = Answer(Status.UNAVAILABLE, 0, State.NONE, 0, 0)
    assert cache.put(b"y", unavailable, now=100.0, wall_ms=wall) is None


def test_an_embryonic_claim_is_cached_only_until_tcp_would_retransmit() -> None:
    """A completed copy from another PoP may beat it at any moment (docs/protocol.md#merge-rule)."""
    cache = FlowCache(CacheLimits(owner_ttl_s=5, embryonic_ttl_s=1.0))
    wall = 1_000_000
    claim = Answer(Status.CREATED, P, State.EMBRYONIC, 0, wall + 10_000)
    cache.put(b"e", claim, now=100.0, wall_ms=wall)
    cache.put(b"s", _answer(P, expiry_ms=wall + 600_000), now=100.0, wall_ms=wall)
    assert cache.get(b"e", 100.9) is not None
    assert cache.get(b"e", 101.0) is None
    assert cache.get(b"s", 104.9) is not None
    with pytest.raises(ValueError):
        CacheLimits(embryonic_ttl_s=0)


def test_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = FlowCache(CacheLimits(capacity=3, owner_ttl_s=5, negative_ttl_s=1))
    for k in (b"1", b"2", b"3"):
        cache.put(k, _answer(P), now=0.0, wall_ms=0)
    assert cache.get(b"1", 0.1) is not None  # 1 is now the most recently used
    cache.put(b"4", _answer(P), now=0.2, wall_ms=0)
    assert len(cache) == 3
    assert cache.evicted == 1
    assert cache.get(b"2", 0.3) is None
    assert all(cache.get(k, 0.3) is not None for k in (b"1", b"3", b"4"))


def test_cache_lists_live_entries_about_to_lapse() -> None:
    cache = FlowCache(CacheLimits(capacity=10, owner_ttl_s=5, negative_ttl_s=1))
    cache.put(b"used", _answer(P), now=0.0, wall_ms=0)
    cache.put(b"idle", _answer(P), now=0.0, wall_ms=0)
    cache.put(b"neg", _answer(0), now=0.0, wall_ms=0)
    cache.get(b"used", 3.0)
    cache.get(b"neg", 0.5)
    assert list(cache.live(now=3.5, used_since=2.0, lapse_before=6.0)) == [b"used"]
    assert list(cache.live(now=3.5, used_since=2.0, lapse_before=4.0)) == []


def test_baseline_breaks_a_connection_at_its_first_packet_on_another_pop() -> None:
    tr = Traffic.build(
        pops=2,
        homes=[0, 1],
        flows=[(0, 1.0, 20.0, [5.0, 10.0, 15.0]), (1, 1.0, 20.0, [5.0, 15.0])],
        flaps=[(8.0, 0, 1), (12.0, 0, 0), (9.0, 1, 0), (9.5, 1, 1)],
        duration_s=30.0,
    )
    f0, f1 = tr.flows
    assert tr.route_at(0, 7.9) == 0
    assert tr.route_at(0, 8.0) == 1
    assert tr.route_at(0, 12.0) == 0
    assert tr.baseline_break(f0) == 10.0  # the packet at 10 s landed on PoP 1
    # Client 1 flapped away and back between two packets: its connection survives.
    assert tr.baseline_break(f1) is None
    assert [p for _, p in tr.packets(f0)] == [Packet.SYN] + [Packet.DATA] * 3 + [Packet.FIN]


def test_generated_traffic_is_seeded_heavy_tailed_and_flaps() -> None:
    cfg = TrafficConfig(clients=100, duration_s=200.0, flow_rate_per_s=10.0)
    a = Traffic.generate(cfg, seed=7)
    b = Traffic.generate(cfg, seed=7)
    assert [(f.key, f.start_s) for f in a.flows] == [(f.key, f.start_s) for f in b.flows]
    assert a.flaps == b.flaps
    assert len({f.key for f in a.flows}) == len(a.flows)
    lives = sorted(f.end_s - f.start_s for f in a.flows)
    median = lives[len(lives) // 2]
    assert median < 3.0  # most connections are short ...
    assert lives[-1] > 20 * median  # ... a few live far longer
    assert a.flaps
    assert all(f.from_pop != f.to_pop for f in a.flaps)
    broken = [f for f in a.flows if a.baseline_break(f) is not None]
    assert broken  # plain anycast breaks connections under flaps
    assert Traffic.generate(cfg, seed=8).flaps != a.flaps
