"""Synthetic anycast traffic for ``dht simulate`` (pure, seeded; times in simulated
seconds).

Clients are spread over the PoPs (each client prefix lands on one PoP: its anycast
catchment). Connections start as a Poisson process, each from a random client, with a
heavy-tailed lifetime (Pareto: most are short, a few live for minutes), a SYN, data
packets at exponential gaps and a FIN. Route flaps move a share of the client prefixes to
another PoP on a schedule, some of them back again later.

The baseline, plain anycast with no table, is judged here: a connection lives where its
SYN landed and breaks at its first later packet that lands elsewhere.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from dht.client.decision import Packet
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
    # New connections per simulated second, all clients together.
    flow_rate_per_s: float = 12.0
    # Pareto lifetimes: scale (the shortest) and shape (1.1: median ~1.9 s, ~8% live
    # beyond 10 s, ~1% beyond a minute), capped.
    lifetime_min_s: float = 1.0
    lifetime_alpha: float = 1.1
    lifetime_max_s: float = 900.0
    # Mean gap between two packets of a connection (exponential).
    packet_interval_s: float = 2.0
    # SYN -> handshake complete (the confirm).
    handshake_s: float = 0.05
    # A route flap every flap_interval_s moves flap_fraction of the client prefixes to
    # another PoP; each moves back after ~flap_back_after_s with probability flap_back.
    flap_interval_s: float = 20.0
    flap_fraction: float = 0.05
    flap_back: float = 0.5
    flap_back_after_s: float = 30.0
    # One client in ipv6_every is IPv6 (0: none).
    ipv6_every: int = 4


@dataclass(frozen=True, slots=True)
class Flow:
    id: int
    client: int
    key: bytes  # packed 40-byte flow key
    start_s: float
    end_s: float  # FIN time (may lie beyond the run: no FIN then)
    data_s: tuple[float, ...]  # data packet times


@dataclass(frozen=True, slots=True)
class Flap:
    t_s: float
    client: int
    from_pop: int
    to_pop: int


@dataclass
class Traffic:
    """Clients, their routes over time, connections and flaps. PoPs are indices
    0..pops-1 (the simulator maps them to the cluster's PoP ids in id order)."""

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
        flows: Sequence[tuple[int, float, float, Sequence[float]]],
        flaps: Sequence[tuple[float, int, int]],
        duration_s: float,
        handshake_s: float = 0.05,
        ipv6_every: int = 0,
    ) -> Traffic:
        """A scripted scenario: each client's first PoP (``homes``), connections as
        (client, start, end, data packet times), flaps as (time, client, new PoP)."""
        addresses = [_address(i, ipv6_every) for i in range(len(homes))]
        route_t: list[list[float]] = [[0.0] for _ in homes]
        route_pop: list[list[int]] = [[h] for h in homes]
        out_flaps = []
        for t, c, to in sorted(flaps):
            out_flaps.append(Flap(t, c, route_pop[c][-1], to))
            route_t[c].append(t)
            route_pop[c].append(to)
        ports = [1024] * len(homes)
        out_flows = []
        for i, (c, start, end, data) in enumerate(sorted(flows, key=lambda f: f[1])):
            ports[c] = ports[c] + 1 if ports[c] < 65535 else 1025
            key = _key(addresses[c], ports[c])
            out_flows.append(Flow(i, c, key, start, end, tuple(sorted(data))))
        return cls(
            pops, duration_s, handshake_s, addresses, out_flows, out_flaps, route_t, route_pop
        )

    @classmethod
    def generate(cls, cfg: TrafficConfig, seed: int) -> Traffic:
        """The random model of the module docstring, the same for the same seed."""
        rng = random.Random(seed)
        homes = [rng.randrange(cfg.pops) for _ in range(cfg.clients)]
        flows = []
        t = 0.0
        while True:
            t += rng.expovariate(cfg.flow_rate_per_s)
            if t >= cfg.duration_s:
                break
            u = 1.0 - rng.random()  # (0, 1]
            life = min(cfg.lifetime_max_s, cfg.lifetime_min_s / u ** (1 / cfg.lifetime_alpha))
            data = []
            p = t + cfg.handshake_s
            while True:
                p += rng.expovariate(1 / cfg.packet_interval_s)
                if p >= t + life:
                    break
                data.append(p)
            flows.append((rng.randrange(cfg.clients), t, t + life, data))
        flaps: list[tuple[float, int, int]] = []
        if cfg.pops > 1 and cfg.flap_fraction > 0:
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
        return cls.build(
            cfg.pops, homes, flows, flaps, cfg.duration_s, cfg.handshake_s, cfg.ipv6_every
        )

    def route_at(self, client: int, t_s: float) -> int:
        """The PoP the client's packets land on at ``t_s``."""
        i = bisect.bisect_right(self._route_t[client], t_s) - 1
        return self._route_pop[client][max(i, 0)]

    def packets(self, flow: Flow) -> list[tuple[float, Packet]]:
        """The connection's packets inside the run: SYN, data, FIN (if it ends in time)."""
        out = [(flow.start_s, Packet.SYN)]
        out += [(t, Packet.DATA) for t in flow.data_s if t < self.duration_s]
        if flow.end_s < self.duration_s:
            out.append((flow.end_s, Packet.FIN))
        return out

    def baseline_break(self, flow: Flow) -> float | None:
        """Plain anycast: when the connection breaks (its first packet after the SYN that
        lands on another PoP than the SYN did), None if it never does."""
        home = self.route_at(flow.client, flow.start_s)
        for t, _ in self.packets(flow)[1:]:
            if self.route_at(flow.client, t) != home:
                return t
        return None


def _address(i: int, ipv6_every: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if ipv6_every and i % ipv6_every == ipv6_every - 1:
        return ipaddress.IPv6Address(CLIENT_V6_BASE | ((i + 1) << 64) | 0x7)
    return ipaddress.IPv4Address(CLIENT_V4_BASE + i + 1)


def _key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bytes:
    service: ipaddress.IPv4Address | ipaddress.IPv6Address = (
        SERVICE_V4 if isinstance(addr, ipaddress.IPv4Address) else SERVICE_V6
    )
    return FlowKey(6, addr, port, service, 443).to_bytes()
