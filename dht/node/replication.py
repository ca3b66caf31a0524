"""Replication inside a PoP: quorum writes and reads, hinted hand-off, anti-entropy.

docs/protocol.md#quorums: *acknowledged means on write_quorum replicas*, and *a read that finds
nothing must come from a read quorum (R + W > RF)*. The coordinator of a partition (its
primary, or the first replica that is up) applies a write to its own store first and then
ships the changed copies to the other replicas; a key is acknowledged when W copies hold
it. Copies a replica missed become hints (dht.node.repair), and so does anti-entropy.

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
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dht.core.peers import read_quorum
from dht.core.placement import Member
from dht.core.record import Status
from dht.core.wire import ENTRY_DTYPE, EntryArray, ResultArray
from dht.node.peerview import PeerView
from dht.node.repair import Repair
from dht.node.stats import Stats
from dht.node.terms import Terms
from dht.node.transport import LocalReplica, MergeResult, PeerTransport, PeerUnreachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicationConfig:
    write_quorum: int  # 0 = a majority of the replicas
    rpc_timeout_ms: int
    failure_timeout_ms: int
    max_clock_offset_ms: int = 0


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
    fenced: npt.NDArray[np.bool_]  # a replica refused the write as fenced (worth a retry)


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

    def recount_own(self, ready: npt.NDArray[np.bool_]) -> None:
        """Take back this node's part where its copy no longer counts (``ready`` per key,
        now): it learned meanwhile that the others declared it dead (dht.node.liveness
        start_resync), and a quorum planned before must not count a copy that lacks
        writes acknowledged in a table without it; or it started leaving."""
        gone = self.own[:-1] & ~ready
        self.counts[:-1] -= gone
        self.own[:-1] -= gone

    def ok_without_own(self) -> npt.NDArray[np.bool_]:
        """Per key: a quorum in every table from the other replicas alone."""
        return np.asarray((self.counts - self.own >= self.needs).all(axis=0), dtype=bool)

    @property
    def holders(self) -> npt.NDArray[np.int32]:
        """Per key: replicas known to hold it (this node included)."""
        held: npt.NDArray[np.int32] = self.counts[-1]
        return held


def quorum_plan(
    view: PeerView,
    parts: npt.NDArray[np.uint16],
    need: Callable[[int, int, bool], int],
    own_data: npt.NDArray[np.bool_] | None = None,
) -> tuple[list[tuple[Member, npt.NDArray[np.intp], npt.NDArray[np.bool_]]], _Tally]:
    """Per other replica of ``parts`` in any of the tables in force: the positions it
    replicates and, per table, whether it counts there. Plus the tally to fill, where
    this node already counts wherever it is a replica, and each table needs
    ``need(rf, W, ours)`` answers (a last row counts every holder, needing none).
    ``own_data`` (per partition: does this node hold its data?): this node counts only
    where it holds the partition's data (a quorum read or a take-over counts copies seen;
    a partition still being refilled or handed to this node has an incomplete copy
    here)."""
    tables = view.tables()
    n = len(parts)
    counts = np.zeros((len(tables) + 1, n), dtype=np.int32)
    needs = np.zeros((len(tables) + 1, 1), dtype=np.int32)
    rows: dict[str, tuple[Member, npt.NDArray[np.bool_]]] = {}
    for t, (table, me) in enumerate(tables):
        rf = table.replication_factor
        needs[t] = need(rf, view.write_quorum if t == 0 else view.default_w(rf), t == 0)
        reps = table.replicas[parts]  # (n, rf)
        if me >= 0:
            counts[t] = (reps == me).any(axis=1)
            if own_data is not None:
                counts[t] &= own_data[parts]
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


class Replicator:
    """The coordinator's half of replication of one node. Not thread-safe; lives in the
    node's loop."""

    def __init__(
        self,
        view: PeerView,
        terms: Terms,
        transport: PeerTransport,
        local: LocalReplica,
        repair: Repair,
        stats: Stats,
        config: ReplicationConfig,
        ready: npt.NDArray[np.bool_],
        leaving: Callable[[], bool] = lambda: False,
    ) -> None:
        self.view = view
        self.terms = terms
        self.transport = transport
        self.local = local
        self.repair = repair
        self.hints = repair.hints
        self.stats = stats
        self.config = config
        # Per partition: does this node hold the partition's data (refilled, or handed
        # off)? Shared with the node, which flips it.
        self.ready = ready
        # Is this node leaving (dht.node.liveness leave)? From then on its own copy
        # counts in no write quorum: it leaves with the node.
        self.leaving = leaving
        self._now = view.now_ms
        self._background: set[asyncio.Future[Any]] = set()

    async def _until_quorum(
        self,
        plan: Sequence[tuple[Member, npt.NDArray[np.intp], npt.NDArray[np.bool_]]],
        tally: _Tally,
        call: Callable[[Member, npt.NDArray[np.intp]], Awaitable[npt.NDArray[np.bool_] | bool]],
        linger_s: float = 0.0,
        recount: Callable[[], None] | None = None,
    ) -> set[asyncio.Future[Any]]:
        """Run ``call(member, idx)`` for each replica of ``plan`` concurrently until every
        key has its quorum in every table or every call is done, then for up to
        ``linger_s`` more for the rest. A call answers for its keys (``rows``: where it
        counts, per table) as a whole or per key. ``recount`` runs before each look at
        the tally (to take back this node's part when its copy stops counting). Calls
        still running then finish in the background (a slow replica does not hold up a
        quorum that is already there); they are owned and cancelled on close(), and
        returned."""
        tasks: dict[asyncio.Future[Any], tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]] = {
            asyncio.ensure_future(call(member, idx)): (idx, rows) for member, idx, rows in plan
        }
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            if recount is not None:
                recount()
            if tally.met():
                break
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                tally.add(*tasks[t], t.result())
        if recount is not None:
            recount()
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
        fenced = np.zeros(len(entries), dtype=bool)
        final: list[npt.NDArray[np.bool_]] = []  # the answer, once decided

        async def one(member: Member, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_] | bool:
            res: MergeResult | None = None
            if self.view.is_up(member):
                started = self._now()
                try:
                    res = await self.transport.replicate(
                        member,
                        entries[idx].tobytes(),
                        hinted=False,
                        issued_hlc=issued_hlc,
                        terms=terms[idx],
                    )
                except PeerUnreachable as e:
                    self.view.mark_failed(member, e, started)
            if res is not None:
                self.view.mark_ok(member)
                if res.fenced.size:
                    # Refused whole, for every partition of the call.
                    self.stats.fenced_writes += 1
                    self.terms.fenced(res.fenced, res.fenced_by)
                    if res.fenced_by_floor:
                        self._floor_of(member, res.fenced_by)
                    fenced[idx] = True
                if res.stale:
                    self.stats.stale_writes += 1
                if res.stale or res.fenced.size:
                    return False  # refused: neither an acknowledgement nor a hint
                if res.superseded.size:
                    held = np.ones(len(idx), dtype=bool)
                    lost = res.superseded
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

        plan, tally = quorum_plan(self.view, parts, lambda rf, w, _: w)

        def recount() -> None:
            # A write still in flight when this node started leaving counts only the
            # other replicas' copies: this one leaves with the node, and its hand-off
            # push may not get through (docs/protocol.md#leave).
            if self.leaving():
                tally.recount_own(np.zeros(len(entries), dtype=bool))

        stragglers = await self._until_quorum(plan, tally, one, recount=recount)
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
        ended = self.terms.promised[parts] != terms
        if ended.any():
            ok[ended] &= tally.ok_without_own()[ended] & (self.view.write_quorum > 1)
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
        return WriteOutcome(ok, tally.holders, took, superseded, fenced)

    def _floor_of(self, member: Member, term: int) -> None:
        """``member`` refused a write of ours by its floor ``term`` (above every term
        handed out before it started, docs/protocol.md#terms-and-fencing), which fences
        every partition it replicates: end this node's terms below it in all of them, not
        only in the write's. Learning it one write at a time cost a refused write, its
        undo and a take-over per partition, a storm of them after each restart; ended
        here, the next write takes them over together (dht.node.takeovers). (A refusal
        for another coordinator's promise ends only the partitions refused: ending more
        would turn each duel of a membership change into a take-over of hundreds.)"""
        mask = np.zeros(len(self.terms.held), dtype=bool)
        for table, _ in self.view.tables():
            ids = [m.node_id for m in table.members]
            if member.node_id in ids:
                mask |= (table.replicas == ids.index(member.node_id)).any(axis=1)
        mask &= (self.terms.held > 0) & (self.terms.held < np.uint64(term))
        if mask.any():
            self.terms.fenced(np.flatnonzero(mask), term)

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
        answered as failed may or may not take effect, docs/protocol.md#undo). Where a
        replica leaves an entry standing, its copy is pulled back into the local store,
        so later calls here are decided knowing it."""

        async def one(t: Taken) -> None:
            idx = t.idx[failed[t.idx]]
            if not idx.size or not self.view.is_up(t.member):
                return
            started = self._now()
            try:
                kept = await self.transport.undo(
                    t.member,
                    written[idx].tobytes(),
                    before[idx].tobytes(),
                    terms[idx],
                )
            except PeerUnreachable as e:
                self.view.mark_failed(t.member, e, started)
                self.stats.undo_failures += int(idx.size)
                return
            kept = kept[kept < len(idx)]
            self.stats.undone_remote += int(idx.size - kept.size)
            if kept.size:
                self.stats.undo_refused += int(kept.size)
                await self._pull_copies(t.member, written["key"][idx[kept]].tobytes())

        await asyncio.gather(*(one(t) for t in took))

    # ------------------------------------------------------------------ take-overs

    async def acquire(self, parts: npt.NDArray[np.intp], term: int) -> npt.NDArray[np.bool_]:
        """Take over ``parts`` under ``term`` (above any term promised here): have
        RF - W + 1 replicas of each (this one included, in each table in force) promise
        it, pulling each one's copies after its promise. Returns per partition whether
        this node now coordinates it under ``term``."""
        self.terms.proposing(parts, term)
        why: Counter[str] = Counter()  # promises not counted, by reason (for the log)

        async def one(member: Member, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
            mine = parts[idx]
            no = np.zeros(len(idx), dtype=bool)
            if not self.view.is_up(member):
                why[f"{member.node_id} down"] += len(idx)
                return no
            started = self._now()
            try:
                theirs, incomplete = await self.transport.promise(member, mine, term)
                granted: npt.NDArray[np.bool_] = theirs == np.uint64(term)
                # Learn a higher promise: the next take-over picks a term above it.
                self.terms.learn(mine, theirs)
                if granted.any():
                    await self.repair.sync_with(member, push=False, partitions=mine[granted])
            except PeerUnreachable as e:
                self.view.mark_failed(member, e, started)
                why[f"unreachable ({e})"] += len(idx)
                return no
            self.view.mark_ok(member)
            # A promise fences either way, but only a replica holding the partition's
            # data in full can show the writes this take-over must see.
            counted: npt.NDArray[np.bool_] = granted & ~incomplete
            why[f"{member.node_id} promised higher"] += int(np.count_nonzero(~granted))
            why[f"{member.node_id} incomplete"] += int(np.count_nonzero(granted & incomplete))
            return counted

        # RF - W + 1 intersects every write quorum. With W = 1 (configured, or a PoP
        # smaller than RF sized down to survive a failure, see dht.core.sizing) a write is
        # on one replica and a take-over could only see it there: no quorum of promises
        # helps, and waiting for one would stop writes when a replica dies, so the
        # take-over needs only this node (and W = 1 promises no fencing).
        plan, tally = quorum_plan(
            self.view,
            parts.astype(np.uint16),
            lambda rf, w, _: 1 if w == 1 else rf - w + 1,
            own_data=self.ready,
        )
        # Past the quorum, every replica that answers within the RPC timeout is pulled
        # from too: a write that was answered as failed but reached some replicas
        # (fewer than a quorum in some table in force) may not have been taken back
        # there (its undo refused or unanswered, see undo), and a claim decided without
        # seeing it could later lose to it by earliest birth.
        await self._until_quorum(plan, tally, one, self.config.rpc_timeout_ms / 1000)
        tally.recount_own(self.ready[parts])
        # Granted, and not promised to a higher term meanwhile.
        ok: npt.NDArray[np.bool_] = tally.ok() & self.terms.still_promised(parts, term)
        if not ok.all():
            log.warning(
                "took over %d of %d partitions under term %d; not counted: %s",
                int(ok.sum()),
                len(ok),
                term,
                ", ".join(f"{k} {v}" for k, v in sorted(why.items()) if v) or "-",
            )
        self.terms.took_over(parts[ok], term)
        self.stats.takeovers += int(np.count_nonzero(ok))
        self.stats.takeover_failures += int(np.count_nonzero(~ok))
        return ok

    # ------------------------------------------------------------------ reads

    async def read_repair(
        self, keys: bytes, parts: npt.NDArray[np.uint16]
    ) -> npt.NDArray[np.bool_]:
        """Fetch the copies other replicas hold of ``keys`` and merge them into the local
        store. True per key where a read quorum (this replica, if it holds the
        partition's data, and others up to R, in each table in force) answered."""
        rows = np.frombuffer(keys, dtype=np.uint8).reshape(-1, 40)

        async def one(member: Member, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_] | bool:
            return await self._pull_copies(member, rows[idx].tobytes())

        # In our own table R as set for it (a PoP sized down may run R = 1, dht.core.sizing).
        plan, tally = quorum_plan(
            self.view,
            parts,
            lambda rf, w, ours: self.view.read_quorum if ours else read_quorum(rf, w),
            own_data=self.ready,
        )
        if not tally.met():
            await self._until_quorum(plan, tally, one)
            tally.recount_own(self.ready[parts])
        ok = tally.ok()
        self.stats.read_quorum_failures += int(np.count_nonzero(~ok))
        return ok

    async def _pull_copies(self, member: Member, keys: bytes) -> npt.NDArray[np.bool_] | bool:
        """Merge the copies ``member`` holds of ``keys`` into the local store. Per key:
        does its answer count towards a quorum read (``member`` holds the key's partition
        in full: a replica still being handed it may lack an acknowledged write)?"""
        if not self.view.is_up(member):
            return False
        started = self._now()
        try:
            raw, incomplete = await self.transport.read_copies(member, keys)
        except PeerUnreachable as e:
            self.view.mark_failed(member, e, started)
            return False
        self.view.mark_ok(member)
        copies = np.frombuffer(raw, dtype=ENTRY_DTYPE["rec"])
        found = copies["status"] == Status.OK
        if found.any():
            entries = np.zeros(int(found.sum()), dtype=ENTRY_DTYPE)
            entries["key"] = np.frombuffer(keys, dtype=ENTRY_DTYPE["key"])[found]
            entries["rec"] = copies[found]
            self.local.merge_entries(entries)
        counted: npt.NDArray[np.bool_] = ~incomplete
        return counted


def as_entries(keys: bytes, results: ResultArray) -> EntryArray:
    """Result rows of ``keys`` as entries to replicate (status OK, no partition or flags)."""
    entries = np.zeros(len(results), dtype=ENTRY_DTYPE)
    entries["key"] = np.frombuffer(keys, dtype=ENTRY_DTYPE["key"])
    entries["rec"] = results
    entries["rec"]["status"] = Status.OK
    entries["rec"]["partition"] = 0
    entries["rec"]["flags"] = 0
    return entries
