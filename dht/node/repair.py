"""Repair inside a PoP: hinted hand-off and anti-entropy.

Copies a replica missed are kept as hints, bounded per peer, and delivered when the peer
answers again. Anti-entropy compares per-partition digests with each peer and exchanges
the partitions that differ, so replicas converge after any fault, including a node that
was paused for a long time and comes back with old data (docs/protocol.md#anti-entropy).
Copies are only ever applied through the store's merge, so the order in which hints,
replication and anti-entropy deliver them does not matter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dht.core.peers import shared_partitions
from dht.core.placement import Member, PartitionMap
from dht.core.wire import ENTRY_DTYPE, ENTRY_SIZE, EntryArray
from dht.node.peerview import PeerView
from dht.node.stats import Stats
from dht.node.transport import LocalReplica, PeerTransport, PeerUnreachable

log = logging.getLogger(__name__)


@dataclass
class Hints:
    """Copies a peer missed, newest per key, at most ``limit`` per peer (beyond it they
    are dropped and left to anti-entropy, which repairs whatever hints do not)."""

    limit: int
    queued: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    dropped: int = 0
    delivered: int = 0

    def add(self, peer: str, entries: EntryArray) -> None:
        box = self.queued.setdefault(peer, {})
        raw = entries.tobytes()
        for off in range(0, len(raw), ENTRY_SIZE):
            key = raw[off : off + 40]
            if key not in box and len(box) >= self.limit:
                self.dropped += 1
                continue
            box[key] = raw[off + 40 : off + ENTRY_SIZE]

    def take(self, peer: str, n: int) -> bytes:
        box = self.queued.get(peer)
        if not box:
            return b""
        keys = list(box)[:n]
        return b"".join(k + box.pop(k) for k in keys)

    def count(self, peer: str) -> int:
        return len(self.queued.get(peer, ()))


class Repair:
    """Hints and anti-entropy of one node. Not thread-safe; lives in the node's loop."""

    def __init__(
        self,
        view: PeerView,
        transport: PeerTransport,
        local: LocalReplica,
        stats: Stats,
        *,
        hint_limit: int,
        batch_entries: int,
    ) -> None:
        self.view = view
        self.transport = transport
        self.local = local
        self.stats = stats
        self.hints = Hints(hint_limit)
        self.batch_entries = batch_entries

    def forget(self, peers: Sequence[str]) -> None:
        """Drop the hints of every peer not in ``peers`` (it left the table)."""
        for gone in set(self.hints.queued) - set(peers):
            self.hints.dropped += self.hints.count(gone)
            del self.hints.queued[gone]

    async def deliver_hints(self, member: Member) -> int:
        """Send the hints queued for ``member`` in batches; stop at the first failure."""
        sent = 0
        while self.hints.count(member.node_id) and self.view.is_up(member):
            raw = self.hints.take(member.node_id, self.batch_entries)
            try:
                await self.transport.replicate(member, raw, hinted=True)
            except PeerUnreachable as e:
                self.view.mark_failed(member, e)
                self.hints.add(member.node_id, np.frombuffer(raw, dtype=ENTRY_DTYPE))
                break
            n = len(raw) // ENTRY_SIZE
            self.hints.delivered += n
            sent += n
        if sent:
            log.info("delivered %d hinted copies to %s", sent, member.node_id)
        return sent

    async def sync_with(
        self,
        member: Member,
        push: bool = True,
        partitions: npt.NDArray[np.intp] | None = None,
        settled_only: bool = False,
    ) -> int:
        """Compare digests of the partitions shared with ``member``; for those that
        differ, pull its copies (and push ours). Returns the copies that changed a record
        here or there. ``settled_only``: leave out copies of recent coordinated writes
        (periodic anti-entropy, see dht.proto FetchRequest)."""
        if partitions is None:
            if member.node_id not in {m.node_id for m in self.view.pmap.members}:
                return 0  # it left the table while the round was under way
            partitions = shared_partitions(
                self.view.pmap, self.view.self_index, self.view.pmap.index_of(member.node_id)
            )
        shared = partitions
        if shared.size == 0:
            return 0
        theirs, _ = await self.transport.digests(member, shared)
        ours, _ = self.local.partition_digests()
        differ = shared[theirs != ours[shared]]
        if differ.size == 0:
            return 0
        applied = 0
        self.stats.ae_partitions_repaired += int(differ.size)
        async for raw in self.transport.fetch(member, differ, settled_only):
            self.stats.bytes_pulled += len(raw)
            got = self.local.merge_entries(np.frombuffer(raw, dtype=ENTRY_DTYPE)).applied
            self.stats.ae_records_repaired += got  # counted as applied (a later step may fail)
            applied += got
        if push:
            mine = self.local.export_entries(differ, settled_only)
            step = self.batch_entries
            for start in range(0, len(mine), step):
                chunk = mine[start : start + step].tobytes()
                self.stats.bytes_pushed += len(chunk)
                pushed = await self.transport.replicate(member, chunk, hinted=False)
                self.stats.ae_records_repaired += pushed.applied
                applied += pushed.applied
        return applied

    async def anti_entropy_round(
        self,
        push: bool = True,
        members: Sequence[Member] | None = None,
        partitions: Callable[[Member], npt.NDArray[np.intp]] | None = None,
        settled_only: bool = False,
    ) -> set[str]:
        """One round with each of ``members`` (default: every peer in the table) that is
        up, over ``partitions(member)`` (default: the partitions shared with it).
        Returns the node ids the round got through to."""
        done: set[str] = set()
        for member in self.view.peers() if members is None else members:
            if not self.view.is_up(member):
                continue
            parts = None if partitions is None else partitions(member)
            try:
                await self.sync_with(member, push, parts, settled_only)
            except PeerUnreachable as e:
                self.view.mark_failed(member, e)
                continue
            done.add(member.node_id)
        self.stats.ae_rounds += 1
        return done


def covered(
    table: PartitionMap,
    self_id: str,
    partitions: npt.NDArray[np.intp],
    took_part: set[str],
    need: int,
    dead: set[str],
) -> bool:
    """Did ``took_part`` include, for each of ``partitions``, ``need`` of its other
    replicas in ``table`` (fewer if the others are dead: their copies are gone)?"""
    if partitions.size == 0:
        return True
    ids = np.array([m.node_id for m in table.members], dtype=object)
    reps = ids[table.replicas[partitions]]  # (n, rf) node ids
    others = reps != self_id
    answered = np.isin(reps, np.array(sorted(took_part), dtype=object)) & others
    alive = ~np.isin(reps, np.array(sorted(dead), dtype=object)) & others
    want = np.minimum(need, alive.sum(axis=1))
    return bool((answered.sum(axis=1) >= want).all())
