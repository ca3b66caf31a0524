"""Replication inside a PoP: quorum writes and reads, hinted hand-off, anti-entropy.

DESIGN section 4: *acknowledged means on write_quorum replicas*, and *a read that finds
nothing must come from a read quorum (R + W > RF)*. The coordinator of a partition (its
primary, or the first replica that is up) applies a write to its own store first and then
ships the changed copies to the other replicas; a key is acknowledged when W copies hold
it. Copies that cannot be delivered are kept as hints, bounded per peer, and delivered
when the peer answers again. Anti-entropy compares per-partition digests with each peer
and exchanges the partitions that differ, so replicas converge after any fault,
including a node that was paused for a long time and comes back with old data.

Copies are only ever applied through the store's merge (record.merge), so the order in
which hints, replication and anti-entropy deliver them does not matter.

Coordinators are fenced per partition by *terms* (phase one of Paxos, per partition).
Before a node coordinates writes of a partition it picks a term above every term it has
seen, has ``RF - W + 1`` replicas (itself included) promise to refuse lower terms, and
pulls their copies; every coordinated write carries its term, and a replica refuses
writes below its promise. So a coordinator that was paused mid-write and resumes after
another took over cannot get a late write acknowledged: the promise quorum and its write
quorum intersect in a replica that refuses it. And the new coordinator has seen every
write an earlier one got acknowledged (the promise quorum intersects that write quorum
too), so create-once holds across a change of coordinator. While a membership change
settles, promises and writes need quorums in the previous table *and* the new one
(joint quorums), because nodes still using the previous table count their quorums there.

This module owns the protocol; the I/O goes through :class:`PeerTransport` (gRPC in
dht.edge.server), and the node's stores through :class:`LocalReplica` (dht.node.node).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from dht.core.errors import DhtError
from dht.core.membership import MemberState
from dht.core.peers import PeerHealth, coordinators, read_quorum, shared_partitions
from dht.core.placement import Member, PartitionMap
from dht.core.record import Status
from dht.core.wire import ENTRY_DTYPE, ENTRY_SIZE, EntryArray, ResultArray, U64Array

log = logging.getLogger(__name__)


class PeerUnreachable(DhtError):
    """A call to a peer failed. ``refused``: the peer is not listening (a dead process),
    as opposed to slow or timed out."""

    retryable = True

    def __init__(self, peer: str, detail: str, refused: bool = False) -> None:
        super().__init__(f"{peer}: {detail}")
        self.refused = refused


@dataclass(frozen=True, slots=True)
class MergeResult:
    applied: int = 0
    refused: int = 0
    stale: bool = False  # a write refused whole for its age (nothing applied)
    # A write refused whole because a higher term was promised for these partitions
    # (big-endian uint16) - the highest such term is ``fenced_by``.
    fenced: bytes = b""
    fenced_by: int = 0
    # Positions (big-endian uint32) of a coordinated write's entries that lost to a
    # different claim held by the replica: not held there, so not acknowledgements.
    superseded: bytes = b""


class PeerTransport(Protocol):
    """Node-to-node calls. Each raises PeerUnreachable on failure and returns within the
    configured RPC timeout."""

    async def ping(
        self, member: Member, view: Sequence[MemberState]
    ) -> tuple[int, list[MemberState]]:
        """Probe ``member`` with our membership view; returns its epoch and view."""
        ...

    async def ping_req(self, via: Member, target: Member) -> bool:
        """Ask ``via`` to probe ``target`` (SWIM indirect probe)."""
        ...

    async def replicate(
        self,
        member: Member,
        entries: bytes,
        hinted: bool,
        issued_hlc: int = 0,
        terms: bytes = b"",
    ) -> MergeResult:
        """Apply copies at ``member``; ``terms`` (big-endian uint64 per entry) makes it a
        coordinated write, fenced by the member's promises."""
        ...

    async def promise(
        self, member: Member, partitions: npt.NDArray[np.intp], term: int
    ) -> npt.NDArray[np.uint64]:
        """Ask ``member`` to promise ``term`` for ``partitions``; returns its promised
        term per partition after the call (== ``term`` where granted)."""
        ...

    async def undo(
        self, member: Member, written: bytes, before: bytes, terms: bytes
    ) -> npt.NDArray[np.intp]:
        """Have ``member`` take back a write that missed its quorum (entries as
        ``written``, put back as ``before`` where it may, see dht.proto UndoRequest);
        returns the positions of the entries it left standing."""
        ...

    async def read_copies(self, member: Member, keys: bytes) -> bytes: ...

    async def digests(
        self, member: Member, partitions: npt.NDArray[np.intp]
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]: ...

    def fetch(
        self, member: Member, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> AsyncIterator[bytes]: ...

    def reset(self, member: Member) -> None:
        """Drop the connection state to ``member`` (it came back: reconnect now, without
        waiting out a reconnect backoff)."""


class LocalReplica(Protocol):
    """The node's own copies (flows and affinity alike)."""

    def merge_entries(self, entries: EntryArray) -> MergeResult: ...

    def partition_digests(self) -> tuple[U64Array, npt.NDArray[np.uint32]]: ...

    def export_entries(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> EntryArray: ...


@dataclass(frozen=True)
class ReplicationConfig:
    write_quorum: int  # 0 = a majority of the replicas
    rpc_timeout_ms: int
    failure_timeout_ms: int
    hint_limit: int
    batch_entries: int = 5_000
    max_clock_offset_ms: int = 0


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


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Taken:
    """The entries of a coordinated write (positions) that one replica took."""

    member: Member
    idx: npt.NDArray[np.intp]


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """Per entry of a coordinated write (see Replicator.write)."""

    acked: npt.NDArray[np.bool_]  # on W replicas in each table in force, none superseded
    holders: npt.NDArray[np.int32]  # replicas known to hold it, this one included
    took: list[Taken]  # per replica, the entries it took
    superseded: npt.NDArray[np.bool_]  # a replica holds another claim that wins


@dataclass
class _Tally:
    """Answers per key, per table in force (rows), against the quorum each table needs.
    The last row counts every replica that holds the key, in any table."""

    counts: npt.NDArray[np.int32]  # (tables + 1, keys)
    needs: npt.NDArray[np.int32]  # (tables + 1, 1)
    own: npt.NDArray[np.int32]  # this node's part of counts (where it is a replica)

    def add(
        self,
        idx: npt.NDArray[np.intp],
        rows: npt.NDArray[np.bool_],
        answer: npt.NDArray[np.bool_] | bool,
    ) -> None:
        """One replica answered for keys ``idx`` (where it counts: ``rows``)."""
        self.counts[:, idx] += rows & answer

    def ok(self) -> npt.NDArray[np.bool_]:
        """Per key: a quorum in every table."""
        return np.asarray((self.counts >= self.needs).all(axis=0), dtype=bool)

    def met(self) -> bool:
        return bool(self.ok().all())

    def ok_without_own(self) -> npt.NDArray[np.bool_]:
        """Per key: a quorum in every table from the other replicas alone."""
        return np.asarray((self.counts - self.own >= self.needs).all(axis=0), dtype=bool)

    @property
    def holders(self) -> npt.NDArray[np.int32]:
        """Per key: replicas known to hold it (this node included)."""
        held: npt.NDArray[np.int32] = self.counts[-1]
        return held


class Replicator:
    """Replication protocol of one node. Not thread-safe; lives in the node's loop."""

    def __init__(
        self,
        pmap: PartitionMap,
        self_index: int,
        transport: PeerTransport,
        local: LocalReplica,
        config: ReplicationConfig,
        ready: npt.NDArray[np.bool_],
        monotonic_ms: Callable[[], int] = _monotonic_ms,
        term_floor: int = 0,
    ) -> None:
        self.transport = transport
        self.local = local
        self.config = config
        # Per partition: does this node's own copy count (it holds the partition's data:
        # refilled, or handed off)? Shared with the node, which flips it.
        self.ready = ready
        self._now = monotonic_ms
        self.health: dict[str, PeerHealth] = {}
        self.hints = Hints(config.hint_limit)
        self.stats = Stats()
        self.on_peer_up: Callable[[Member], None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        # Per partition: the highest term this replica promised (or accepted a write
        # under); and the term under which this node coordinates it (0 = none: take it
        # over first). The floor (set at start from the clock) fences every term handed
        # out before this process started: a restart forgets its promises.
        self.promised = np.full(pmap.num_partitions, term_floor, dtype=np.uint64)
        self.held = np.zeros(pmap.num_partitions, dtype=np.uint64)
        # The highest term this node ever took each partition over with: it may have
        # decided claims on the copies it held meanwhile (see Node.internal_undo).
        self.led = np.zeros(pmap.num_partitions, dtype=np.uint64)
        self.prev: PartitionMap | None = None
        self.joint_until_ms = 0
        self.joint_ms = config.failure_timeout_ms + config.max_clock_offset_ms
        self.pmap = pmap
        self.set_table(pmap, self_index)

    def set_table(self, pmap: PartitionMap, self_index: int) -> None:
        """Adopt a new epoch's table (membership changed). Peers that left are
        forgotten with their hints; new ones start as up. Until the change settles (every
        peer that is up uses the new table, and a late write from before it would be
        refused as stale anyway), quorums are joint with the previous table."""
        if self.pmap.epoch != pmap.epoch:
            self.prev = self.pmap
            self.joint_until_ms = self._now() + self.joint_ms
        self.pmap = pmap
        self.self_index = self_index
        rf = pmap.replication_factor
        self.write_quorum = self._default_w(rf)
        self.read_quorum = read_quorum(rf, self.write_quorum)
        now = self._now()
        ids = {m.node_id for m in pmap.members}
        if self.prev is not None:
            ids |= {m.node_id for m in self.prev.members}
        ids.discard(pmap.members[self_index].node_id)
        self.health = {n: self.health.get(n) or PeerHealth(last_ok_ms=now) for n in ids}
        for gone in set(self.hints.queued) - ids:
            self.hints.dropped += self.hints.count(gone)
            del self.hints.queued[gone]
        self._coordinators: npt.NDArray[np.int16] | None = None
        self._all_up: npt.NDArray[np.bool_] = np.ones(pmap.num_partitions, dtype=bool)
        self.peer_epochs: dict[str, int] = {}

    def saw_epoch(self, node_id: str, epoch: int) -> None:
        """A peer's table epoch, as its last answer to a probe said."""
        if self.peer_epochs.get(node_id) != epoch:
            self.peer_epochs[node_id] = epoch
            self._coordinators = None

    def epochs_agree(self) -> bool:
        """Every peer that is up uses our table."""
        return all(
            self.peer_epochs.get(m.node_id) == self.pmap.epoch
            for m in self._peers()
            if self.is_up(m)
        )

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
            self.transport.reset(member)
            log.info("peer %s is up", member.node_id)
            if self.on_peer_up is not None:
                self.on_peer_up(member)

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
            self._now(), self.config.failure_timeout_ms, err.refused, started_ms
        ):
            self._coordinators = None
            log.warning("peer %s is down: %s", member.node_id, err)

    def _peers(self) -> list[Member]:
        return [m for i, m in enumerate(self.pmap.members) if i != self.self_index]

    # ------------------------------------------------------------------ writes

    def _tables(self) -> list[tuple[PartitionMap, int]]:
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

    def _default_w(self, rf: int) -> int:
        """Configured W (0 = a majority of the replicas), never more than there are."""
        return min(self.config.write_quorum or rf // 2 + 1, rf)

    def _quorum_plan(
        self, parts: npt.NDArray[np.uint16], need: Callable[[int, int, bool], int]
    ) -> tuple[list[tuple[Member, npt.NDArray[np.intp], npt.NDArray[np.bool_]]], _Tally]:
        """Per other replica of ``parts`` in any of the tables in force: the positions it
        replicates and, per table, whether it counts there. Plus the tally to fill, where
        this node already counts wherever it is a replica, and each table needs
        ``need(rf, W, ours)`` answers (a last row counts every holder, needing none)."""
        tables = self._tables()
        n = len(parts)
        counts = np.zeros((len(tables) + 1, n), dtype=np.int32)
        needs = np.zeros((len(tables) + 1, 1), dtype=np.int32)
        rows: dict[str, tuple[Member, npt.NDArray[np.bool_]]] = {}
        for t, (table, me) in enumerate(tables):
            rf = table.replication_factor
            needs[t] = need(rf, self.write_quorum if t == 0 else self._default_w(rf), t == 0)
            reps = table.replicas[parts]  # (n, rf)
            if me >= 0:
                counts[t] = (reps == me).any(axis=1)
            for m in np.unique(reps):
                if m == me:
                    continue
                member = table.members[int(m)]
                row = rows.setdefault(
                    member.node_id, (member, np.zeros((len(tables) + 1, n), dtype=bool))
                )[1]
                row[t] |= (reps == m).any(axis=1)
        counts[-1] = 1
        own = counts.copy()
        plan = []
        for member, row in rows.values():
            row[-1] = row[:-1].any(axis=0)
            idx = np.flatnonzero(row[-1])
            plan.append((member, idx, row[:, idx]))
        return plan, _Tally(counts, needs, own)

    async def _until_quorum(
        self,
        plan: Sequence[tuple[Member, npt.NDArray[np.intp], npt.NDArray[np.bool_]]],
        tally: _Tally,
        call: Callable[[Member, npt.NDArray[np.intp]], Awaitable[npt.NDArray[np.bool_] | bool]],
        linger_s: float = 0.0,
    ) -> set[asyncio.Future[Any]]:
        """Run ``call(member, idx)`` for each replica of ``plan`` concurrently until every
        key has its quorum in every table or every call is done, then for up to
        ``linger_s`` more for the rest. A call answers for its keys (``rows``: where it
        counts, per table) as a whole or per key. Calls still running then finish in the
        background (a slow replica does not hold up a quorum that is already there);
        they are owned and cancelled on close(), and returned."""
        tasks: dict[asyncio.Future[Any], tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]] = {
            asyncio.ensure_future(call(member, idx)): (idx, rows) for member, idx, rows in plan
        }
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending and not tally.met():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                tally.add(*tasks[t], t.result())
        if pending and linger_s > 0:
            done, pending = await asyncio.wait(pending, timeout=linger_s)
            for t in done:
                tally.add(*tasks[t], t.result())
        for t in pending:
            self._background.add(t)
            t.add_done_callback(self._background.discard)
        return pending

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def write(
        self,
        entries: EntryArray,
        parts: npt.NDArray[np.uint16],
        op: str,
        issued_hlc: int,
        terms: npt.NDArray[np.uint64],
    ) -> WriteOutcome:
        """Ship copies the coordinator already applied locally, under ``terms`` (its
        term per entry's partition), to the other replicas.

        Returns per entry whether W replicas (this one included; in each table in
        force) now hold it, how many replicas are known to hold it, and which entries
        each replica took. An entry a replica reports superseded (it holds another
        claim of the key, one that wins the merge: a write that was answered as failed
        but could not be taken back there, say) is not acknowledged whatever the
        others said, since that claim will win everywhere: its copy is pulled into the
        local store instead, so that a retry answers with it. A copy that missed its
        quorum is *not* kept as a hint: the caller undoes it (locally and, through
        :meth:`undo`, where replicas took it), so a write that was answered as failed
        cannot later win over one that was acknowledged. Every other copy a replica
        missed is kept as a hint for it. A replica that refuses the write as fenced (it
        promised a higher term) ends this node's term for those partitions: the next
        write takes them over again.

        Until every key has its quorum, every call runs to its end, and so do the
        calls still out when a key turns out not acknowledged after all (superseded,
        or this node's term ended): no replica takes a write that missed its quorum
        after this returns, and a replica that missed the write gets a hint only of
        what was acknowledged."""
        missed: list[tuple[Member, npt.NDArray[np.intp]]] = []
        took: list[Taken] = []
        lost_to: list[Taken] = []
        final: list[npt.NDArray[np.bool_]] = []  # the answer, once decided
        wire_terms = terms.astype(">u8")

        async def one(member: Member, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_] | bool:
            res: MergeResult | None = None
            if self.is_up(member):
                started = self._now()
                try:
                    res = await self.transport.replicate(
                        member,
                        entries[idx].tobytes(),
                        hinted=False,
                        issued_hlc=issued_hlc,
                        terms=wire_terms[idx].tobytes(),
                    )
                except PeerUnreachable as e:
                    self.mark_failed(member, e, started)
            if res is not None:
                self.mark_ok(member)
                if res.fenced:
                    self._fenced(res.fenced, res.fenced_by)
                if res.stale:
                    self.stats.stale_writes += 1
                if res.stale or res.fenced:
                    return False  # refused: neither an acknowledgement nor a hint
                if res.superseded:
                    held = np.ones(len(idx), dtype=bool)
                    lost = np.frombuffer(res.superseded, dtype=">u4").astype(np.intp)
                    held[lost[lost < len(idx)]] = False
                    took.append(Taken(member, idx[held]))
                    lost_to.append(Taken(member, idx[~held]))
                    return held
                took.append(Taken(member, idx))
                return True
            if final:
                # A straggler, after the answer: a hint of what was acknowledged.
                kept = idx[final[0][idx]]
                if kept.size:
                    self.hints.add(member.node_id, entries[kept])
            else:
                missed.append((member, idx))
            return False

        plan, tally = self._quorum_plan(parts, lambda rf, w, _: w)
        stragglers = await self._until_quorum(plan, tally, one)
        ok = tally.ok()
        superseded = np.zeros(len(entries), dtype=bool)
        for t in lost_to:
            superseded[t.idx] = True
        ok &= ~superseded
        if lost_to:
            self.stats.superseded_writes += int(np.count_nonzero(superseded))
            keys = entries["key"]
            await asyncio.gather(
                *(self._pull_copies(t.member, keys[t.idx].tobytes()) for t in lost_to)
            )
        # Where this node promised a higher term meanwhile, another node took the
        # partition over and pulled this node's copy from *before* the write (hidden as
        # in flight): this node's copy is not counted. The other replicas' copies are:
        # a replica that took the write did so before it promised the higher term
        # (after, it refuses it as fenced), so the take-over pulled the write from any
        # of them among its promisers, and RF - W + 1 promisers meet every W of them.
        # (With W = 1 a take-over needs no promises but its own, so nothing is counted.)
        ended = self.promised[parts] != terms
        if ended.any():
            ok[ended] &= tally.ok_without_own()[ended] & (self.write_quorum > 1)
        if stragglers and not ok.all():
            # Not acknowledged after all: let the calls still out end, so that every
            # replica that takes the write is known (to the undo).
            await asyncio.wait(stragglers, timeout=self.config.rpc_timeout_ms / 1000 + 1)
        final.append(ok)
        for member, idx in missed:
            kept = idx[ok[idx]]
            if kept.size:
                self.hints.add(member.node_id, entries[kept])
        failed = int(np.count_nonzero(~ok))
        if failed:
            self.stats.quorum_failures[op] = self.stats.quorum_failures.get(op, 0) + failed
        return WriteOutcome(ok, tally.holders, took, superseded)

    async def undo(
        self,
        took: Sequence[Taken],
        failed: npt.NDArray[np.bool_],
        written: EntryArray,
        before: EntryArray,
        terms: npt.NDArray[np.uint64],
    ) -> None:
        """Take back, where replicas took it, a write whose entries ``failed`` (missed
        their quorum; positions as in :meth:`write`). Best effort, concurrently: a
        replica that does not answer within the RPC timeout keeps its copy (a write
        answered as failed may or may not take effect, DESIGN section 4). Where a
        replica leaves an entry standing, its copy is pulled back into the local store,
        so later calls here are decided knowing it."""
        wire_terms = terms.astype(">u8")

        async def one(t: Taken) -> None:
            idx = t.idx[failed[t.idx]]
            if not idx.size or not self.is_up(t.member):
                return
            started = self._now()
            try:
                kept = await self.transport.undo(
                    t.member,
                    written[idx].tobytes(),
                    before[idx].tobytes(),
                    wire_terms[idx].tobytes(),
                )
            except PeerUnreachable as e:
                self.mark_failed(t.member, e, started)
                self.stats.undo_failures += int(idx.size)
                return
            kept = kept[kept < len(idx)]
            self.stats.undone_remote += int(idx.size - kept.size)
            if kept.size:
                self.stats.undo_refused += int(kept.size)
                await self._pull_copies(t.member, written["key"][idx[kept]].tobytes())

        await asyncio.gather(*(one(t) for t in took))

    # ------------------------------------------------------------------ terms

    def _fenced(self, raw_parts: bytes, term: int) -> None:
        """A replica refused our write: it promised ``term`` for these partitions."""
        parts = np.frombuffer(raw_parts, dtype=">u2").astype(np.intp)
        parts = parts[parts < len(self.held)]
        self.stats.fenced_writes += 1
        self.held[parts] = 0
        self.promised[parts] = np.maximum(self.promised[parts], np.uint64(term))
        log.info("fenced out of %d partitions by term %d", parts.size, term)

    def next_term(self, parts: npt.NDArray[np.intp], now_hlc: int) -> int:
        """A term above every term this node has seen for ``parts``."""
        top = int(self.promised[parts].max()) if parts.size else 0
        return max(now_hlc, top + 1)

    async def acquire(self, parts: npt.NDArray[np.intp], term: int) -> npt.NDArray[np.bool_]:
        """Take over ``parts`` under ``term`` (above any term promised here): have
        RF - W + 1 replicas of each (this one included, in each table in force) promise
        it, pulling each one's copies after its promise. Returns per partition whether
        this node now coordinates it under ``term``."""
        self.promised[parts] = np.maximum(self.promised[parts], np.uint64(term))

        async def one(member: Member, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
            mine = parts[idx]
            no = np.zeros(len(idx), dtype=bool)
            if not self.is_up(member):
                return no
            started = self._now()
            try:
                theirs = await self.transport.promise(member, mine, term)
                granted: npt.NDArray[np.bool_] = theirs == np.uint64(term)
                # Learn a higher promise: the next take-over picks a term above it.
                self.promised[mine] = np.maximum(self.promised[mine], theirs)
                if granted.any():
                    await self.sync_with(member, push=False, partitions=mine[granted])
            except PeerUnreachable as e:
                self.mark_failed(member, e, started)
                return no
            self.mark_ok(member)
            return granted

        # RF - W + 1 intersects every write quorum. With W = 1 (configured, or a PoP
        # smaller than RF sized down to survive a failure, see dht.core.sizing) a write is
        # on one replica and a take-over could only see it there: no quorum of promises
        # helps, and waiting for one would stop writes when a replica dies, so the
        # take-over needs only this node (and W = 1 promises no fencing).
        plan, tally = self._quorum_plan(
            parts.astype(np.uint16), lambda rf, w, _: 1 if w == 1 else rf - w + 1
        )
        # Past the quorum, every replica that answers within the RPC timeout is pulled
        # from too: a write that was answered as failed but reached some replicas
        # (fewer than a quorum in some table in force) may not have been taken back
        # there (its undo refused or unanswered, see undo), and a claim decided without
        # seeing it could later lose to it by earliest birth.
        await self._until_quorum(plan, tally, one, self.config.rpc_timeout_ms / 1000)
        # Granted, and not promised to a higher term meanwhile.
        ok: npt.NDArray[np.bool_] = tally.ok() & (self.promised[parts] == np.uint64(term))
        self.held[parts[ok]] = term
        self.led[parts[ok]] = np.maximum(self.led[parts[ok]], np.uint64(term))
        self.stats.takeovers += int(np.count_nonzero(ok))
        self.stats.takeover_failures += int(np.count_nonzero(~ok))
        return ok

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
    ) -> tuple[bytes, int]:
        """Check a coordinated write (its terms per entry): the partitions where it is
        below our promise, and the highest such promise. If it passes, its terms count as
        promises (a coordinator needs only a quorum of explicit promises)."""
        below = terms < self.promised[parts]
        if below.any():
            fenced = np.unique(parts[below])
            return fenced.astype(">u2").tobytes(), int(self.promised[fenced].max())
        np.maximum.at(self.promised, parts, terms)
        above = self.held[parts] < terms
        self.held[parts[above & (self.held[parts] > 0)]] = 0
        return b"", 0

    # ------------------------------------------------------------------ reads

    async def read_repair(
        self, keys: bytes, parts: npt.NDArray[np.uint16]
    ) -> npt.NDArray[np.bool_]:
        """Fetch the copies other replicas hold of ``keys`` and merge them into the local
        store. True per key where a read quorum (this replica + R-1 others, in each
        table in force) answered."""
        rows = np.frombuffer(keys, dtype=np.uint8).reshape(-1, 40)

        async def one(member: Member, idx: npt.NDArray[np.intp]) -> bool:
            return await self._pull_copies(member, rows[idx].tobytes())

        # In our own table R as set for it (a PoP sized down may run R = 1, dht.core.sizing).
        plan, tally = self._quorum_plan(
            parts, lambda rf, w, ours: self.read_quorum if ours else read_quorum(rf, w)
        )
        if not tally.met():
            await self._until_quorum(plan, tally, one)
        ok = tally.ok()
        self.stats.read_quorum_failures += int(np.count_nonzero(~ok))
        return ok

    async def _pull_copies(self, member: Member, keys: bytes) -> bool:
        """Merge the copies ``member`` holds of ``keys`` into the local store."""
        if not self.is_up(member):
            return False
        started = self._now()
        try:
            raw = await self.transport.read_copies(member, keys)
        except PeerUnreachable as e:
            self.mark_failed(member, e, started)
            return False
        self.mark_ok(member)
        copies = np.frombuffer(raw, dtype=ENTRY_DTYPE["rec"])
        found = copies["status"] == Status.OK
        if found.any():
            entries = np.zeros(int(found.sum()), dtype=ENTRY_DTYPE)
            entries["key"] = np.frombuffer(keys, dtype=ENTRY_DTYPE["key"])[found]
            entries["rec"] = copies[found]
            self.local.merge_entries(entries)
        return True

    # ------------------------------------------------------------------ hints

    async def deliver_hints(self, member: Member) -> int:
        """Send the hints queued for ``member`` in batches; stop at the first failure."""
        sent = 0
        while self.hints.count(member.node_id) and self.is_up(member):
            raw = self.hints.take(member.node_id, self.config.batch_entries)
            try:
                await self.transport.replicate(member, raw, hinted=True)
            except PeerUnreachable as e:
                self.mark_failed(member, e)
                self.hints.add(member.node_id, np.frombuffer(raw, dtype=ENTRY_DTYPE))
                break
            n = len(raw) // ENTRY_SIZE
            self.hints.delivered += n
            sent += n
        if sent:
            log.info("delivered %d hinted copies to %s", sent, member.node_id)
        return sent

    # ------------------------------------------------------------------ anti-entropy

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
            if member.node_id not in {m.node_id for m in self.pmap.members}:
                return 0  # it left the table while the round was under way
            partitions = shared_partitions(
                self.pmap, self.self_index, self.pmap.index_of(member.node_id)
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
            step = self.config.batch_entries
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
        for member in self._peers() if members is None else members:
            if not self.is_up(member):
                continue
            parts = None if partitions is None else partitions(member)
            try:
                await self.sync_with(member, push, parts, settled_only)
            except PeerUnreachable as e:
                self.mark_failed(member, e)
                continue
            done.add(member.node_id)
        self.stats.ae_rounds += 1
        return done

    @staticmethod
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

    def results_as_entries(self, keys: bytes, results: ResultArray) -> EntryArray:
        entries = np.zeros(len(results), dtype=ENTRY_DTYPE)
        entries["key"] = np.frombuffer(keys, dtype=ENTRY_DTYPE["key"])
        entries["rec"] = results
        entries["rec"]["status"] = Status.OK
        entries["rec"]["partition"] = 0
        entries["rec"]["flags"] = 0
        return entries
