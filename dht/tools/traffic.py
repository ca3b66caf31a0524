"""Synthetic anycast traffic for ``dht simulate`` (pure, seeded; times in simulated
seconds; docs/simulator.md#the-traffic).

Clients are spread over the PoPs (each client prefix lands on one PoP: its anycast
catchment). Flows start as a Poisson process, each from a random client, with a
heavy-tailed lifetime (Pareto: most are short, a few live for minutes):

- a TCP connection is a SYN, the client's handshake-completing ACK ``handshake_s`` later,
  data packets at exponential gaps and a FIN. For a share (``syn_loss``) the first
  SYN-ACK is lost: the client sends the SYN again ``syn_retry_s`` later, and that SYN
  makes the connection (its handshake, data and lifetime count from it);
- a UDP flow (``udp_share``; protocol 17 keys) is UDP packets only, the first included,
  and no FIN: it just stops;
- a share of the flows (``pinned_share``) are pinned: once established, their home PoP's
  data plane holds them (what the simulator does with that: docs/simulator.md).

Route flaps move a share of the client prefixes to another PoP on a schedule, some of
them back again later. The coincidences that matter are also put there on purpose,
seeded like the rest: for a share of the route changes, a connection of the moved client
whose handshake the change cuts (SYN before it, ACK after), one whose SYN-ACK is lost just
before it (the SYN sent again lands on the new PoP), and an old pinned connection (older
than ``old_flow_age_s``, so its record lapses unless kept alive) that it moves.

The baseline, plain anycast with no table, is judged here: a connection lives where the
SYN that made it landed (a UDP flow, where its first packet did) and breaks at its first
later packet that lands elsewhere.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from dht.client.decision import Packet
from dht.core.record import TCP, UDP
from dht.core.wire import FlowKey

SERVICE_V4 = ipaddress.IPv4Address("192.0.2.1")
SERVICE_V6 = ipaddress.IPv6Address("2001:db8::1")
# 198.18.0.0/15 (benchmarking addresses): one IPv4 client per /32, the default affinity
# prefix; IPv6 clients one per /64 in 2001:db8::/32.
CLIENT_V4_BASE = int(ipaddress.IPv4Address("198.18.0.0"))
CLIENT_V6_BASE = 0x20010DB8 << 96


@dataclass(frozen=True)
class TrafficConfig:
    """The traffic model; every time is in simulated seconds."""

    pops: int = 3
    clients: int = 300
    duration_s: float = 450.0
    # New flows per simulated second, all clients together.
    flow_rate_per_s: float = 12.0
    # Pareto lifetimes: scale (the shortest) and shape (1.1: median ~1.9 s, ~8% live
    # beyond 10 s, ~1% beyond a minute), capped.
    lifetime_min_s: float = 1.0
    lifetime_alpha: float = 1.1
    lifetime_max_s: float = 900.0
    # Mean gap between two packets of a flow (exponential).
    packet_interval_s: float = 2.0
    # SYN -> the client's handshake-completing ACK (about one round trip).
    handshake_s: float = 0.1
    # Share of TCP connections whose first SYN-ACK is lost; the SYN goes again after
    # syn_retry_s (TCP's initial retransmission timeout).
    syn_loss: float = 0.02
    syn_retry_s: float = 1.0
    # Share of flows that are UDP (QUIC-like: many packets each way, no FIN).
    udp_share: float = 0.2
    # Share of flows held in the home PoP's data plane once established.
    pinned_share: float = 0.25
    # A route flap every flap_interval_s moves flap_fraction of the client prefixes to
    # another PoP; each moves back after ~flap_back_after_s with probability flap_back.
    flap_interval_s: float = 20.0
    flap_fraction: float = 0.05
    flap_back: float = 0.5
    flap_back_after_s: float = 30.0
    # Per route change, the chance of each injected coincidence (module docstring): a
    # handshake cut by it, a SYN sent again across it, an old pinned connection moved.
    flap_handshake_share: float = 0.1
    flap_retry_share: float = 0.1
    flap_old_share: float = 0.1
    # Injected old connections are 1 to 1.5 times this old when their client moves:
    # beyond the established TTL the simulator asks for (60 s by default).
    old_flow_age_s: float = 90.0
    # One client in ipv6_every is IPv6 (0: none).
    ipv6_every: int = 4


class Step(StrEnum):
    """What a packet of a flow is to the flow (its ``Packet`` kind is what the forwarder
    sees)."""

    SYN = "syn"  # the first SYN
    SYN_AGAIN = "syn-again"  # the SYN sent again after a lost SYN-ACK
    ACK = "ack"  # the client's handshake-completing ACK
    DATA = "data"
    FIN = "fin"
    UDP_FIRST = "udp-first"  # a UDP flow's first packet
    UDP = "udp"


# The packets after the one that makes the connection.
_LATER = frozenset((Step.ACK, Step.DATA, Step.FIN, Step.UDP))


class Send(NamedTuple):
    """One packet the client sends."""

    t_s: float
    packet: Packet
    step: Step


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A flow of a scripted scenario (``Traffic.build``): ``data_s`` are the times of its
    data packets (TCP) or of the UDP packets after its first."""

    client: int
    start_s: float
    end_s: float
    data_s: Sequence[float] = ()
    udp: bool = False
    # > 0: the first SYN-ACK is lost and the SYN goes again this much later.
    syn_again_s: float = 0.0
    pinned: bool = False
    # Why it was put there on purpose ("" for the Poisson ones).
    injected: str = ""


@dataclass(frozen=True, slots=True)
class Flow:
    id: int
    client: int
    key: bytes  # packed 40-byte flow key (protocol 6, or 17 for UDP)
    start_s: float  # the first SYN (the first UDP packet)
    end_s: float  # FIN time (may lie beyond the run: no FIN then); a UDP flow's end
    data_s: tuple[float, ...]  # data packet times (UDP: the packets after the first)
    udp: bool = False
    syn_again_s: float = 0.0
    pinned: bool = False
    injected: str = ""

    @property
    def open_s(self) -> float:
        """When the packet that makes the connection is sent (the SYN sent again, if
        the first SYN-ACK was lost)."""
        return self.start_s + self.syn_again_s


@dataclass(frozen=True, slots=True)
class Flap:
    t_s: float
    client: int
    from_pop: int
    to_pop: int


@dataclass
class Traffic:
    """Clients, their routes over time, flows and flaps. PoPs are indices 0..pops-1 (the
    simulator maps them to the cluster's PoP ids in id order)."""

    pops: int
    duration_s: float
    handshake_s: float
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    flows: list[Flow]
    flaps: list[Flap]
    # Per client: times its route changes and the PoP from then on (first at t=0).
    _route_t: list[list[float]] = field(default_factory=list)
    _route_pop: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        pops: int,
        homes: Sequence[int],
        flows: Sequence[tuple[int, float, float, Sequence[float]] | FlowSpec],
        flaps: Sequence[tuple[float, int, int]],
        duration_s: float,
        handshake_s: float = TrafficConfig.handshake_s,
        ipv6_every: int = 0,
    ) -> Traffic:
        """A scripted scenario: each client's first PoP (``homes``), flows as ``FlowSpec``
        or (client, start, end, data packet times) for a plain TCP connection, flaps as
        (time, client, new PoP)."""
        addresses = [_address(i, ipv6_every) for i in range(len(homes))]
        route_t: list[list[float]] = [[0.0] for _ in homes]
        route_pop: list[list[int]] = [[h] for h in homes]
        out_flaps = []
        for t, c, to in sorted(flaps):
            out_flaps.append(Flap(t, c, route_pop[c][-1], to))
            route_t[c].append(t)
            route_pop[c].append(to)
        specs = [f if isinstance(f, FlowSpec) else FlowSpec(*f) for f in flows]
        ports = [1024] * len(homes)
        out_flows = []
        for i, f in enumerate(sorted(specs, key=lambda f: f.start_s)):
            c = f.client
            ports[c] = ports[c] + 1 if ports[c] < 65535 else 1025
            key = _key(addresses[c], ports[c], UDP if f.udp else TCP)
            out_flows.append(
                Flow(i, c, key, f.start_s, f.end_s, tuple(sorted(f.data_s)), f.udp,
                     0.0 if f.udp else f.syn_again_s, f.pinned, f.injected)
            )  # fmt: skip
        return cls(
            pops, duration_s, handshake_s, addresses, out_flows, out_flaps, route_t, route_pop
        )

    @classmethod
    def generate(cls, cfg: TrafficConfig, seed: int) -> Traffic:
        """The random model of the module docstring, the same for the same seed."""
        rng = random.Random(seed)
        homes = [rng.randrange(cfg.pops) for _ in range(cfg.clients)]
        flaps = _flaps(cfg, homes, random.Random(f"{seed}/flaps"))
        specs: list[FlowSpec] = []
        t = 0.0
        while True:
            t += rng.expovariate(cfg.flow_rate_per_s)
            if t >= cfg.duration_s:
                break
            client = rng.randrange(cfg.clients)
            udp = rng.random() < cfg.udp_share
            again = cfg.syn_retry_s if not udp and rng.random() < cfg.syn_loss else 0.0
            pinned = rng.random() < cfg.pinned_share
            specs.append(_flow(cfg, rng, client, t, _life(cfg, rng), udp, again, pinned))
        specs += _injected(cfg, flaps, random.Random(f"{seed}/injected"))
        return cls.build(
            cfg.pops, homes, specs, flaps, cfg.duration_s, cfg.handshake_s, cfg.ipv6_every
        )

    def route_at(self, client: int, t_s: float) -> int:
        """The PoP the client's packets land on at ``t_s``."""
        i = bisect.bisect_right(self._route_t[client], t_s) - 1
        return self._route_pop[client][max(i, 0)]

    def plan(self, flow: Flow) -> list[Send]:
        """Every packet the client sends inside the run, in time order: a TCP
        connection's SYN (and the SYN sent again), the handshake's ACK, data, FIN (if it
        ends in time); a UDP flow's packets."""
        if flow.udp:
            out = [Send(flow.start_s, Packet.UDP, Step.UDP_FIRST)]
            out += [Send(t, Packet.UDP, Step.UDP) for t in flow.data_s]
        else:
            out = [Send(flow.start_s, Packet.SYN, Step.SYN)]
            if flow.syn_again_s:
                out.append(Send(flow.open_s, Packet.SYN, Step.SYN_AGAIN))
            out.append(Send(flow.open_s + self.handshake_s, Packet.DATA, Step.ACK))
            out += [Send(t, Packet.DATA, Step.DATA) for t in flow.data_s]
            out.append(Send(flow.end_s, Packet.FIN, Step.FIN))
        return sorted((s for s in out if s.t_s < self.duration_s), key=lambda s: s.t_s)

    def packets(self, flow: Flow) -> list[tuple[float, Packet]]:
        """The flow's first packet, data and FIN inside the run (``plan`` adds the
        handshake's ACK and a SYN sent again)."""
        skip = (Step.ACK, Step.SYN_AGAIN)
        return [(s.t_s, s.packet) for s in self.plan(flow) if s.step not in skip]

    def baseline_break(self, flow: Flow) -> float | None:
        """Plain anycast: when the connection breaks (its first packet after the one that
        made it that lands on another PoP than that one did), None if it never does."""
        home = self.route_at(flow.client, flow.open_s)
        for t, _, step in self.plan(flow):
            if step in _LATER and self.route_at(flow.client, t) != home:
                return t
        return None

    def kinds(self) -> dict[str, int]:
        """How many flows of each kind: tcp, udp, pinned, syn_again, and the injected
        ones by why (``injected_*``)."""
        n: Counter[str] = Counter()
        for f in self.flows:
            n["udp" if f.udp else "tcp"] += 1
            n["pinned"] += f.pinned
            n["syn_again"] += f.syn_again_s > 0
            if f.injected:
                n[f"injected_{f.injected}"] += 1
        return {k: v for k, v in n.items() if v}


def _life(cfg: TrafficConfig, rng: random.Random) -> float:
    u = 1.0 - rng.random()  # (0, 1]
    life: float = cfg.lifetime_min_s / u ** (1 / cfg.lifetime_alpha)
    return min(cfg.lifetime_max_s, life)


def _flow(
    cfg: TrafficConfig,
    rng: random.Random,
    client: int,
    start: float,
    life: float,
    udp: bool,
    syn_again_s: float,
    pinned: bool,
    injected: str = "",
) -> FlowSpec:
    """A flow living ``life`` from the packet that makes it, with data at exponential
    gaps (a TCP connection's from its handshake on)."""
    opened = start + syn_again_s
    end = opened + life
    data = []
    p = opened if udp else opened + cfg.handshake_s
    while True:
        p += rng.expovariate(1 / cfg.packet_interval_s)
        if p >= end:
            break
        data.append(p)
    return FlowSpec(client, start, end, data, udp, syn_again_s, pinned, injected)


def _flaps(
    cfg: TrafficConfig, homes: Sequence[int], rng: random.Random
) -> list[tuple[float, int, int]]:
    flaps: list[tuple[float, int, int]] = []
    if cfg.pops < 2 or cfg.flap_fraction <= 0:
        return flaps
    current = list(homes)
    backs: list[tuple[float, int, int]] = []  # heap of (time, client, pop)
    n = max(1, round(cfg.flap_fraction * cfg.clients))
    t = rng.uniform(0.5, 1.0) * cfg.flap_interval_s
    while t < cfg.duration_s or (backs and backs[0][0] < cfg.duration_s):
        if backs and backs[0][0] <= t:
            bt, c, pop = heapq.heappop(backs)
            if current[c] != pop and bt < cfg.duration_s:
                flaps.append((bt, c, pop))
                current[c] = pop
            continue
        if t >= cfg.duration_s:
            break
        for c in rng.sample(range(cfg.clients), n):
            to = rng.choice([p for p in range(cfg.pops) if p != current[c]])
            if rng.random() < cfg.flap_back:
                later = t + rng.uniform(0.5, 1.5) * cfg.flap_back_after_s
                heapq.heappush(backs, (later, c, current[c]))
            flaps.append((t, c, to))
            current[c] = to
        t += rng.uniform(0.5, 1.5) * cfg.flap_interval_s
    return flaps


def _injected(
    cfg: TrafficConfig, flaps: Sequence[tuple[float, int, int]], rng: random.Random
) -> list[FlowSpec]:
    """The coincidences of the module docstring, per route change. Each change draws from
    a generator of its own, so changing one share does not reshuffle the other flows."""
    out = []
    for t, c, _ in flaps:
        r = random.Random(rng.getrandbits(64))
        cut, again, old, u_cut, u_again, u_age, u_left = (r.random() for _ in range(7))
        life, pinned = _life(cfg, r), r.random() < cfg.pinned_share
        # The SYN before the change, the ACK after it.
        start = t - cfg.handshake_s * (0.1 + 0.8 * u_cut)
        if cut < cfg.flap_handshake_share and start > 0:
            out.append(_flow(cfg, r, c, start, life, False, 0.0, pinned, "handshake-flap"))
        # The first SYN before the change, the SYN sent again after it.
        start = t - cfg.syn_retry_s * (0.1 + 0.8 * u_again)
        if again < cfg.flap_retry_share and start > 0:
            retry = cfg.syn_retry_s
            out.append(_flow(cfg, r, c, start, life, False, retry, pinned, "retry-flap"))
        # Older than old_flow_age_s when moved, and living on for 10 to 60 s.
        age = cfg.old_flow_age_s * (1 + 0.5 * u_age)
        if old < cfg.flap_old_share and t - age > 0:
            out.append(_flow(cfg, r, c, t - age, age + 10 + 50 * u_left, False, 0.0, True, "old"))
    return out


def _address(i: int, ipv6_every: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if ipv6_every and i % ipv6_every == ipv6_every - 1:
        return ipaddress.IPv6Address(CLIENT_V6_BASE | ((i + 1) << 64) | 0x7)
    return ipaddress.IPv4Address(CLIENT_V4_BASE + i + 1)


def _key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, protocol: int) -> bytes:
    service: ipaddress.IPv4Address | ipaddress.IPv6Address = (
        SERVICE_V4 if isinstance(addr, ipaddress.IPv4Address) else SERVICE_V6
    )
    return FlowKey(protocol, addr, port, service, 443).to_bytes()
