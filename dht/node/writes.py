"""The coordinator's side of a batch call: a write's whole life on this node.

Routing (docs/protocol.md#routing): each key is hashed to its partition. The partition's
*coordinator* is its first replica that is up (the primary, unless it is down):

* this node is the coordinator and an in-sync primary that sees all the partition's
  replicas up: the keys are applied to the local store in one synchronous step (so claims
  are serialized by the primary), and written changes are shipped to the other replicas
  before they are acknowledged;
* this node is another replica, or a primary that is not in sync (just started, or was
  paused): the same, after a quorum read has merged the other replicas' copies in;
* otherwise the keys are forwarded one hop to the coordinator, or answered MOVED if the
  caller asked for that or the call was itself a forward (never a second hop).

A mutating call then holds its keys (dht.node.inflight), takes their partitions over if
this node holds no term for them (dht.node.terms), applies the op to the store, ships the
copies (dht.node.replication) and settles: acknowledged, or undone here and where
replicas took it.

Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from dht.core import metrics as m
from dht.core.config import NodeConfig
from dht.core.errors import NotReady
from dht.core.ops import BatchCall, Op
from dht.core.placement import Member
from dht.core.record import HybridClock, Status
from dht.core.wire import (
    KEY_DTYPE,
    ResultArray,
    key_hash,
    new_results,
)
from dht.node.extension import NodeExtension
from dht.node.inflight import InFlight, Lock
from dht.node.peerview import PeerView
from dht.node.replica import Replica, same_claim
from dht.node.replication import Replicator, as_entries
from dht.node.state import NodeState
from dht.node.takeovers import TakeOvers
from dht.node.terms import Terms
from dht.node.transport import ForwardCall, PeerUnreachable
from dht.node.validate import ValidatedBatch, validate
from dht.store.affinity import AffinityStore
from dht.store.flows import FlowStore

log = logging.getLogger(__name__)

# Per status: did a mutating call change (or re-affirm) the stored copy under it? (An
# index into this costs a fraction of np.isin on a call's few keys.)
_WRITTEN = np.zeros(256, dtype=np.bool_)
_WRITTEN[[Status.CREATED, Status.ALREADY_OWNED, Status.OK]] = True


class Route(IntEnum):
    """Where a key of a batch is decided."""

    LOCAL = 0  # in-sync primary: local copy is authoritative
    QUORUM = 1  # coordinate after a quorum read
    FORWARD = 2
    MOVED = 3


class Coordinator:
    """Validates, routes and coordinates batch calls. ``check_pause`` is called before
    each batch (after a SIGCONT a call may run before the pause detector's tick)."""

    def __init__(
        self,
        config: NodeConfig,
        state: NodeState,
        store: FlowStore,
        affinity: AffinityStore,
        clock: HybridClock,
        view: PeerView,
        terms: Terms,
        replicator: Replicator,
        replica: Replica,
        inflight: InFlight,
        metrics: m.NodeMetrics,
        *,
        forward: ForwardCall | None,
        extension: NodeExtension | None,
        check_pause: Callable[[], None],
        spawn: Callable[[str, Awaitable[object]], object] | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.affinity = affinity
        self.clock = clock
        self.view = view
        self.terms = terms
        self.replicator = replicator
        self.replica = replica
        self.inflight = inflight
        self.metrics = metrics
        self.forward = forward
        self.extension = extension
        self._check_pause = check_pause
        self.writes: set[asyncio.Task[None]] = set()  # coordinated writes still running
        # Partitions being taken over now, each with the take-over's future.
        self.takeovers = TakeOvers(view, terms, replicator, clock, spawn)
        self.rollbacks = 0  # own writes put back (missed their quorum)

    async def drain(self, timeout_s: float) -> None:
        """Let writes in flight end (acknowledged or undone), for at most ``timeout_s``."""
        if self.writes:
            await asyncio.wait(set(self.writes), timeout=timeout_s)

    def _now_ms(self) -> int:
        return self.clock.wall_ms()

    async def batch(self, call: BatchCall) -> bytes:
        """Validate, route and apply one batch call; returns packed result records.

        Raises InvalidArgument / LimitExceeded for malformed calls (nothing applied);
        per-key outcomes, including UNAVAILABLE, are statuses in the results."""
        if not self.state.accepting:
            raise NotReady("node is not accepting calls")
        b = validate(self.config, self.state.table, call)
        self._check_pause()
        out = new_results(len(b.hashes))
        actions, coord = self._plan(b)
        work = []
        for action in (Route.LOCAL, Route.QUORUM):
            idx = np.flatnonzero(actions == action)
            if idx.size:
                work.append(self._coordinate(b, idx, action is Route.QUORUM, out))
        out["status"][actions == Route.MOVED] = Status.MOVED
        fwd = np.flatnonzero(actions == Route.FORWARD)
        members = self.state.table.members  # resolved now: the table may change while we wait
        for target in np.unique(coord[fwd]):
            work.append(self._forward(b, members[int(target)], fwd[coord[fwd] == target], out))
        await asyncio.gather(*work)
        out["partition"] = b.parts
        self._count_keys(call.op, out)
        if self.extension is not None and not call.forwarded:
            await self.extension.after_batch(call, out)
        return out.tobytes()

    def lookup_local(self, key: bytes) -> bytes | None:
        """A Lookup of one validated 40-byte key answered from this node's copy alone, as
        one packed result, in the one case where :meth:`batch` would do the same (Action
        LOCAL: the in-sync primary under a term it holds, every replica up, no write in flight
        holding the key);
        None otherwise, and the caller takes :meth:`batch`. For the UDP lookup listener
        (dht.edge.udp), where a numpy batch of one would cost ~20x more."""
        if not self.state.accepting:
            raise NotReady("node is not accepting calls")
        self._check_pause()
        h = key_hash(key)
        p = h % self.state.table.num_partitions
        if (
            self.state.table.primaries[p] != self.state.self_index
            or self.view.coordinators()[p] != self.state.self_index
            or not self.state.part_ready[p]
            or not self.view.all_replicas_up()[p]
            or self.terms.held[p] == 0
            or self.inflight.holds(key)
        ):
            if (
                self.terms.held[p] == 0
                and self.state.table.primaries[p] == self.state.self_index
                and self.takeovers.settled()
            ):
                self.takeovers.warm(np.array([p], dtype=np.uint16))
            return None
        return self.store.lookup_one(key, h, self._now_ms(), p)

    def _plan(self, b: ValidatedBatch) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int16]]:
        coord = self.view.coordinators()[b.parts]
        me_index = self.state.self_index
        me = coord == me_index
        replica = self.state.replicas[b.parts]
        authoritative = (
            (self.state.table.primaries[b.parts] == self.state.self_index)
            & self.state.part_ready[b.parts]
            & self.view.all_replicas_up()[b.parts]
        )
        if not b.call.op.mutating:
            # A read answers from this node's copy alone only under a term it holds: the
            # take-over that got it pulled every acknowledged write (docs/protocol.md#routing).
            # Without one (a new primary after a membership change, or after a pause) the
            # copy may lack writes another coordinator got acknowledged by the others: read
            # a quorum, and take the partitions over in the background for the next reads.
            # (A write takes its partitions over before it applies anything anyway.)
            unheld = authoritative & (self.terms.held[b.parts] == 0) & (coord == me_index)
            if unheld.any() and self.takeovers.settled():
                self.takeovers.warm(b.parts[unheld])
            authoritative &= self.terms.held[b.parts] > 0
        actions = np.full(len(b.parts), Route.MOVED, dtype=np.uint8)
        actions[me & authoritative] = Route.LOCAL
        actions[me & ~authoritative] = Route.QUORUM
        elsewhere = ~me
        if b.call.forwarded or b.call.no_forward or self.forward is None:
            # The caller chose this node; a replica can coordinate safely after a quorum
            # read, anything else is MOVED (a forward is never forwarded again).
            actions[elsewhere & replica] = Route.QUORUM
        else:
            actions[elsewhere & (coord >= 0)] = Route.FORWARD
        return actions, coord

    async def _coordinate(
        self, b: ValidatedBatch, idx: npt.NDArray[np.intp], quorum: bool, out: ResultArray
    ) -> None:
        """Coordinate keys ``idx``: (quorum read,) apply locally, replicate, answer.

        A write runs to its end, acknowledged or undone, even when its caller goes away:
        a call cancelled mid-write (its deadline passed, during a pause of this process
        say) must not leave the write applied here, unacknowledged, no longer hidden as
        in flight, to spread by anti-entropy and beat by earliest birth a claim that is
        acknowledged meanwhile."""
        if not b.call.op.mutating:
            await self._coordinate_locked(b, idx, quorum, out)
            return
        task = asyncio.ensure_future(self._coordinate_locked(b, idx, quorum, out))
        self.writes.add(task)
        task.add_done_callback(self._write_done)
        await asyncio.shield(task)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self.writes.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            # Its caller, if still there, got the error through the shield.
            log.debug("write ended with %r", e)

    async def _coordinate_locked(
        self, b: ValidatedBatch, idx: npt.NDArray[np.intp], quorum: bool, out: ResultArray
    ) -> None:
        """The body of _coordinate. A mutating call holds its keys until its copies are
        acknowledged or undone, so no other call sees or builds on a write that may
        still be undone."""
        mutating = b.call.op.mutating
        keys = [b.keys40[i].tobytes() for i in idx] if (mutating or self.inflight.any_held) else []
        lock = await self.inflight.lock(keys, hold=mutating)
        try:
            again = await self._coordinate_held(b, idx, quorum, out, lock)
            if again.size:
                # Refused as fenced and undone (another node took these partitions
                # over in a moment this node's view differed: a restart, a membership
                # change), or lost to a claim a replica held: take them over again if
                # need be and try once more, so the caller gets the winning owner.
                await self._coordinate_held(b, again, quorum, out, lock)
        finally:
            if lock is not None:
                self.inflight.unlock(keys, lock)

    async def _coordinate_held(
        self,
        b: ValidatedBatch,
        idx: npt.NDArray[np.intp],
        quorum: bool,
        out: ResultArray,
        lock: Lock | None,
    ) -> npt.NDArray[np.intp]:
        """The body of _coordinate, its keys held. Returns the keys whose write was
        refused as fenced and undone (worth a retry after a new take-over)."""
        repl = self.replicator
        mutating = b.call.op.mutating
        nothing = idx[:0]
        if mutating:
            ok = await self.takeovers.take_over(b.parts[idx])
            if not ok.all():
                out["status"][idx[~ok]] = Status.UNAVAILABLE
                op = b.call.op.value
                fails = repl.stats.quorum_failures
                fails[op] = fails.get(op, 0) + int(np.count_nonzero(~ok))
            idx = idx[ok]
        if quorum and idx.size:
            ok = await repl.read_repair(b.keys40[idx].tobytes(), b.parts[idx])
            out["status"][idx[~ok]] = Status.UNAVAILABLE
            idx = idx[ok]
        if not idx.size:
            return nothing
        before = self._copies(b, idx) if mutating else None
        if lock is not None and before is not None:
            self.inflight.writing(lock, b.keys40[idx], before)
        terms = self.terms.held[b.parts[idx]]  # fixed now: a promise may end them meanwhile
        issued = self.clock.now()
        res = self._apply(b, idx)
        out[idx] = res
        if before is None:
            return nothing
        written = np.flatnonzero(_WRITTEN[res["status"]])
        if not written.size:
            return nothing
        widx = idx[written]
        entries = as_entries(b.keys40[widx].tobytes(), res[written])
        outcome = await repl.write(entries, b.parts[widx], b.call.op.value, issued, terms[written])
        acked, took = outcome.acked, outcome.took
        # Our own copy lost to another claim merged in meanwhile (a quorum read of an
        # unrelated call pulled in a claim this one did not see): the write is already
        # beaten, as if a replica had reported it superseded.
        lost_here = ~same_claim(self._copies(b, widx), res[written])
        superseded = outcome.superseded | lost_here
        acked &= ~lost_here
        out["status"][widx[~acked]] = Status.UNAVAILABLE
        if self.extension is not None and acked.any():
            self.extension.written(b.call.op, entries[acked], before[written][acked])
        if not acked.all():
            # Answered as failed: take the write back, here and where replicas took it,
            # so it cannot later win over a write that is acknowledged (a retry of the
            # same claim at another coordinator, say, which did not see this one).
            undo = written[~acked]
            self._restore(b, idx[undo], before[undo], res[undo])
            if took:
                was = as_entries(b.keys40[widx].tobytes(), before[written])
                was["rec"]["status"] = before[written]["status"]
                await repl.undo(took, ~acked, entries, was, terms[written])
        if lock is not None:
            self.inflight.settled(lock)
        # Retried: writes a replica refused as fenced (a replica refuses a call whole, so
        # also the keys of partitions whose term still holds here) or whose term ended
        # here meanwhile, and claims that lost to another claim a replica held (pulled in
        # here meanwhile, so the retry answers with it). Each was undone above.
        ended = self.terms.held[b.parts[widx]] != terms[written]
        retry: npt.NDArray[np.intp] = widx[~acked & (outcome.fenced | ended | superseded)]
        return retry

    def _copies(self, b: ValidatedBatch, idx: npt.NDArray[np.intp]) -> ResultArray:
        if b.prefixes is not None:
            return self.affinity.copies(b.prefixes[idx])
        assert b.flows is not None
        return self.store.copies(b.flows[idx], b.hashes[idx])

    def _restore(
        self, b: ValidatedBatch, idx: npt.NDArray[np.intp], before: ResultArray, wrote: ResultArray
    ) -> None:
        """Take back this node's own write of keys ``idx`` that missed its quorum."""
        keys = np.frombuffer(b.keys40[idx].tobytes(), dtype=KEY_DTYPE)
        self.rollbacks += int(
            np.count_nonzero(self.replica.put_back(keys, b.hashes[idx], wrote, before))
        )

    def _apply(self, b: ValidatedBatch, idx: npt.NDArray[np.intp]) -> ResultArray:
        """Apply the call to the local stores for keys ``idx`` (one synchronous step)."""
        now = self._now_ms()
        op, call = b.call.op, b.call
        if b.prefixes is not None:
            prefixes = b.prefixes[idx]
            if op is Op.SET_AFFINITY:
                ttl = b.ttl_ms or self.config.ttl.max_ms
                return self.affinity.set(prefixes, call.pop, self.clock.now(), now + ttl)
            return self.affinity.get(prefixes, now)
        assert b.flows is not None
        s = self.store
        if len(idx) == len(b.hashes):  # the whole batch (the usual case): no copies
            k, h = b.flows, b.hashes
        else:
            k, h = b.flows[idx], b.hashes[idx]
        if op is Op.LOOKUP:
            return s.lookup(k, h, now)
        # Refresh and release take no server; release no TTL (as the store's wrappers).
        return s.mutate(
            op,
            k,
            h,
            pop=b.pop,
            server=call.server if op.creates else 0,
            ttl_ms=None if op is Op.RELEASE else b.ttl_ms,
            now_ms=now,
        )

    async def _forward(
        self, b: ValidatedBatch, member: Member, idx: npt.NDArray[np.intp], out: ResultArray
    ) -> None:
        assert self.forward is not None
        call = b.call
        sub = BatchCall(
            op=call.op,
            payload=b.payload_rows[idx].tobytes(),
            pop=b.pop,
            server=call.server,
            ttl_s=call.ttl_s,
            epoch=self.state.table.epoch,
            forwarded=True,
        )
        started = self.view.now_ms()
        try:
            raw = await self.forward(member, sub)
            res = np.frombuffer(raw, dtype=out.dtype)
            if len(res) != len(idx):
                raise PeerUnreachable(
                    member.node_id, f"answered {len(res)} results for {len(idx)} keys"
                )
        except PeerUnreachable as e:
            # The coordinator could not be reached in time: a replica takes over (after
            # a quorum read); other keys are UNAVAILABLE, never answered wrongly.
            self.view.mark_failed(member, e, started)
            self.metrics.forward_errors.inc()
            log.warning("forward of %d keys to %s failed: %s", len(idx), member.node_id, e)
            mine = self.state.replicas[b.parts[idx]]
            out["status"][idx[~mine]] = Status.UNAVAILABLE
            if mine.any():
                await self._coordinate(b, idx[mine], True, out)
            return
        self.view.mark_ok(member)
        self.metrics.forwarded.inc(len(idx))
        out[idx] = res

    def _count_keys(self, op: Op, out: ResultArray) -> None:
        counts = np.bincount(out["status"], minlength=len(Status))
        for status in Status:
            if counts[status]:
                self.metrics.keys.labels(op.value, status.name.lower()).inc(int(counts[status]))
