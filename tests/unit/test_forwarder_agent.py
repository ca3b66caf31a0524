"""The forwarder agent's pure parts (docs/forwarder.md): the command line into a
config, the nft ruleset and the iptables/ip commands, Outcome -> mark and pin, pin
timeouts from the TTLs and the owner-change bound, the map's batched updates, conntrack
lines; and the agent's reactions to upcalls and conntrack events with a fake forwarder
(no kernel)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dht.client.cache import Answer
from dht.client.decision import Action, Packet
from dht.client.forwarder import Outcome
from dht.core.errors import ConfigError
from dht.core.record import State, Status
from dht.core.wire import FlowKey
from dht.tools.forwarder import conntrack, rules, system
from dht.tools.forwarder.agent import Agent
from dht.tools.forwarder.cli import add_forwarder_parser, config_from_args
from dht.tools.forwarder.config import AgentConfig, NextHop
from dht.tools.forwarder.pins import Pin, PinTable, nft_element, remote_pin_s, verdict_for
from dht.tools.forwarder.rules import PINNED

NOW_MS = 1_800_000_000_000


def parse(argv: list[str]) -> AgentConfig:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_forwarder_parser(sub)
    return config_from_args(p.parse_args(["forwarder", *argv]))


BASE = [
    "--pop", "ams", "--nodes", "10.0.0.1:7100,10.0.0.2:7100", "--service", "192.0.2.1",
    "--service", "2001:db8::1", "--next-hop", "fra=10.9.0.2", "--next-hop", "fra=fd09::2",
    "--next-hop", "lon=10.9.0.3", "--backbone-if", "bb0", "--insecure",
]  # fmt: skip


def config(**kw: Any) -> AgentConfig:
    return parse(BASE) if not kw else AgentConfig(**{**parse(BASE).__dict__, **kw})


def key(client: str = "198.51.100.7", cport: int = 51000, svc: str = "192.0.2.1") -> bytes:
    return FlowKey(6, ipaddress.ip_address(client), cport, ipaddress.ip_address(svc), 80).to_bytes()


def outcome(action: Action, target: int = 0, expiry_ms: int = 0, owner: int = 0) -> Outcome:
    a = Answer(Status.OK, owner or target, State.ESTABLISHED, 0, expiry_ms)
    return Outcome(action, target, "test", False, a)


# --------------------------------------------------------------------------- config


def test_arguments_become_a_config() -> None:
    c = parse([*BASE, "--queue-num", "3", "--metrics-port", "9100", "--pin-timeout-s", "60"])
    assert c.pop == "ams"
    assert c.nodes == ("10.0.0.1:7100", "10.0.0.2:7100")
    assert [str(s) for s in c.services] == ["192.0.2.1", "2001:db8::1"]
    assert c.next_hops[0] == NextHop("fra", ipaddress.ip_address("10.9.0.2"))
    assert [str(h.address) for h in c.hops_of(6)] == ["fd09::2"]
    assert (c.queue_num, c.metrics_port, c.pin_timeout_s, c.insecure) == (3, 9100, 60.0, True)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--pop", "ams"], "missing --nodes, --service, --backbone-if"),
        ([*BASE, "--next-hop", "fra=10.9.0.9"], "given twice"),
        ([*BASE, "--next-hop", "ams=10.9.0.9"], "this PoP"),
        ([*BASE, "--next-hop", "fra"], "POP=ADDR"),
        ([*BASE, "--service", "example.com"], "not an IPv4 or IPv6"),
        ([*BASE, "--backbone-if", "bb0; drop"], "not an interface name"),
        ([*BASE, "--nodes", "nowhere"], "HOST:PORT"),
        ([*BASE, "--keepalive-s", "40"], "half of --refresh-ahead-s"),
        ([*BASE, "--pin-timeout-s", "0"], "1..86400"),
    ],
)
def test_bad_arguments_are_config_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse(argv)


# --------------------------------------------------------------------------- rules


def test_nft_ruleset_has_sets_maps_and_the_hop_limit() -> None:
    text = rules.nft_ruleset(config())
    assert text.startswith(f"table inet {rules.TABLE} {{")
    assert "set services4 { type ipv4_addr; elements = { 192.0.2.1 }; }" in text
    assert "set services6 { type ipv6_addr; elements = { 2001:db8::1 }; }" in text
    assert "map flows4 { type inet_proto . ipv4_addr . inet_service . ipv4_addr" in text
    assert "flags timeout" in text
    assert (
        "meta mark set meta l4proto . ip saddr . th sport . ip daddr . th dport map @flows4" in text
    )
    assert f"priority {rules.NFT_PRIORITY};" in text
    # Tunnelled in and known: served here, never steered on.
    assert 'iifname "bb0" meta mark & 0x10000 == 0x10000 meta mark set 0x10000' in text
    assert "ct state new" in text


def test_a_family_without_services_gets_an_empty_set() -> None:
    text = rules.nft_ruleset(config(services=(ipaddress.ip_address("192.0.2.1"),)))
    assert "set services6 { type ipv6_addr; }" in text


def test_iptables_rules_queue_syn_fin_rst_and_unknown_flows() -> None:
    r4 = [" ".join(a) for a in rules.iptables_rules(config(queue_num=7), 4)]
    assert r4[0] == "-t mangle -N DHT_FWD"
    q = "-j NFQUEUE --queue-num 7 --queue-bypass"
    assert f"-t mangle -A DHT_FWD -p tcp --tcp-flags SYN,ACK SYN {q}" in r4
    assert f"-t mangle -A DHT_FWD -p tcp --tcp-flags FIN FIN {q}" in r4
    assert f"-t mangle -A DHT_FWD -p tcp --tcp-flags RST RST {q}" in r4
    assert f"-t mangle -A DHT_FWD -p udp -m mark --mark 0/0x10000 {q}" in r4
    assert r4[-1] == "-t mangle -I PREROUTING -d 192.0.2.1 -j DHT_FWD"
    r6 = [" ".join(a) for a in rules.iptables_rules(config(), 6)]
    assert r6[-1] == "-t mangle -I PREROUTING -d 2001:db8::1 -j DHT_FWD"


def test_route_commands_per_owner_table_and_family() -> None:
    cmds = [" ".join(a) for a in rules.route_commands(config(), {"fra": 2, "lon": 3})]
    assert "ip -4 route replace 192.0.2.1/32 via 10.9.0.2 dev bb0 table 102" in cmds
    assert "ip -4 route replace 192.0.2.1/32 via 10.9.0.3 dev bb0 table 103" in cmds
    assert "ip -6 route replace 2001:db8::1/128 via fd09::2 dev bb0 table 102" in cmds
    assert "ip -4 rule add pref 500 fwmark 0x2/0xffff lookup 102" in cmds
    assert "ip -6 rule add pref 500 fwmark 0x2/0xffff lookup 102" in cmds
    assert not any("table 103" in c for c in cmds if c.startswith("ip -6"))
    # The local table behind the fwmark rules, in both families.
    assert cmds.count("ip -4 rule add pref 900 lookup local") == 1
    assert cmds.count("ip -6 rule add pref 900 lookup local") == 1
    assert max(rules.RULE_PREFS) < 1000


def test_owned_rules_and_tables() -> None:
    listing: list[dict[str, object]] = [
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 500, "src": "all", "fwmark": "0x2", "fwmask": "0xffff", "table": "102"},
        {"priority": 900, "src": "all", "table": "local"},
        {"priority": 1000, "src": "all", "table": "local"},
        {"priority": 32766, "src": "all", "table": "main"},
    ]
    assert [r["priority"] for r in rules.owned_rules(listing)] == [500, 900]
    assert rules.owned_tables(listing) == {102}


def test_setup_turns_forwarding_on_and_early_demux_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early demux would attach a local socket for the 4-tuple (a half-open one, say) to a
    packet before routing, and the forwarding path drops such a packet: setup turns it
    off, as it turns forwarding on."""
    files = {n: tmp_path / n for n in ("fwd4", "fwd6", "demux")}
    for f in files.values():
        f.write_text("1\n" if f.name == "demux" else "0\n")
    monkeypatch.setattr(system, "SYSCTLS", {4: files["fwd4"], 6: files["fwd6"]})
    monkeypatch.setattr(system, "EARLY_DEMUX", files["demux"])
    ran: list[list[str]] = []
    monkeypatch.setattr(system, "run", lambda args, **_: ran.append(list(args)) or "")
    system.setup(config(), {"fra": 2, "lon": 3})
    assert {n: f.read_text() for n, f in files.items()} == {
        "fwd4": "1\n",
        "fwd6": "1\n",
        "demux": "0\n",
    }
    assert ["nft", "-f", "-"] in ran


# --------------------------------------------------------------------------- verdicts


def test_tunnel_marks_and_pins_for_the_owner_bound() -> None:
    v = verdict_for(
        outcome(Action.TUNNEL, 2), Packet.DATA, pin_timeout_s=300, owner_ttl_s=5, now_ms=NOW_MS
    )
    assert v.mark == PINNED | 2
    assert v.pin == Pin(PINNED | 2, 5.0)


def test_a_pin_elsewhere_never_outlives_the_record() -> None:
    o = outcome(Action.TUNNEL, 3, expiry_ms=NOW_MS + 2_500)
    assert remote_pin_s(o, 5.0, NOW_MS) == 2.5
    v = verdict_for(o, Packet.SYN, pin_timeout_s=300, owner_ttl_s=5, now_ms=NOW_MS)
    assert v.pin == Pin(PINNED | 3, 2.5)
    # Expiring in under a second: steered, not pinned.
    o = outcome(Action.TUNNEL, 3, expiry_ms=NOW_MS + 400)
    v = verdict_for(o, Packet.DATA, pin_timeout_s=300, owner_ttl_s=5, now_ms=NOW_MS)
    assert (v.mark, v.pin) == (PINNED | 3, None)


def test_fin_is_steered_but_changes_no_pin() -> None:
    v = verdict_for(
        outcome(Action.TUNNEL, 2), Packet.FIN, pin_timeout_s=300, owner_ttl_s=5, now_ms=NOW_MS
    )
    assert (v.mark, v.pin) == (PINNED | 2, None)
    v = verdict_for(
        outcome(Action.SERVE, owner=1), Packet.FIN, pin_timeout_s=300, owner_ttl_s=5, now_ms=NOW_MS
    )
    assert (v.mark, v.pin) == (PINNED, None)


@pytest.mark.parametrize(
    ("kind", "pinned"), [(Packet.SYN, False), (Packet.DATA, True), (Packet.UDP, True)]
)
def test_serve_pins_here_once_past_the_handshake(kind: Packet, pinned: bool) -> None:
    v = verdict_for(
        outcome(Action.SERVE, owner=1), kind, pin_timeout_s=120, owner_ttl_s=5, now_ms=NOW_MS
    )
    assert v.mark == PINNED
    assert v.pin == (Pin(PINNED, 120) if pinned else None)


def test_serve_unknown_is_accepted_unmarked_and_unpinned() -> None:
    v = verdict_for(
        outcome(Action.SERVE_UNKNOWN), Packet.DATA, pin_timeout_s=120, owner_ttl_s=5, now_ms=NOW_MS
    )
    assert (v.mark, v.pin) == (0, None)


# --------------------------------------------------------------------------- pins


def test_nft_element_text_for_both_families() -> None:
    assert nft_element(key()) == (4, "tcp . 198.51.100.7 . 51000 . 192.0.2.1 . 80")
    k6 = key("2001:db8:9::7", 40000, "2001:db8::1")
    assert nft_element(k6) == (6, "tcp . 2001:db8:9::7 . 40000 . 2001:db8::1 . 80")


def test_pin_table_batches_add_rearm_change_and_remove() -> None:
    t = PinTable()
    k = key()
    t.set(k, Pin(PINNED | 2, 5.0), now=100.0)
    t.set(k, Pin(PINNED | 2, 5.0), now=101.0)  # the same mark: re-arm
    t.set(k, Pin(PINNED, 300.0), now=102.0)  # another mark: replace
    assert t.remove(k)
    assert not t.remove(k)
    m = f"inet {rules.TABLE} flows4"
    e = "tcp . 198.51.100.7 . 51000 . 192.0.2.1 . 80"
    assert t.take_batch() == [
        f"add element {m} {{ {e} timeout 5000ms : 0x10002 }}",
        f"add element {m} {{ {e} timeout 5000ms : 0x10002 }}",
        f"add element {m} {{ {e} timeout 1s : 0x10002 }}\n"
        f"delete element {m} {{ {e} }}\n"
        f"add element {m} {{ {e} timeout 300000ms : 0x10000 }}",
        f"add element {m} {{ {e} timeout 1s : 0x10000 }}\ndelete element {m} {{ {e} }}",
    ]
    assert t.take_batch() == []
    assert len(t) == 0


def test_pin_table_counts_rearms_and_prunes() -> None:
    t = PinTable()
    here, there = key(cport=1), key(cport=2)
    t.set(here, Pin(PINNED, 10.0), now=0.0)
    t.set(there, Pin(PINNED | 2, 5.0), now=0.0)
    assert t.count(1.0) == (1, 1)
    assert t.count(6.0) == (1, 0)
    t.take_batch()
    # Re-armed only when less than half its timeout is left, and only pins here.
    assert t.rearm([here, there], 10.0, now=2.0) == 0
    assert t.rearm([here, there], 10.0, now=6.0) == 1
    assert len(t.take_batch()) == 1
    assert t.local_keys(7.0) == [here]
    # Forgotten only after the grace period past its timeout.
    assert t.prune(6.0) == 0
    assert t.prune(10.1) == 1
    assert t.get(there) is None and t.get(here) == PINNED


# --------------------------------------------------------------------------- conntrack

ESTABLISHED = (
    " [UPDATE] tcp      6 432000 ESTABLISHED src=198.51.100.7 dst=192.0.2.1 sport=51000 "
    "dport=80 src=192.0.2.1 dst=198.51.100.7 sport=80 dport=51000 [ASSURED] id=1"
)


def test_conntrack_lines() -> None:
    e = conntrack.parse_line(ESTABLISHED)
    assert e is not None
    assert (e.event, e.key, e.state, e.assured) == (
        conntrack.Event.PRESENT,
        key(),
        "ESTABLISHED",
        True,
    )
    assert e.local_socket
    syn = conntrack.parse_line(
        "    [NEW] tcp      6 120 SYN_SENT src=::1 dst=2001:db8::1 sport=4 dport=80 [UNREPLIED]"
        " src=2001:db8::1 dst=::1 sport=80 dport=4"
    )
    assert syn is not None and not syn.local_socket and syn.state == "SYN_SENT"
    gone = conntrack.parse_line(
        "[DESTROY] udp 17 src=198.51.100.7 dst=192.0.2.1 sport=5 dport=53 src=192.0.2.1 "
        "dst=198.51.100.7 sport=53 dport=5 [ASSURED]"
    )
    assert gone is not None and gone.event is conntrack.Event.DESTROY and gone.state == ""
    listed = conntrack.parse_line(ESTABLISHED.replace(" [UPDATE]", ""))
    assert listed is not None and listed.key == key()
    assert conntrack.parse_line("icmp 1 29 src=1.2.3.4 dst=5.6.7.8 type=8 code=0 id=1") is None
    assert conntrack.parse_line("conntrack v1.4.7 (conntrack-tools): 3 flow events") is None


def test_picked_up_mid_stream_is_not_a_local_socket() -> None:
    # Loose tracking marks a mid-stream packet ESTABLISHED, but nothing answered it.
    e = conntrack.parse_line(ESTABLISHED.replace(" [ASSURED]", " [UNREPLIED]"))
    assert e is not None and not e.local_socket


# --------------------------------------------------------------------------- agent


@dataclass
class FakePacket:
    payload: bytes
    indev: int = 5
    mark: int | None = None
    accepted: bool = False

    def get_payload(self) -> bytes:
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.accepted = True


@dataclass
class FakeForwarder:
    """The part of dht.client.Forwarder the agent calls; answers from a script."""

    outcomes: dict[bytes, Outcome]
    here: int = 1
    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def handle(self, k: bytes, kind: Packet, *, tunnelled: bool, local: bool) -> Outcome:
        self.calls.append(("handle", (kind, tunnelled, local)))
        return self.outcomes[k]

    async def established(self, k: bytes) -> Answer:
        self.calls.append(("established", k))
        return Answer(Status.OK, 1, State.ESTABLISHED, 0, 0)


def syn_packet(cport: int = 51000) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
        socket.inet_aton("198.51.100.7"), socket.inet_aton("192.0.2.1"),
    )  # fmt: skip
    tcp = struct.pack("!HHIIBBHHH", cport, 80, 1, 0, 0x50, 0x02, 65535, 0, 0)
    return ip + tcp


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_agent_claims_a_syn_confirms_on_conntrack_and_unpins_on_destroy() -> None:
    k = key()
    fw = FakeForwarder({k: outcome(Action.SERVE, owner=1)})
    agent = Agent(config(), fw)  # type: ignore[arg-type]
    pkt = FakePacket(syn_packet())
    agent._on_packet(pkt)
    await settle()
    assert pkt.accepted and pkt.mark == PINNED
    assert fw.calls == [("handle", (Packet.SYN, False, False))]
    assert agent.pins.get(k) is None  # a SYN pins nothing
    agent._on_conntrack(conntrack.parse_line(ESTABLISHED))  # type: ignore[arg-type]
    await settle()
    assert ("established", k) in fw.calls
    assert agent.local_flows == {k} and agent.pins.get(k) == PINNED
    destroy = ESTABLISHED.replace("[UPDATE]", "[DESTROY]")
    agent._on_conntrack(conntrack.parse_line(destroy))  # type: ignore[arg-type]
    assert agent.local_flows == frozenset() and agent.pins.get(k) is None
    await agent.stop()


async def test_agent_steers_to_the_owner_and_knows_the_backbone() -> None:
    k = key()
    fw = FakeForwarder({k: outcome(Action.TUNNEL, 2)})
    agent = Agent(config(), fw)  # type: ignore[arg-type]
    agent._bb_index = 9
    pkt = FakePacket(syn_packet(), indev=9)
    agent._on_packet(pkt)
    await settle()
    assert fw.calls == [("handle", (Packet.SYN, True, False))]
    assert pkt.accepted and pkt.mark == PINNED | 2
    assert agent.pins.get(k) == PINNED | 2
    # Not claimed here: an ESTABLISHED event confirms nothing.
    agent._on_conntrack(conntrack.parse_line(ESTABLISHED))  # type: ignore[arg-type]
    await settle()
    assert not any(c[0] == "established" for c in fw.calls)
    await agent.stop()


async def test_agent_accepts_unparsable_packets_undecided() -> None:
    fw = FakeForwarder({})
    agent = Agent(config(), fw)  # type: ignore[arg-type]
    pkt = FakePacket(b"\x45garbage")
    agent._on_packet(pkt)
    assert pkt.accepted and pkt.mark is None and fw.calls == []
    await agent.stop()


class StuckForwarder(FakeForwarder):
    async def handle(self, k: bytes, kind: Packet, *, tunnelled: bool, local: bool) -> Outcome:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_stopping_accepts_the_packets_still_being_decided() -> None:
    agent = Agent(config(), StuckForwarder({}))  # type: ignore[arg-type]
    pkt = FakePacket(syn_packet())
    agent._on_packet(pkt)
    await settle()
    assert not pkt.accepted
    await agent.stop()
    assert pkt.accepted and pkt.mark is None
    await agent.stop()  # safe twice
