"""Which peers are up, and so which replica coordinates each partition (pure).

This is the fast, local view used for routing (membership, in dht.core.membership, decides
who is in the partition table). A peer is *up* until it has not answered for
``failure_timeout_ms`` (probes) or a data-path call found it unreachable (connection
refused: a dead process is routed around at once, not after the timeout). One
successful probe brings it back up.

The coordinator of a partition is its first replica that is up (primary first). A
coordinator other than an in-sync primary reads a quorum before it decides
(docs/protocol.md#routing: one replica's miss is not NOT_FOUND), so any replica may
coordinate safely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dht.core.placement import PartitionMap


@dataclass
class PeerHealth:
    """One peer's health as this node sees it. Times are monotonic milliseconds."""

    up: bool = True
    last_ok_ms: int = 0
    failures: int = 0
    transitions: int = 0

    def success(self, now_ms: int) -> bool:
        """Record an answer. True if the peer just came back up."""
        self.last_ok_ms = now_ms
        self.failures = 0
        if not self.up:
            self.up = True
            self.transitions += 1
            return True
        return False

    def failure(
        self, now_ms: int, failure_timeout_ms: int, unreachable: bool = False, started_ms: int = 0
    ) -> bool:
        """Record a failed call that started at ``started_ms``. ``unreachable`` =
        refused, not merely slow. A call older than the last answer is stale news and is
        ignored. True if the peer just went down."""
        if started_ms and started_ms < self.last_ok_ms:
            return False
        self.failures += 1
        if self.up and (unreachable or now_ms - self.last_ok_ms >= failure_timeout_ms):
            self.up = False
            self.transitions += 1
            return True
        return False


def coordinators(pmap: PartitionMap, up: npt.NDArray[np.bool_]) -> npt.NDArray[np.int16]:
    """Per partition, the index of its first replica that is up, or -1 if none is."""
    alive = up[pmap.replicas]  # (partitions, rf)
    first = np.argmax(alive, axis=1)
    picked: npt.NDArray[np.int16] = pmap.replicas[np.arange(pmap.num_partitions), first].astype(
        np.int16
    )
    picked[~alive.any(axis=1)] = -1
    return picked


def replica_mask(pmap: PartitionMap, member: int) -> npt.NDArray[np.bool_]:
    """Per partition: is ``member`` one of its replicas?"""
    mask: npt.NDArray[np.bool_] = (pmap.replicas == member).any(axis=1)
    return mask


def shared_partitions(pmap: PartitionMap, a: int, b: int) -> npt.NDArray[np.intp]:
    """Partitions both members replicate (what they compare in anti-entropy)."""
    return np.flatnonzero(replica_mask(pmap, a) & replica_mask(pmap, b))


def read_quorum(replicas: int, write_quorum: int) -> int:
    """The smallest R with R + W > RF."""
    return max(1, replicas - write_quorum + 1)
