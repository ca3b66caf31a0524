"""The agent's configuration: one validated, frozen object, built from the command line
(docs/forwarder.md#the-command). Pure: no I/O."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dht.core.errors import ConfigError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Interface names: what the kernel accepts (IFNAMSIZ - 1), no spaces or quotes, so the
# name is safe inside the generated nft ruleset.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class NextHop:
    """Where packets of flows owned by ``pop`` go: its backbone address."""

    pop: str
    address: Address


@dataclass(frozen=True)
class AgentConfig:
    pop: str
    # This PoP's dht nodes (gRPC HOST:PORT), for ``Forwarder.open``.
    nodes: tuple[str, ...]
    # The anycast service addresses served in this namespace (IPv4 and/or IPv6).
    services: tuple[Address, ...]
    next_hops: tuple[NextHop, ...]
    # The interface facing the other PoPs: a service packet arriving on it was tunnelled.
    backbone_if: str
    queue_num: int = 0
    # 0: no /metrics endpoint.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    insecure: bool = False
    certs_dir: str | None = None
    # A pin toward this PoP (a connection held here) lives this long without being
    # re-armed; the keep-alive round re-arms the pins of flows still in conntrack, and
    # conntrack's DESTROY removes them. 300 s: the server's default established TTL.
    pin_timeout_s: float = 300.0
    # The cache's owner-change bound (CacheLimits.owner_ttl_s): a pin toward another PoP
    # lives at most this long, then the next packet asks again.
    owner_ttl_s: float = 5.0
    # docs/api.md#keep-alive: records this PoP owns are refreshed when they would expire
    # within refresh_ahead_s; keep-alive rounds run every keepalive_interval_s (<= A / 2).
    refresh_ahead_s: float = 60.0
    keepalive_interval_s: float = 2.5
    # Pin updates wait at most this long to share one `nft` process.
    pin_batch_ms: float = 5.0

    def __post_init__(self) -> None:
        if not self.pop:
            raise ConfigError("--pop must name this PoP")
        if not self.nodes:
            raise ConfigError("--nodes: want at least one HOST:PORT")
        for n in self.nodes:
            m = _HOST_PORT.match(n)
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise ConfigError(f"--nodes: {n!r} is not HOST:PORT")
        if not self.services:
            raise ConfigError("--service: want at least one address")
        if not _IFNAME.match(self.backbone_if):
            raise ConfigError(f"--backbone-if: {self.backbone_if!r} is not an interface name")
        if not 0 <= self.queue_num <= 65535:
            raise ConfigError(f"--queue-num {self.queue_num}: want 0..65535")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port}: want 0..65535")
        for name, value in (
            ("--pin-timeout-s", self.pin_timeout_s),
            ("--owner-ttl-s", self.owner_ttl_s),
            ("--refresh-ahead-s", self.refresh_ahead_s),
            ("--keepalive-s", self.keepalive_interval_s),
        ):
            if not 1.0 <= value <= 86_400.0:
                raise ConfigError(f"{name} {value}: want 1..86400 seconds")
        if self.keepalive_interval_s > self.refresh_ahead_s / 2:
            # docs/api.md#keep-alive: I <= A / 2 leaves room for one failed round.
            raise ConfigError("--keepalive-s must be at most half of --refresh-ahead-s")
        if not 0 <= self.pin_batch_ms <= 1000:
            raise ConfigError(f"pin batch window {self.pin_batch_ms} ms: want 0..1000")
        seen: set[tuple[str, int]] = set()
        for h in self.next_hops:
            if h.pop == self.pop:
                raise ConfigError(f"--next-hop {h.pop}: that is this PoP")
            if (h.pop, h.address.version) in seen:
                raise ConfigError(f"--next-hop {h.pop}: given twice for IPv{h.address.version}")
            seen.add((h.pop, h.address.version))

    def services_of(self, version: int) -> list[Address]:
        return [s for s in self.services if s.version == version]

    def hops_of(self, version: int) -> list[NextHop]:
        return [h for h in self.next_hops if h.address.version == version]


def parse_service(text: str) -> Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"--service {text!r}: not an IPv4 or IPv6 address") from None


def parse_next_hop(text: str) -> NextHop:
    pop, sep, addr = text.partition("=")
    if not sep or not pop.strip():
        raise ConfigError(f"--next-hop {text!r}: want POP=ADDR")
    try:
        return NextHop(pop.strip(), ipaddress.ip_address(addr.strip()))
    except ValueError:
        raise ConfigError(f"--next-hop {text!r}: {addr!r} is not an address") from None


def parse_nodes(texts: Sequence[str]) -> tuple[str, ...]:
    """``--nodes`` may be given comma-separated and/or more than once."""
    return tuple(n.strip() for t in texts for n in t.split(",") if n.strip())
