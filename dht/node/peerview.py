"""This node's view of the other nodes of its PoP: which are up, which table each uses,
and so which replica coordinates each partition and whose quorums a write must reach.

Shared by the parts that call peers (dht.node.replication, dht.node.repair, the write
path and liveness). Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from dht.core.clock import MonoMs
from dht.core.peers import PeerHealth, coordinators, read_quorum
from dht.core.placement import Member, PartitionMap
from dht.node.transport import PeerTransport, PeerUnreachable

log = logging.getLogger(__name__)


class PeerView:
    """Peer health and the tables in force. ``on_peer_up`` is called when a peer that
    was down answers again (the node then delivers its hints)."""

    def __init__(
        self,
        pmap: PartitionMap,
        self_index: int,
        transport: PeerTransport,
        *,
        write_quorum: int,
        failure_timeout_ms: int,
        joint_ms: int,
        mono_ms: MonoMs,
        on_peer_up: Callable[[Member], object],
    ) -> None:
        self._transport = transport
        self._configured_w = write_quorum  # 0 = a majority of the replicas
        self._failure_timeout_ms = failure_timeout_ms
        self._now = mono_ms
        self._on_peer_up = on_peer_up
        self.health: dict[str, PeerHealth] = {}
        self.prev: PartitionMap | None = None
        self.joint_until_ms = 0
        self.joint_ms = joint_ms
        self.pmap = pmap
        self.set_table(pmap, self_index)

    def set_table(self, pmap: PartitionMap, self_index: int) -> list[str]:
        """Adopt a new epoch's table (membership changed). Peers that left are forgotten;
        new ones start as up (returns the ids of the peers in force). Until the change
        settles (every peer that is up uses the new table, and a late write from before
        it would be refused as stale anyway), quorums are joint with the previous
        table."""
        if self.pmap.epoch != pmap.epoch:
            self.prev = self.pmap
            self.joint_until_ms = self._now() + self.joint_ms
        self.pmap = pmap
        self.self_index = self_index
        rf = pmap.replication_factor
        self.write_quorum = self.default_w(rf)
        self.read_quorum = read_quorum(rf, self.write_quorum)
        now = self._now()
        ids = {m.node_id for m in pmap.members}
        if self.prev is not None:
            ids |= {m.node_id for m in self.prev.members}
        ids.discard(pmap.members[self_index].node_id)
        self.health = {n: self.health.get(n) or PeerHealth(last_ok_ms=now) for n in ids}
        self._coordinators: npt.NDArray[np.int16] | None = None
        self._all_up: npt.NDArray[np.bool_] = np.ones(pmap.num_partitions, dtype=bool)
        self.peer_epochs: dict[str, int] = {}
        return sorted(ids)

    def default_w(self, rf: int) -> int:
        """Configured W (0 = a majority of the replicas), never more than there are."""
        return min(self._configured_w or rf // 2 + 1, rf)

    def saw_epoch(self, node_id: str, epoch: int) -> None:
        """A peer's table epoch, as its last answer to a probe said."""
        if self.peer_epochs.get(node_id) != epoch:
            self.peer_epochs[node_id] = epoch
            self._coordinators = None

    def epochs_agree(self) -> bool:
        """Every peer that is up uses our table."""
        return all(
            self.peer_epochs.get(m.node_id) == self.pmap.epoch
            for m in self.peers()
            if self.is_up(m)
        )

    def tables(self) -> list[tuple[PartitionMap, int]]:
        """The tables (with this node's index in each, -1 if absent) whose quorums a
        write or a take-over must reach: ours, and while a membership change settles
        the previous one too (see set_table)."""
        tables = [(self.pmap, self.self_index)]
        if self.prev is not None:
            if self._now() < self.joint_until_ms or not self.epochs_agree():
                ids = [m.node_id for m in self.prev.members]
                me = self.pmap.members[self.self_index].node_id
                tables.append((self.prev, ids.index(me) if me in ids else -1))
            else:
                self.prev = None
        return tables

    # ------------------------------------------------------------------ health

    def up_mask(self) -> npt.NDArray[np.bool_]:
        mask = np.ones(len(self.pmap.members), dtype=bool)
        for i, m in enumerate(self.pmap.members):
            if i != self.self_index and not self.health[m.node_id].up:
                mask[i] = False
        return mask

    def coordinators(self) -> npt.NDArray[np.int16]:
        """Per partition, the first replica that is up (cached until health changes)."""
        if self._coordinators is None:
            up = self.up_mask()
            self._coordinators = coordinators(self.pmap, up)
            agree = up & np.array(
                [
                    i == self.self_index or self.peer_epochs.get(m.node_id) == self.pmap.epoch
                    for i, m in enumerate(self.pmap.members)
                ]
            )
            self._all_up = np.asarray(agree[self.pmap.replicas].all(axis=1), dtype=bool)
        return self._coordinators

    def all_replicas_up(self) -> npt.NDArray[np.bool_]:
        """Per partition: does this node see every replica up, and on its own table?
        Only then may a primary answer from its own copy: with a replica unreachable, or
        using another table, another coordinator may have acknowledged writes this one
        has not seen (an asymmetric cut, a membership change under way), so it reads a
        quorum instead."""
        self.coordinators()
        return self._all_up

    def is_up(self, member: Member) -> bool:
        h = self.health.get(member.node_id)
        return h is None or h.up

    def mark_ok(self, member: Member) -> None:
        h = self.health.get(member.node_id)
        if h is not None and h.success(self._now()):
            self._coordinators = None
            self._transport.reset(member)
            log.info("peer %s is up", member.node_id)
            self._on_peer_up(member)

    def heard_from(self, node_id: str) -> None:
        """A peer called us: it is up (a node that starts after its peers is seen at
        once, not only at their next probe)."""
        for i, m in enumerate(self.pmap.members):
            if m.node_id == node_id and i != self.self_index:
                self.mark_ok(m)

    def now_ms(self) -> int:
        return self._now()

    def mark_failed(self, member: Member, err: PeerUnreachable, started_ms: int = 0) -> None:
        """Record a failed call to ``member`` that started at ``started_ms``."""
        h = self.health.get(member.node_id)
        if h is not None and h.failure(
            self._now(), self._failure_timeout_ms, err.refused, started_ms
        ):
            self._coordinators = None
            log.warning("peer %s is down: %s", member.node_id, err)

    def peers(self) -> list[Member]:
        """The other members of our table."""
        return [m for i, m in enumerate(self.pmap.members) if i != self.self_index]
