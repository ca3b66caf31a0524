"""The simulator's pure parts: the traffic model (handshakes as packets, SYNs sent again,
UDP flows, pinned flows, the coincidences injected at flaps, plain anycast's verdicts) and
the judge's names for what happened to a packet (docs/simulator.md)."""

from __future__ import annotations

from dataclasses import replace

from dht.client.cache import Answer
from dht.client.decision import Action, Packet
from dht.client.forwarder import Outcome
from dht.core.record import UDP, State, Status
from dht.tools.sim.judge import before_ship, break_reason, saved_by
from dht.tools.traffic import FlowSpec, Step, Traffic, TrafficConfig


def test_a_connection_is_a_syn_its_handshake_ack_data_and_a_fin() -> None:
    tr = Traffic.build(2, [0], [(0, 1.0, 5.0, [2.0, 3.0])], [], duration_s=10.0)
    f = tr.flows[0]
    assert [(s.t_s, s.packet, s.step) for s in tr.plan(f)] == [
        (1.0, Packet.SYN, Step.SYN),
        (1.0 + tr.handshake_s, Packet.DATA, Step.ACK),
        (2.0, Packet.DATA, Step.DATA),
        (3.0, Packet.DATA, Step.DATA),
        (5.0, Packet.FIN, Step.FIN),
    ]
    # packets(): the flow's own packets, without the handshake's ACK.
    assert tr.packets(f) == [(1.0, Packet.SYN), (2.0, Packet.DATA), (3.0, Packet.DATA),
                             (5.0, Packet.FIN)]  # fmt: skip


def test_a_handshake_cut_by_a_flap_breaks_plain_anycast_at_its_ack() -> None:
    tr = Traffic.build(2, [0], [(0, 1.0, 5.0, [2.0])], [(1.05, 0, 1)], duration_s=10.0)
    assert tr.baseline_break(tr.flows[0]) == 1.0 + tr.handshake_s


def test_a_syn_sent_again_makes_the_connection_where_it_lands() -> None:
    spec = FlowSpec(0, 1.0, 6.0, [3.0, 4.0], syn_again_s=1.0)
    tr = Traffic.build(2, [0], [spec], [(1.5, 0, 1)], duration_s=10.0)
    f = tr.flows[0]
    assert f.open_s == 2.0
    assert [s.step for s in tr.plan(f)] == [
        Step.SYN, Step.SYN_AGAIN, Step.ACK, Step.DATA, Step.DATA, Step.FIN
    ]  # fmt: skip
    assert tr.plan(f)[2].t_s == 2.0 + tr.handshake_s
    # Plain anycast: the connection lives where the SYN sent again landed (PoP 1).
    assert tr.baseline_break(f) is None
    back = Traffic.build(2, [0], [spec], [(1.5, 0, 1), (3.5, 0, 0)], duration_s=10.0)
    assert back.baseline_break(back.flows[0]) == 4.0


def test_udp_flows_are_udp_packets_with_udp_keys_and_no_fin() -> None:
    tr = Traffic.build(2, [0], [FlowSpec(0, 1.0, 5.0, [2.0, 3.0], udp=True)], [], 10.0)
    f = tr.flows[0]
    assert f.key[1] == UDP
    assert [(s.packet, s.step) for s in tr.plan(f)] == [
        (Packet.UDP, Step.UDP_FIRST), (Packet.UDP, Step.UDP), (Packet.UDP, Step.UDP)
    ]  # fmt: skip


def test_generated_traffic_mixes_kinds_and_injects_coincidences_at_flaps() -> None:
    cfg = TrafficConfig(clients=100, duration_s=300.0, flow_rate_per_s=10.0)
    tr = Traffic.generate(cfg, seed=3)
    assert Traffic.generate(cfg, seed=3).flows == tr.flows
    kinds = tr.kinds()
    n = len(tr.flows)
    assert 0.15 < kinds["udp"] / n < 0.25
    assert 0.2 < kinds["pinned"] / n < 0.3
    assert kinds["syn_again"] > 0
    changes = {(f.t_s, f.client) for f in tr.flaps}
    for f in tr.flows:
        if f.injected == "handshake-flap":
            # The SYN before a change of its client's route, the ACK after it.
            ack = f.start_s + tr.handshake_s
            assert any(f.start_s < t < ack and c == f.client for t, c in changes)
            assert tr.route_at(f.client, f.start_s) != tr.route_at(f.client, ack)
        elif f.injected == "retry-flap":
            assert f.syn_again_s == cfg.syn_retry_s
            assert any(f.start_s < t < f.open_s and c == f.client for t, c in changes)
        elif f.injected == "old":
            assert f.pinned
            assert any(c == f.client and t - f.start_s >= cfg.old_flow_age_s for t, c in changes)
    for why in ("handshake-flap", "retry-flap", "old"):
        assert kinds[f"injected_{why}"] > 0

    # One share changed leaves the other flows as they were.
    def shape(t: Traffic) -> list[tuple[object, ...]]:
        return [
            (f.client, f.start_s, f.end_s, f.data_s, f.udp, f.syn_again_s, f.pinned, f.injected)
            for f in t.flows
            if f.injected != "old"
        ]

    assert shape(Traffic.generate(replace(cfg, flap_old_share=0.0), seed=3)) == shape(tr)


def _out(reason: str, owner: int = 0, affinity: int = 0, second: bool = False) -> Outcome:
    status = Status.OK if owner else Status.NOT_FOUND
    answer = Answer(status, owner, State.ESTABLISHED, affinity, 0, second)
    return Outcome(Action.SERVE, 0, reason, False, answer)


def test_the_judge_names_how_a_packet_was_saved_or_why_it_broke() -> None:
    assert saved_by(_out("owner", owner=2)) == "record"
    assert saved_by(_out("owner", owner=2, second=True)) == "second-chance"
    assert saved_by(_out("affinity", affinity=2)) == "affinity"
    here = 1
    assert break_reason(_out("unknown"), here, lapsed=False) == "no-owner-known"
    assert break_reason(_out("unknown", affinity=here), here, lapsed=False) == "affinity-is-here"
    assert break_reason(_out("affinity", affinity=3), here, lapsed=False) == "affinity-elsewhere"
    assert break_reason(_out("new-flow", owner=here), here, lapsed=False) == "claimed-as-new"
    assert break_reason(_out("unknown"), here, lapsed=True) == "record-lapsed"
    assert break_reason(_out("owner", owner=here), here, lapsed=True) == "wrong-owner"
    assert before_ship(_out("unknown"))
    assert before_ship(_out("owner", owner=2, second=True))
    assert not before_ship(_out("owner", owner=2))
