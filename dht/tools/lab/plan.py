"""The lab's pure parts: the address plan and the schedule of a run, both from arguments
and a seed only (no I/O), so a run is replayed exactly and tested without root.

The topology (docs/lab.md#topology)::

    client --- router --+-- pop 0 --+
                        +-- pop 1 --+-- backbone (a bridge)
                        +-- pop 2 --+

The client has one source address per *route*; the router sends the service (anycast)
addresses of each route's source to one PoP (policy routing: ``from SRC lookup 200+r``)
and a route change replaces that one route. Every PoP answers the client itself (direct
server return), and reaches the other PoPs over the backbone (its ``bb0`` interface).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from dht.core.errors import ConfigError
from dht.tools.cluster import pop_names

SERVICE_V4 = "192.0.2.1"
SERVICE_V6 = "2001:db8::1"
ECHO_PORT = 7007
# Every PoP's node listens on its backbone address with these ports (one node per PoP:
# each PoP is its own namespace, so the same numbers never collide).
NODE_GRPC_PORT = 7100
NODE_ADMIN_PORT = 7101
NODE_PEER_PORT = 7102
METRICS_PORT = 9109
# Interface names inside the namespaces (names are per namespace).
CLIENT_IF = "eth0"
ROUTER_CLIENT_IF = "cl0"
POP_UPLINK_IF = "up0"
POP_BACKBONE_IF = "bb0"
BRIDGE = "br0"
# Routing tables of the router, one per route (the forwarder owns 100+J in the PoPs).
ROUTE_TABLE_BASE = 200
# The router's nft table of the handshake cases (docs/lab.md#handshake-cases).
NFT_SETS_TABLE = "dhtlab"
# Source ports of the connections the handshake cases pick (below the ephemeral range,
# so they never collide with the steady connections' ports).
SPECIAL_PORT_BASE = 20000

STEADY = "steady"
HANDSHAKE = "handshake"  # the route moves while the handshake is in flight
SYN_RETRY = "syn_retry"  # the client sends its SYN again, to the new PoP


@dataclass(frozen=True)
class PopAddresses:
    index: int
    name: str
    uplink_v4: str  # the PoP's end of its link to the router
    uplink_v6: str
    router_v4: str  # the router's end of it
    router_v6: str
    backbone_v4: str
    backbone_v6: str
    router_if: str  # the router's interface to this PoP
    bridge_port: str  # the backbone namespace's interface to this PoP


@dataclass(frozen=True)
class AddressPlan:
    """Every address and interface of a lab of ``len(pops)`` PoPs and ``routes`` routes."""

    pops: tuple[PopAddresses, ...]
    client_v4: tuple[str, ...]  # one source address per route
    client_v6: tuple[str, ...]
    router_client_v4: str = "10.90.0.1"
    router_client_v6: str = "fd90::1"

    def pop(self, name: str) -> PopAddresses:
        for p in self.pops:
            if p.name == name:
                return p
        raise KeyError(name)

    def route_commands(self, route: int, pop: int) -> list[str]:
        """``ip -batch`` lines that send ``route``'s service addresses to PoP ``pop``."""
        p = self.pops[pop]
        table = ROUTE_TABLE_BASE + route
        return [
            f"route replace {SERVICE_V4}/32 via {p.uplink_v4} table {table}",
            f"route replace {SERVICE_V6}/128 via {p.uplink_v6} table {table}",
        ]


def address_plan(n_pops: int, routes: int) -> AddressPlan:
    if not 2 <= n_pops <= 200:
        raise ConfigError("--pops must be within 2..200")
    if not 1 <= routes <= 200:
        raise ConfigError("--routes must be within 1..200")
    pops = tuple(
        PopAddresses(
            index=i,
            name=name,
            uplink_v4=f"10.91.{i}.2",
            uplink_v6=f"fd91:{i:x}::2",
            router_v4=f"10.91.{i}.1",
            router_v6=f"fd91:{i:x}::1",
            backbone_v4=f"10.92.0.{i + 1}",
            backbone_v6=f"fd92::{i + 1:x}",
            router_if=f"p{i}",
            bridge_port=f"p{i}",
        )
        for i, name in enumerate(pop_names(n_pops))
    )
    return AddressPlan(
        pops=pops,
        client_v4=tuple(f"10.90.0.{10 + r}" for r in range(routes)),
        client_v6=tuple(f"fd90::{10 + r:x}" for r in range(routes)),
    )


@dataclass(frozen=True)
class Conn:
    """One client connection: opened at ``open_s`` (steady ones) or by its flap."""

    id: int
    family: int  # 4 or 6
    route: int
    open_s: float
    kind: str = STEADY
    port: int = 0  # 0: the kernel picks (steady ones)
    flap: int = -1  # the index of the flap that opens it (the handshake cases)


@dataclass(frozen=True)
class Flap:
    """A route change: at ``at_s``, ``route``'s service addresses go to PoP ``pop``."""

    at_s: float
    route: int
    pop: int
    kind: str = STEADY


@dataclass(frozen=True)
class Schedule:
    seed: int
    pops: int
    routes: int
    initial: tuple[int, ...]  # the PoP of each route at the start
    conns: tuple[Conn, ...]
    flaps: tuple[Flap, ...]
    duration_s: float
    send_interval_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "pops": self.pops,
            "routes": self.routes,
            "initial": list(self.initial),
            "conns": [asdict(c) for c in self.conns],
            "flaps": [asdict(f) for f in self.flaps],
            "duration_s": self.duration_s,
            "send_interval_s": self.send_interval_s,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Schedule:
        conns = d["conns"]
        flaps = d["flaps"]
        initial = d["initial"]
        assert isinstance(conns, list) and isinstance(flaps, list)
        assert isinstance(initial, list)
        return cls(
            seed=int(str(d["seed"])),
            pops=int(str(d["pops"])),
            routes=int(str(d["routes"])),
            initial=tuple(int(x) for x in initial),
            conns=tuple(Conn(**c) for c in conns),
            flaps=tuple(Flap(**f) for f in flaps),
            duration_s=float(str(d["duration_s"])),
            send_interval_s=float(str(d["send_interval_s"])),
        )

    def moved(self) -> set[int]:
        """The connections whose route changes while they are open (or opening): the
        ones plain anycast breaks. A connection counts from its open time to the end."""
        out: set[int] = set()
        for f in self.flaps:
            for c in self.conns:
                if c.route != f.route:
                    continue
                opened = self.flaps[c.flap].at_s if c.flap >= 0 else c.open_s
                if c.kind == SYN_RETRY and c.flap >= 0 and self.flaps[c.flap] is f:
                    continue  # its SYN goes again to the new PoP: a fresh handshake there
                if opened <= f.at_s:
                    out.add(c.id)
        return out


# How long a handshake case takes: the SYN-ACK retransmitted after 1 s, and some margin.
SPECIAL_SPAN_S = 3.5


def make_schedule(
    seed: int,
    pops: int,
    connections: int,
    flaps: int,
    routes: int = 4,
    duration_s: float | None = None,
    ramp_s: float = 1.0,
    tail_s: float = 4.0,
    handshake_batch: int = 4,
    send_interval_s: float = 0.1,
) -> Schedule:
    """The connections and route changes of a run, from ``seed`` only.

    With ``flaps >= 2``, one flap (about a third of the way) moves a route while a batch
    of new connections is in its handshake, and one (two thirds) moves a route between
    a connection's first SYN and its retransmission. A handshake case's route is not
    moved again for ``SPECIAL_SPAN_S``, so each case shows one thing.
    """
    if pops < 2:
        raise ConfigError("--pops must be >= 2 (route changes move clients between PoPs)")
    if connections < 1 or flaps < 0:
        raise ConfigError("--connections must be >= 1 and --flaps >= 0")
    if routes < 1:
        raise ConfigError("--routes must be >= 1")
    rng = random.Random(seed)
    if duration_s is None:
        duration_s = ramp_s + 0.5 * flaps + tail_s
    span = duration_s - ramp_s - tail_s
    if span <= 0 and flaps:
        raise ConfigError(f"--duration {duration_s:g} leaves no time for route changes")
    initial = tuple(rng.randrange(pops) for _ in range(routes))
    conns = [
        Conn(id=i, family=4 if i % 2 == 0 else 6, route=i % routes, open_s=i * ramp_s / connections)
        for i in range(connections)
    ]
    special = {}
    if flaps >= 2:
        special = {flaps // 3: HANDSHAKE, max(flaps // 3 + 1, 2 * flaps // 3): SYN_RETRY}
    current = list(initial)
    busy_until = [0.0] * routes
    out: list[Flap] = []
    for k in range(flaps):
        at = ramp_s + (k + 0.5) * span / flaps
        kind = special.get(k, STEADY)
        free = [r for r in range(routes) if busy_until[r] <= at] or list(range(routes))
        route = rng.choice(free)
        pop = rng.choice([p for p in range(pops) if p != current[route]])
        current[route] = pop
        out.append(Flap(round(at, 3), route, pop, kind))
        if kind != STEADY:
            busy_until[route] = at + SPECIAL_SPAN_S
            n = handshake_batch if kind == HANDSHAKE else 2
            for j in range(n):
                conns.append(
                    Conn(
                        id=len(conns),
                        family=4 if j % 2 == 0 else 6,
                        route=route,
                        open_s=round(at, 3),
                        kind=kind,
                        port=SPECIAL_PORT_BASE + len(conns),
                        flap=k,
                    )
                )
    return Schedule(
        seed=seed,
        pops=pops,
        routes=routes,
        initial=initial,
        conns=tuple(conns),
        flaps=tuple(out),
        duration_s=round(duration_s, 3),
        send_interval_s=send_interval_s,
    )
