"""What a node reports to /metrics about itself (the parts report through these)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.core import Metric

from dht.core import metrics as m
from dht.core.ingress import REASONS
from dht.core.membership import Membership
from dht.core.placement import PartitionMap
from dht.core.record import HybridClock
from dht.node.peerview import PeerView
from dht.node.repair import Repair
from dht.node.state import NodeState
from dht.node.stats import Stats
from dht.store.affinity import AffinityStore
from dht.store.flows import FlowStore


def store_gauges(
    store: FlowStore,
    affinity: AffinityStore,
    clock: HybridClock,
    ready: bool,
    in_sync: bool,
    pauses: int,
) -> Iterable[Metric]:
    """The records a node holds, and whether it serves."""
    counts = store.counts()
    yield m.gauge(
        "dht_records",
        "flow records held by this node, by address family and state",
        ["family", "state"],
        {k: float(v) for k, v in counts.items()},
    )
    yield m.gauge("dht_affinity_records", "client affinity records held", [], {(): len(affinity)})
    yield m.counter(
        "dht_expirations",
        "records purged after expiry",
        [],
        {(): store.expirations + affinity.expirations},
    )
    yield m.counter(
        "dht_refusals",
        "records refused, by reason (full/quota: new claims; hard: replicated copies and "
        "confirms at the hard ceiling; embryonic_copy: replicated embryonic copies there)",
        ["reason"],
        {(k,): v for k, v in store.refusals.items()},
    )
    yield m.counter(
        "dht_affinity_refusals",
        "affinity records refused, by reason (full: new SetAffinity prefixes past "
        "max_affinity_records; hard: copies from replicas and PoPs past the hard ceiling)",
        ["reason"],
        {(k,): v for k, v in affinity.refusals.items()},
    )
    yield m.counter(
        "dht_clock_offset_rejections", "remote HLC stamps rejected", [], {(): clock.rejected}
    )
    yield m.gauge("dht_ready", "1 when /readyz is ready", [], {(): 1.0 if ready else 0.0})
    yield m.gauge(
        "dht_in_sync", "1 once the node holds all its partitions", [], {(): float(in_sync)}
    )
    yield m.counter(
        "dht_pauses", "event-loop pauses detected (each starts a resync)", [], {(): pauses}
    )


def ingress_gauges(refused: Mapping[str, int]) -> Iterable[Metric]:
    """Copies (and terms) from other nodes and PoPs refused by the ingress checks
    (dht.core.ingress), by reason; every reason shows, at 0 until it happens."""
    counts: dict[tuple[str, ...], float] = {
        (r,): float(refused.get(r, 0)) for r in (*REASONS, "term")
    }
    yield m.counter(
        "dht_ingress_refused",
        "record copies from other nodes or PoPs refused by the ingress checks, and calls "
        "refused for a term out of range (reason term), by reason",
        ["reason"],
        counts,
    )


def replication_gauges(
    pmap: PartitionMap,
    state: NodeState,
    view: PeerView,
    repair: Repair,
    stats: Stats,
    rollbacks: int,
) -> Iterable[Metric]:
    """The table, the peers as this node sees them, and replication's counters."""
    yield m.gauge("dht_epoch", "partition table epoch", [], {(): float(pmap.epoch)})
    yield m.gauge(
        "dht_partitions",
        "partitions this node holds, as primary or any replica",
        ["role"],
        {
            ("primary",): float(pmap.partition_counts(0)[state.self_index]),
            ("replica",): float(state.replicas.sum()),
        },
    )
    # A peer that left this node's table (declared dead, or left) is no longer probed:
    # its health is the last seen, so it shows as down rather than up for ever.
    members = {mb.node_id for mb in view.pmap.members}
    peers: dict[tuple[str, ...], float] = {
        (n,): float(h.up and n in members) for n, h in view.health.items()
    }
    yield m.gauge(
        "dht_peer_up",
        "1 if the peer answers and is in this node's table (this node's view)",
        ["peer"],
        peers,
    )
    yield m.counter(
        "dht_peer_transitions",
        "peer up/down changes seen",
        ["peer"],
        {(n,): h.transitions for n, h in view.health.items()},
    )
    hints: dict[tuple[str, ...], float] = {(n,): float(repair.hints.count(n)) for n in view.health}
    yield m.gauge("dht_hints_queued", "copies queued for an unreachable replica", ["peer"], hints)
    yield m.counter(
        "dht_hints_delivered", "hinted copies delivered", [], {(): repair.hints.delivered}
    )
    yield m.counter(
        "dht_hints_dropped", "hints dropped at the per-peer limit", [], {(): repair.hints.dropped}
    )
    s = stats
    yield m.counter("dht_anti_entropy_rounds", "anti-entropy rounds", [], {(): s.ae_rounds})
    yield m.counter(
        "dht_anti_entropy_repaired_partitions",
        "partitions whose digests differed",
        [],
        {(): s.ae_partitions_repaired},
    )
    yield m.counter(
        "dht_anti_entropy_repaired_records",
        "copies that changed a record during anti-entropy",
        [],
        {(): s.ae_records_repaired},
    )
    yield m.counter(
        "dht_quorum_failures",
        "keys whose write did not reach the write quorum, by call",
        ["method"],
        {(op,): n for op, n in s.quorum_failures.items()},
    )
    yield m.counter(
        "dht_read_quorum_failures",
        "keys whose read quorum did not answer",
        [],
        {(): s.read_quorum_failures},
    )
    yield m.counter("dht_resyncs", "refills and resyncs started", [], {(): s.resyncs})
    yield m.counter(
        "dht_stale_writes", "writes a replica refused for their age", [], {(): s.stale_writes}
    )
    yield m.counter(
        "dht_fenced_writes",
        "writes a replica refused: another node took the partition over (a higher term)",
        [],
        {(): s.fenced_writes},
    )
    yield m.counter(
        "dht_superseded_writes",
        "keys of our writes not acknowledged because a replica held another claim "
        "of the key that wins (its copy is pulled in and the call retried once)",
        [],
        {(): s.superseded_writes},
    )
    yield m.counter(
        "dht_undone_copies",
        "copies of writes that missed their quorum, put back: by the coordinator in its "
        "own store, at its request by the replicas; or not: a replica did not answer, "
        "or left the copy standing (pulled back in by the coordinator)",
        ["where"],
        {
            ("coordinator",): rollbacks,
            ("replica",): s.undone_remote,
            ("unanswered",): s.undo_failures,
            ("left_standing",): s.undo_refused,
        },
    )
    yield m.counter(
        "dht_takeovers",
        "partitions this node took over as coordinator, by result",
        ["result"],
        {("ok",): s.takeovers, ("no_quorum",): s.takeover_failures},
    )
    yield m.counter(
        "dht_streamed_bytes",
        "record copies streamed by anti-entropy, refill and hand-off",
        ["direction"],
        {("pulled",): s.bytes_pulled, ("pushed",): s.bytes_pushed},
    )


def membership_gauges(membership: Membership, ping_req_refused: int) -> Iterable[Metric]:
    """Gossip this node ignored (docs/protocol.md#membership), and its view's size."""
    refused: dict[tuple[str, ...], float] = {(k,): float(v) for k, v in membership.refused.items()}
    refused[("ping_req_target",)] = float(ping_req_refused)
    yield m.counter(
        "dht_gossip_refused",
        "gossiped member states ignored, by reason (incarnation: out of range; unknown: "
        "a rumour about a node never admitted; full: past max_members), and indirect "
        "probes refused (ping_req_target: not a member of this view at that address)",
        ["reason"],
        refused,
    )
    yield m.counter(
        "dht_members_forgotten",
        "DEAD and LEFT members forgotten after member_forget_s",
        [],
        {(): float(membership.forgotten)},
    )


def undo_gauges(refused: Mapping[str, int], replaced: int) -> Iterable[Metric]:
    """Undo entries this replica left standing because the caller may not undo them, and
    failed writes' copies a later write replaced here."""
    yield m.counter(
        "dht_replaced_failed_copies",
        "claims a failed coordinated write left here (still open to its undo) that a "
        "later coordinated write of another claim replaced (docs/protocol.md#undo)",
        [],
        {(): float(replaced)},
    )
    yield m.counter(
        "dht_undo_refused",
        "undo entries refused and left standing, by reason (not_member: the caller is "
        "not a member of the tables in force; term: above the term promised here; "
        "not_writer: no copy the caller wrote here is still open to an undo)",
        ["reason"],
        {(k,): float(v) for k, v in refused.items()},
    )
