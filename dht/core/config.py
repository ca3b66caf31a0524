"""Node configuration: one validated, frozen object (docs/operations.md#configuration).

Sources, later wins: the profile's defaults, a TOML file (``--config``), command-line
flags. Units are in the field names. Every default says why it is what it is.

Example file (all keys optional except ``node_id`` and ``pop``)::

    node_id = "ams-1"
    pop = "ams"
    host = "127.0.0.1"
    grpc_port = 7101     # the public plane (forwarders)
    peer_port = 9101     # the peer plane (other nodes, other PoPs)
    admin_port = 8101
    replication_factor = 3
    [pops]               # PoP name -> small integer id used on the wire
    ams = 1
    fra = 2
    [[peers]]            # nodes of this PoP known in advance (more by gossip)
    node_id = "ams-2"
    address = "127.0.0.1:7102"
    admin_address = "127.0.0.1:8102"
    peer_address = "127.0.0.1:9102"
    [pop_peers]          # peer-plane addresses of the other PoPs' nodes (shipping)
    fra = ["127.0.0.1:9201", "127.0.0.1:9202"]
    [dial_via]           # dial this address instead of that one (a proxy in the path)
    "127.0.0.1:9201" = "127.0.0.1:9901"
    [ttl]
    embryonic_s = 10
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dht.core.errors import ConfigError
from dht.core.placement import DEFAULT_PARTITIONS, DEFAULT_VNODES, Member
from dht.core.record import TtlPolicy

PROFILES = ("local", "docker", "test")


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Capacity and quota of one node's store (docs/protocol.md#capacity-and-quota).

    ``max_records``: new embryonic claims are refused (REFUSED_FULL) at this many records.
    ``hard_max_records``: replicated records (and confirms that would create a record) are
    refused past this; the node then reports not-ready.
    ``max_affinity_records``: new SetAffinity entries are refused (REFUSED_FULL) at this
    many affinity records; ``hard_max_affinity_records``: affinity copies from replicas and
    other PoPs are refused (counted) past this.
    ``embryonic_quota_per_prefix``: embryonic records per client prefix (/prefix_v4 of an
    IPv4 client, /prefix_v6 of an IPv6 client) in the PoP, records confirms created within
    an embryonic TTL included, so a SYN flood cannot fill the table.
    """

    max_records: int = 5_000_000
    hard_max_records: int = 6_000_000
    # One record per client prefix (/32 by default) with a preferred PoP: ~300 bytes each
    # in the dict layout, so 1M ~ 300 MB, the order of the flow table's 5M x 72 bytes.
    # The hard ceiling leaves room for copies from replicas and PoPs past the soft one.
    max_affinity_records: int = 1_000_000
    hard_max_affinity_records: int = 1_200_000
    embryonic_quota_per_prefix: int = 1000
    prefix_v4: int = 32
    prefix_v6: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.max_records <= self.hard_max_records:
            raise ConfigError("store limits: want 0 <= max_records <= hard_max_records")
        if not 0 <= self.max_affinity_records <= self.hard_max_affinity_records:
            raise ConfigError(
                "store limits: want 0 <= max_affinity_records <= hard_max_affinity_records"
            )
        if self.embryonic_quota_per_prefix < 0:
            raise ConfigError("store limits: embryonic_quota_per_prefix must be >= 0")
        if not (0 <= self.prefix_v4 <= 32 and 0 <= self.prefix_v6 <= 128):
            raise ConfigError("store limits: prefix_v4 must be 0..32 and prefix_v6 0..128")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """PEM files. With ``ca_file`` the server requires client certificates (mutual TLS)
    and clients verify the server against it."""

    cert_file: str
    key_file: str
    ca_file: str | None = None


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    pop: str
    # PoP name -> wire id (1..65535). Every PoP a request may name must be listed.
    pops: Mapping[str, int] = field(default_factory=dict)
    # Where to listen; port 0 = pick a free port (tests, `dht cluster`).
    host: str = "127.0.0.1"
    # The public plane: FlowTable, health, reflection (docs/security.md#planes).
    grpc_port: int = 0
    # The peer plane: NodeInternal, PopLink and forwards between nodes, for nodes only.
    peer_port: int = 0
    # -1 disables the admin endpoint.
    admin_port: int = 0
    # UDP lookup listener (dht.edge.udp): one datagram per cache miss instead of a gRPC
    # call, for the lowest latency. -1 = off (default: it is plaintext, so opt in where
    # forwarders live), 0 = the gRPC port's number (clients find it without configuration),
    # N = that port. Refused together with TLS (it has none).
    udp_lookup_port: int = -1
    # Datagrams the UDP listener answers through the full path (quorum read, forward) at
    # once; beyond this they are dropped and counted (dht_requests_total{method=
    # "UdpLookup",code="DROPPED"}), so a flood of keys the node cannot answer alone costs
    # bounded memory. 1024 is ~100x what a forwarder has in flight at a cache miss rate
    # of 100k/s answered in ~1 ms.
    udp_max_inflight: int = 1024
    # The host other nodes and clients dial; defaults to ``host`` (set it when listening
    # on 0.0.0.0, e.g. the docker profile).
    advertise_host: str | None = None
    # Nodes of this PoP known in advance (assumed alive until they say otherwise).
    peers: tuple[Member, ...] = ()
    # Peer-plane addresses of running nodes to join through (their ids are learned).
    seeds: tuple[str, ...] = ()
    # 4096 partitions: fine-grained enough that a node's share is within a few percent
    # of the mean with 256 vnodes, small enough that the table is 24 KiB at rf 3.
    num_partitions: int = DEFAULT_PARTITIONS
    # Copies of each partition inside the PoP (capped at the node count).
    replication_factor: int = 3
    vnodes: int = DEFAULT_VNODES
    ttl: TtlPolicy = field(default_factory=TtlPolicy)
    limits: StoreLimits = field(default_factory=StoreLimits)
    # 10k keys * 40 bytes = 400 KB, far below gRPC's 4 MiB default message limit.
    max_batch_keys: int = 10_000
    # Remote HLC stamps further ahead than this are rejected; tombstones outlive the
    # records they end by this much.
    max_clock_offset_ms: int = 500
    # Expiry purge: a slice of the table every interval, never the whole table at once.
    purge_interval_s: float = 0.5
    purge_budget: int = 50_000
    # Acknowledged = held by this many replicas. None = a majority of the replicas.
    write_quorum: int | None = None
    # Bound on one node-to-node call (replication, quorum read, probe answer): no request
    # waits on a dead or paused node longer than this.
    rpc_timeout_ms: int = 1_000
    # Bound on a forwarded (one-hop) call to the coordinating node, which may itself do a
    # quorum read and a quorum write: more than twice rpc_timeout_ms.
    forward_timeout_ms: int = 3_000
    # Failure detection: every peer is pinged each probe interval; one that has not
    # answered for failure_timeout_s (or refused a connection) is routed around until it
    # answers again. 1 s / 3 s detects a dead node in ~3 s without flapping on a stall.
    probe_interval_s: float = 1.0
    probe_timeout_ms: int = 500
    failure_timeout_s: float = 3.0
    # SWIM: a member that misses a direct probe is probed through this many others, then
    # suspected; it has suspicion_timeout_s to refute before it is declared dead and its
    # partitions move. Detection of a dead node ~ failure probe + suspicion: ~5-6 s with
    # these defaults (memberlist's LAN profile: 4-5 s), ~2-3 s with the test profile.
    indirect_probes: int = 2
    suspicion_timeout_s: float = 5.0
    # DEAD and LEFT members are remembered this long (so an old rumour cannot bring them
    # back), then forgotten (the view stays bounded). Far longer than a pause or a cut a
    # node comes back from with its old incarnation: nodes forget at slightly different
    # times, and one still holding the tombstone would make the returning member flap.
    # 0 = 10 x suspicion_timeout_s.
    member_forget_s: float = 600.0
    # At most this many members (tombstones included) in a node's view; gossip naming
    # more is ignored and counted (dht_gossip_refused_total{reason="full"}).
    max_members: int = 1024
    # A graceful leave (SIGTERM) hands the node's partitions off for at most this long.
    leave_timeout_s: float = 30.0
    # Copies of partitions this node no longer replicates are dropped once the table has
    # been stable this long: far longer than a hand-off takes, so a new replica still
    # pulling finds them.
    handoff_grace_s: float = 120.0
    # Digests compared with every peer this often; differing partitions are exchanged.
    anti_entropy_interval_s: float = 10.0
    # Copies kept for an unreachable replica (per peer); beyond this anti-entropy repairs.
    hint_limit: int = 200_000
    # An event-loop gap this long means this process was paused (SIGSTOP, VM stall): it
    # may have missed writes, so it resyncs before answering from its own copy again.
    pause_threshold_ms: int = 1_500
    # Shed calls from the client plane (RESOURCE_EXHAUSTED, "overloaded") while the event
    # loop runs more than this far behind: admitted work keeps a bounded latency instead
    # of every call waiting in a queue (dht.node.overload). 0 = never shed.
    overload_lag_ms: int = 500
    # Graceful stop: in-flight calls get this long before they are cancelled.
    shutdown_grace_s: float = 5.0
    # ---- several PoPs (dht.pops.extension, docs/protocol.md#shipping-between-pops)
    # The other PoPs' nodes: PoP name -> peer-plane addresses. Empty = a PoP on its own.
    pop_peers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Dial the value instead of the key (a proxy, a NAT): per-peer address overrides, for
    # this PoP's other nodes and the other PoPs' nodes alike (peer-plane addresses).
    dial_via: Mapping[str, str] = field(default_factory=dict)
    # An established record is shipped once it is this old (its birth): 0 ships every
    # confirmed flow at once; more keeps short flows in their PoP (less traffic) at the
    # price of a window in which another PoP cannot find the flow
    # (docs/protocol.md#the-replicate-after-trade-off).
    replicate_after_s: float = 0.0
    # Records per shipped batch, and how long a write may wait for its batch to fill:
    # 20 ms adds little lag and lets a busy node send a few large batches instead of many
    # small ones.
    ship_batch_records: int = 2_000
    ship_interval_ms: int = 20
    # Records waiting or in flight per peer PoP (the resend buffer). Beyond it writes
    # are not queued and the peer is repaired by a bulk resync once it answers again.
    ship_buffer_records: int = 200_000
    # Digests of shipped records compared with every other PoP this often (per node, its
    # primary partitions); differing partitions are exchanged both ways.
    pop_anti_entropy_interval_s: float = 30.0
    # A node that starts resyncs from the other PoPs before /readyz says ready, but waits
    # at most this long for them (a PoP started alone, or all PoPs at once).
    pop_resync_timeout_s: float = 10.0
    # A Lookup with second_chance set asks the other PoPs about flows this PoP holds no
    # record of, and waits at most this long for them: a few inter-PoP round trips,
    # far below a TCP retransmission (docs/protocol.md#second-chance).
    second_chance_timeout_s: float = 0.15
    # A confirmed claim makes the claiming PoP the client prefix's preferred PoP.
    affinity_on_confirm: bool = True
    # A flow lookup that finds nothing returns the client's preferred PoP, flagged.
    affinity_fallback: bool = True
    # Mutual TLS on every plane (docs/security.md): callers are who their certificates
    # say, and may do what their role allows.
    tls: TlsConfig | None = None
    # Serve plaintext on a non-loopback address anyway (refused otherwise: without TLS
    # anyone who reaches a port can change ownership).
    insecure: bool = False
    # Required (as "Authorization: Bearer TOKEN") by mutating admin calls; None disables
    # them.
    admin_token: str | None = None
    profile: str = "local"

    def __post_init__(self) -> None:
        validate(self)

    @property
    def pop_id(self) -> int:
        return self.pops[self.pop]

    @property
    def advertised(self) -> str:
        return self.advertise_host or self.host

    def pop_name(self, pop_id: int) -> str | None:
        for name, i in self.pops.items():
            if i == pop_id:
                return name
        return None


def validate(cfg: NodeConfig) -> None:
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if not cfg.node_id:
        bad("node_id must not be empty")
    if not cfg.pops:
        bad("pops must name at least this node's PoP")
    if cfg.pop not in cfg.pops:
        bad(f"pop {cfg.pop!r} is not in pops {dict(cfg.pops)}")
    ids = list(cfg.pops.values())
    if len(set(ids)) != len(ids):
        bad(f"pop ids must be unique: {dict(cfg.pops)}")
    for name, i in cfg.pops.items():
        if not 1 <= i <= 65535:
            bad(f"pop id for {name!r} is {i}: want 1..65535")
    if cfg.peer_port < 0 or cfg.peer_port > 65535:
        bad(f"peer_port {cfg.peer_port} outside 0..65535")
    if cfg.peer_port and cfg.peer_port in (cfg.grpc_port, cfg.admin_port):
        bad(f"peer_port {cfg.peer_port} must differ from grpc_port and admin_port")
    for name, port in (("grpc_port", cfg.grpc_port), ("admin_port", cfg.admin_port)):
        if not -1 <= port <= 65535:
            bad(f"{name} {port} outside 0..65535 (-1 disables admin)")
    if not -1 <= cfg.udp_lookup_port <= 65535:
        bad(f"udp_lookup_port {cfg.udp_lookup_port} outside -1..65535 (-1 off, 0 = gRPC port)")
    if cfg.tls is None and not cfg.insecure and not is_loopback(cfg.host):
        bad(
            f"refusing to serve plaintext on {cfg.host} (not a loopback address): configure "
            "tls (dht certs, docs/security.md) or pass --insecure"
        )
    if cfg.tls is not None and not cfg.tls.ca_file:
        bad("tls needs ca_file: every caller presents a certificate of the cluster's CA")
    if cfg.udp_lookup_port >= 0 and cfg.tls is not None:
        bad("udp_lookup_port cannot be combined with TLS: the UDP listener is plaintext")
    if cfg.udp_max_inflight < 1:
        bad("udp_max_inflight must be >= 1")
    if cfg.overload_lag_ms < 0:
        bad("overload_lag_ms must be >= 0 (0: never shed)")
    if cfg.replication_factor < 1:
        bad("replication_factor must be >= 1")
    if not 1 <= cfg.num_partitions <= 65535:
        bad("num_partitions must be in 1..65535")
    if not 1 <= cfg.max_batch_keys <= 50_000:
        bad("max_batch_keys must be in 1..50000 (50k keys = 2 MB, half gRPC's message limit)")
    t = cfg.ttl
    if t.embryonic_ms < 1_000:
        bad("ttl.embryonic_s must be >= 1 (>= 10 s in production, docs/protocol.md#time-to-live)")
    if not 0 < t.min_ms <= t.max_ms:
        bad("ttl bounds need 0 < min_s <= max_s")
    lim = cfg.limits
    if lim.max_records > lim.hard_max_records:
        bad("limits.max_records must not exceed limits.hard_max_records")
    if not 0 <= lim.prefix_v4 <= 32 or not 0 <= lim.prefix_v6 <= 128:
        bad("affinity/quota prefixes: prefix_v4 in 0..32, prefix_v6 in 0..128")
    # With seeds the node count is learned later; only the configured factor bounds W.
    replicas = (
        cfg.replication_factor if cfg.seeds else min(cfg.replication_factor, 1 + len(cfg.peers))
    )
    if cfg.write_quorum is not None and not 1 <= cfg.write_quorum <= replicas:
        bad(
            f"write_quorum {cfg.write_quorum} is impossible with {replicas} replicas "
            f"(replication_factor {cfg.replication_factor}, {1 + len(cfg.peers)} nodes): "
            f"want 1..{replicas}"
        )
    if cfg.forward_timeout_ms <= 2 * cfg.rpc_timeout_ms:
        bad("forward_timeout_ms must exceed 2 * rpc_timeout_ms (a forward may read and write)")
    if cfg.failure_timeout_s * 1000 <= cfg.probe_timeout_ms:
        bad("failure_timeout_s must exceed probe_timeout_ms")
    if cfg.member_forget_s < 0:
        bad("member_forget_s must be >= 0 (0 = 10 x suspicion_timeout_s)")
    peer_ids = [p.node_id for p in cfg.peers]
    if cfg.max_members < len(peer_ids) + 1:
        bad(f"max_members ({cfg.max_members}) must hold this node and its {len(peer_ids)} peers")
    if cfg.node_id in peer_ids:
        bad(f"peers must not include this node ({cfg.node_id})")
    if len(set(peer_ids)) != len(peer_ids):
        bad(f"duplicate peer ids: {peer_ids}")
    for name, addresses in cfg.pop_peers.items():
        if name not in cfg.pops:
            bad(f"pop_peers: PoP {name!r} is not in pops {dict(cfg.pops)}")
        if name == cfg.pop:
            bad(f"pop_peers: {name!r} is this node's own PoP (its nodes go in peers)")
        if not addresses or not all(":" in a for a in addresses):
            bad(f"pop_peers.{name}: want one or more HOST:PORT addresses, got {addresses}")
    if cfg.replicate_after_s < 0:
        bad("replicate_after_s must be >= 0")
    if not 1 <= cfg.ship_batch_records <= 20_000:
        bad("ship_batch_records must be in 1..20000 (20k records = 1.4 MB per batch)")
    if cfg.ship_buffer_records < cfg.ship_batch_records:
        bad("ship_buffer_records must be at least ship_batch_records")
    if cfg.ship_interval_ms < 1 or cfg.pop_anti_entropy_interval_s <= 0:
        bad("ship_interval_ms and pop_anti_entropy_interval_s must be positive")
    if not 0 < cfg.second_chance_timeout_s <= 5:
        bad("second_chance_timeout_s must be in (0, 5] seconds")
    if cfg.profile not in PROFILES:
        bad(f"profile {cfg.profile!r}: want one of {PROFILES}")


def _profile_defaults(profile: str) -> dict[str, Any]:
    if profile == "docker":
        # Listen on every interface of the container; peers dial the service name.
        return {"host": "0.0.0.0", "grpc_port": 7000, "admin_port": 8000, "peer_port": 9000}
    if profile == "test":
        # Short purge interval so expiry is observable quickly; generous forward timeout
        # as slack for stalls of a few hundred ms on 2-core CI machines.
        # Fast probes and anti-entropy so faults heal within a test's time, with slack
        # (timeouts, failure and pause thresholds) for stalls of a few hundred ms on
        # 2-core CI machines.
        return {
            "purge_interval_s": 0.1,
            "shutdown_grace_s": 2.0,
            "rpc_timeout_ms": 2_000,
            "forward_timeout_ms": 5_000,
            "probe_interval_s": 0.2,
            "probe_timeout_ms": 1_000,
            "failure_timeout_s": 2.0,
            "anti_entropy_interval_s": 1.0,
            "pause_threshold_ms": 1_000,
            # Tests assert availability through stalls of a few hundred ms: no shedding
            # (tests/integration/test_overload.py turns it on).
            "overload_lag_ms": 0,
            "suspicion_timeout_s": 2.0,
            "leave_timeout_s": 10.0,
            "handoff_grace_s": 10.0,
            "pop_anti_entropy_interval_s": 2.0,
            "pop_resync_timeout_s": 5.0,
        }
    return {}


_TTL_KEYS = {
    "embryonic_s": "embryonic_ms",
    "established_tcp_s": "established_tcp_ms",
    "established_udp_s": "established_udp_ms",
    "min_s": "min_ms",
    "max_s": "max_ms",
}


def build_config(values: Mapping[str, Any]) -> NodeConfig:
    """Build a NodeConfig from plain values (a parsed TOML file merged with flags).

    Accepts ``ttl`` as a table of ``*_s`` seconds, ``limits`` as a table, ``peers`` as a
    list of tables or ``id=host:port`` strings, ``tls`` as a table."""
    v = dict(_profile_defaults(str(values.get("profile", "local"))))
    v.update({k: val for k, val in values.items() if val is not None})
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    unknown = sorted(set(v) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    if "node_id" not in v or "pop" not in v:
        raise ConfigError("node_id and pop are required")
    if not v.get("pops"):
        v["pops"] = {v["pop"]: 1}
    v["pops"] = {str(k): int(i) for k, i in dict(v["pops"]).items()}
    v["peers"] = tuple(parse_peer(p) for p in v.get("peers", ()))
    v["seeds"] = tuple(str(a) for a in v.get("seeds", ()))
    v["pop_peers"] = parse_pop_peers(v.get("pop_peers", {}))
    v["dial_via"] = parse_dial_via(v.get("dial_via", {}))
    max_offset = int(v.get("max_clock_offset_ms", 500))
    ttl_in = v.get("ttl", {})
    if isinstance(ttl_in, Mapping):
        ttl_fields: dict[str, int] = {}
        for key, val in ttl_in.items():
            if key not in _TTL_KEYS:
                raise ConfigError(f"unknown ttl key {key!r}: want {sorted(_TTL_KEYS)}")
            ttl_fields[_TTL_KEYS[key]] = round(float(val) * 1000)
        v["ttl"] = TtlPolicy(tombstone_extra_ms=max_offset, **ttl_fields)
    lim_in = v.get("limits", {})
    if isinstance(lim_in, Mapping):
        try:
            v["limits"] = StoreLimits(**dict(lim_in))
        except TypeError as e:
            raise ConfigError(f"limits: {e}") from None
    tls_in = v.get("tls")
    if isinstance(tls_in, Mapping):
        v["tls"] = TlsConfig(**dict(tls_in))
    return NodeConfig(**v)


def parse_pop_peers(spec: Any) -> dict[str, tuple[str, ...]]:
    """Other PoPs' nodes: a table {name = [addr, ...]} or "NAME=ADDR[,ADDR...]" strings."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for text in spec:
            name, sep, rest = str(text).partition("=")
            if not sep or not name or not rest:
                raise ConfigError(f"pop peer {text!r}: want NAME=HOST:PORT[,HOST:PORT...]")
            items.append((name, rest.split(",")))
    out: dict[str, tuple[str, ...]] = {}
    for name, given in items:
        addresses = given.split(",") if isinstance(given, str) else given
        out.setdefault(str(name), ())
        out[str(name)] += tuple(str(a).strip() for a in addresses if str(a).strip())
    return out


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_dial_via(spec: Any) -> dict[str, str]:
    """Address overrides: a table {"addr" = "via"} or "ADDR=VIA" strings."""
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    out = {}
    for text in spec:
        address, sep, via = str(text).partition("=")
        if not sep or ":" not in address or ":" not in via:
            raise ConfigError(f"dial via {text!r}: want HOST:PORT=HOST:PORT")
        out[address] = via
    return out


def parse_peer(spec: Any) -> Member:
    """A peer as a table {node_id, address, admin_address, peer_address} or
    "id=host:port[,admin_host:port[,peer_host:port]]"."""
    if isinstance(spec, Member):
        return spec
    if isinstance(spec, Mapping):
        try:
            return Member(
                str(spec["node_id"]),
                str(spec["address"]),
                str(spec.get("admin_address", "")),
                str(spec.get("peer_address", "")),
            )
        except KeyError as e:
            raise ConfigError(f"peer {dict(spec)} lacks {e}") from None
    text = str(spec)
    node_id, sep, rest = text.partition("=")
    parts = rest.split(",")
    if not sep or not node_id or not rest or len(parts) > 3:
        raise ConfigError(f"peer {text!r}: want ID=HOST:PORT[,ADMIN_HOST:PORT[,PEER_HOST:PORT]]")
    address, admin, peer = [*parts, "", ""][:3]
    return Member(node_id, address, admin, peer)


def load_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
