"""Counters of a node's replication, read by its gauges (dht.node.gauges)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    quorum_failures: dict[str, int] = field(default_factory=dict)
    read_quorum_failures: int = 0
    ae_rounds: int = 0
    ae_partitions_repaired: int = 0
    ae_records_repaired: int = 0
    resyncs: int = 0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    stale_writes: int = 0
    fenced_writes: int = 0  # our writes a replica refused: another coordinator took over
    takeovers: int = 0  # partitions this node took over (promise quorum reached)
    takeover_failures: int = 0  # partitions whose promise quorum was not reached
    undone_remote: int = 0  # copies replicas put back when our write missed its quorum
    undo_failures: int = 0  # copies whose undo a replica did not answer
    undo_refused: int = 0  # copies a replica left standing (pulled back in here)
    superseded_writes: int = 0  # our writes a replica held another, winning claim of
