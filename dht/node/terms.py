"""Per-partition terms: which coordinator this node obeys, and under which it coordinates.

Coordinators are fenced per partition by *terms* (phase one of Paxos, per partition; see
docs/protocol.md#terms-and-fencing). Before a node coordinates writes of a partition it
picks a term above every term it has seen and has a quorum of replicas promise to refuse
lower terms; every coordinated write carries its term, and a replica refuses writes below
its promise.

This is the state both halves of replication read and change: the coordinator side
(dht.node.replication: take-overs, writes) and the replica side (dht.node.replica:
promises, fencing of incoming writes, undo). Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)


class Terms:
    """Per partition: the highest term promised here (``promised``), the highest term
    heard of from others without promising it (``seen``: a replica that fenced a write or
    refused a promise said so; the next take-over picks a term above it), the term this
    node coordinates under (``held``, 0 = none: take it over first) and the highest term
    it ever took the partition over with (``led``: it may have decided claims on the
    copies it held meanwhile, see dht.node.replica).

    ``seen`` is kept apart from ``promised`` because a write's coordinator reads its own
    promise to learn whether another node took the partition over (and pulled this
    node's copy) during the write: a replica that refused the write, say a restarted one
    whose floor is above every earlier term, tells of no such take-over."""

    def __init__(self, num_partitions: int, floor: int) -> None:
        # The floor (set at start from the clock) fences every term handed out before
        # this process started: a restart forgets its promises.
        self.floor = floor  # a refusal at the floor alone says so (fenced_by_floor)
        self.promised = np.full(num_partitions, floor, dtype=np.uint64)
        self.seen = np.zeros(num_partitions, dtype=np.uint64)
        self.held = np.zeros(num_partitions, dtype=np.uint64)
        self.led = np.zeros(num_partitions, dtype=np.uint64)

    def forget_held(self) -> None:
        """Stop coordinating under any term (after a pause or at a resync: the terms may
        have been taken over meanwhile); the next write takes its partitions over again."""
        self.held[:] = 0

    def next_term(self, parts: npt.NDArray[np.intp], now_hlc: int) -> int:
        """A term above every term this node has seen for ``parts``."""
        if not parts.size:
            return now_hlc
        top = max(int(self.promised[parts].max()), int(self.seen[parts].max()))
        return max(now_hlc, top + 1)

    def proposing(self, parts: npt.NDArray[np.intp], term: int) -> None:
        """This node starts taking ``parts`` over under ``term``: it promises it itself."""
        self.promised[parts] = np.maximum(self.promised[parts], np.uint64(term))

    def learn(self, parts: npt.NDArray[np.intp], theirs: npt.NDArray[np.uint64]) -> None:
        """A replica answered a take-over with its promises: learn the higher ones, so
        the next take-over picks a term above them."""
        self.seen[parts] = np.maximum(self.seen[parts], theirs)

    def took_over(self, parts: npt.NDArray[np.intp], term: int) -> None:
        """A take-over of ``parts`` under ``term`` got its quorum of promises."""
        self.held[parts] = term
        self.led[parts] = np.maximum(self.led[parts], np.uint64(term))

    def still_promised(self, parts: npt.NDArray[np.intp], term: int) -> npt.NDArray[np.bool_]:
        """Per partition: not promised to a higher term than ``term`` meanwhile, nor a
        higher term heard of from a replica."""
        t = np.uint64(term)
        same: npt.NDArray[np.bool_] = (self.promised[parts] == t) & (self.seen[parts] <= t)
        return same

    def fenced(self, parts: npt.NDArray[np.intp], term: int) -> None:
        """A replica refused our write: it promised ``term`` for these partitions."""
        parts = parts[parts < len(self.held)]
        self.held[parts] = 0
        self.seen[parts] = np.maximum(self.seen[parts], np.uint64(term))
        log.info("fenced out of %d partitions by term %d", parts.size, term)

    # ---- the replica side

    def promise_in(self, parts: npt.NDArray[np.intp], term: int) -> npt.NDArray[np.uint64]:
        """Another node takes ``parts`` over under ``term``: promise it where it is above
        every earlier promise (ending this node's own term there). Returns the promised
        term per partition after the call."""
        t = np.uint64(term)
        grant = self.promised[parts] < t
        self.promised[parts[grant]] = t
        self.held[parts[grant]] = 0
        return self.promised[parts].copy()

    def fence(
        self, parts: npt.NDArray[np.intp], terms: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.intp], int]:
        """Check a coordinated write (its terms per entry): the partitions where it is
        below our promise, and the highest such promise. If it passes, its terms count as
        promises (a coordinator needs only a quorum of explicit promises)."""
        below = terms < self.promised[parts]
        if below.any():
            fenced: npt.NDArray[np.intp] = np.unique(parts[below])
            return fenced, int(self.promised[fenced].max())
        np.maximum.at(self.promised, parts, terms)
        above = self.held[parts] < terms
        self.held[parts[above & (self.held[parts] > 0)]] = 0
        return parts[:0], 0

    def undoable_by(
        self, parts: npt.NDArray[np.intp], terms: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.bool_]:
        """Per entry of an undo: this node has not coordinated the partition under a
        higher term since the write (it may have decided claims on the copy then)."""
        ok: npt.NDArray[np.bool_] = self.led[parts] <= terms
        return ok
