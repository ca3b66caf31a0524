"""One DHT node: the stores, routing of batches, and replication, wired to timers.

Routing (DESIGN section 3): each key is hashed to its partition. The partition's
*coordinator* is its first replica that is up (the primary, unless it is down):

* this node is the coordinator and an in-sync primary that sees all the partition's
  replicas up: the keys are applied to the local store in one synchronous step (so claims
  are serialized by the primary), and written changes are shipped to the other replicas
  before they are acknowledged;
* this node is another replica, or a primary that is not in sync (just started, or was
  paused): the same, after a quorum read has merged the other replicas' copies in;
* otherwise the keys are forwarded one hop to the coordinator, or answered MOVED if the
  caller asked for that or the call was itself a forward (never a second hop).

A node is *in sync* once it has pulled the copies of all its partitions from the peers
that are up: at start (a restarted node refills before /readyz says ready) and after a
pause of its event loop longer than ``pause_threshold_ms`` (it may have missed writes).

Lifecycle is in dht.edge.server (gRPC) and the loops here: probe, anti-entropy, purge, pause
detector, resync. Every task is owned; a failing loop is logged and shows in /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client.core import Metric

from dht.core import metrics as m
from dht.core.clock import MonoMs, monotonic_ms
from dht.core.config import NodeConfig
from dht.core.errors import InvalidArgument, NotReady
from dht.core.membership import Membership, MemberState, MemberStatus
from dht.core.ops import BatchCall, Op
from dht.core.peers import replica_mask
from dht.core.placement import Member, PartitionMap
from dht.core.record import HybridClock, Status, hlc_pack, hlc_physical_ms
from dht.core.wire import (
    ENTRY_DTYPE,
    ENTRY_SIZE,
    FORMAT_VERSION,
    KEY_DTYPE,
    KEY_SIZE,
    KIND_AFFINITY,
    KIND_FLOW,
    EntryArray,
    KeyArray,
    ResultArray,
    U64Array,
    affinity_keys,
    check_batch_size,
    decode_clients,
    decode_keys,
    key_hash,
    key_hashes,
    new_results,
    prefix_mask,
)
from dht.node.replication import (
    MergeResult,
    PeerTransport,
    PeerUnreachable,
    ReplicationConfig,
    Replicator,
)
from dht.store.affinity import AffinityStore
from dht.store.flows import FlowStore

log = logging.getLogger(__name__)


# Statuses under which a mutating call changed (or re-affirmed) the stored copy.
_WRITTEN = np.array([Status.CREATED, Status.ALREADY_OWNED, Status.OK], dtype=np.uint8)


class Action(IntEnum):
    LOCAL = 0  # in-sync primary: local copy is authoritative
    QUORUM = 1  # coordinate after a quorum read
    FORWARD = 2
    MOVED = 3


@dataclass(frozen=True)
class _Batch:
    """A validated batch: the canonical key records, their hashes and partitions, and
    what each key needs for the local apply."""

    call: BatchCall
    keys40: npt.NDArray[np.uint8]  # (n, 40) canonical key records (affinity: masked)
    payload_rows: npt.NDArray[np.uint8]  # (n, record size) rows of the call's payload
    hashes: U64Array
    parts: npt.NDArray[np.uint16]
    pop: int
    ttl_ms: int | None
    flows: KeyArray | None  # KEY_DTYPE view (flow ops)
    prefixes: npt.NDArray[np.uint8] | None  # (n, 16) masked prefixes (affinity ops)


# Forwards a sub-batch to a member: (member, call) -> packed result records.
ForwardCall = Callable[[Member, BatchCall], Awaitable[bytes]]


class NodeExtension(Protocol):
    """Hooks for what lives outside the node (cross-PoP shipping and affinity, dht.pops.extension).
    Called from the node's event loop; none may block."""

    def written(self, op: Op, entries: EntryArray, before: ResultArray) -> None:
        """Copies this node coordinated and got acknowledged, with the copies before."""

    async def after_batch(self, call: BatchCall, out: ResultArray) -> None:
        """A batch call this node received first (not a forward) has its results."""

    def sized(self, repl: Replicator, members: int) -> None:
        """A new table of ``members``: adjust the replicator's quorums if need be."""

    def not_ready(self) -> list[str]:
        """Reasons for /readyz to say not ready."""
        ...


def _same_claim(a: ResultArray, b: ResultArray) -> npt.NDArray[np.bool_]:
    """Per row: the same claim (generation and birth), whatever its state since."""
    same: npt.NDArray[np.bool_] = (
        (a["generation"] == b["generation"])
        & (a["birth_hlc"] == b["birth_hlc"])
        & (a["birth_pop"] == b["birth_pop"])
    )
    return same


def _unchanged(now: ResultArray, wrote: ResultArray) -> npt.NDArray[np.bool_]:
    """Per row: the copy held ``now`` is still the one written (nothing merged in)."""
    same: npt.NDArray[np.bool_] = (
        (now["status"] == Status.OK)
        & _same_claim(now, wrote)
        & (now["state"] == wrote["state"])
        & (now["owner_pop"] == wrote["owner_pop"])
        & (now["expiry_ms"] == wrote["expiry_ms"])
    )
    return same


class Node:
    """One node of a PoP (see the module docstring). Its collaborators are given here:
    ``transport`` for calls to the other nodes of the PoP, ``forward`` for one-hop
    forwarding of keys to their coordinator (None: answer MOVED instead), ``extension``
    builds the hooks that live outside the node (cross-PoP shipping, dht.pops) from it.
    ``wall_ms`` and ``mono_ms`` are the wall clock (HLC stamps) and the monotonic clock
    (intervals), for tests that drive time themselves."""

    def __init__(
        self,
        config: NodeConfig,
        transport: PeerTransport,
        *,
        forward: ForwardCall | None = None,
        extension: Callable[[Node], NodeExtension] | None = None,
        wall_ms: Callable[[], int] | None = None,
        mono_ms: MonoMs = monotonic_ms,
    ) -> None:
        self.config = config
        self.metrics = m.NodeMetrics()
        self.clock = HybridClock(config.max_clock_offset_ms, wall_ms)
        self.store = FlowStore(config.ttl, config.limits, self.clock)
        self.affinity = AffinityStore()
        self.pop_id = config.pop_id
        self.pmap: PartitionMap | None = None
        self.repl: Replicator | None = None
        self.self_index = -1
        self._replicas: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self.grpc_port = 0
        self.admin_port = 0
        self._mono = mono_ms
        self._transport = transport
        self.forward = forward
        self.extension: NodeExtension | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()  # coordinated writes still running
        # Other coordinators' writes taken here lately, oldest first: (until when, mono
        # ms, their coordinator may still undo them, their key hashes). Left out of
        # anti-entropy till then.
        self._undoable: deque[tuple[int, U64Array]] = deque()
        # Of those, the ones a take-over, refill, hand-off or quorum read pulled from
        # here meanwhile: an undo leaves them standing (see internal_undo).
        self._pinned: deque[tuple[int, U64Array]] = deque()
        self._stop = asyncio.Event()
        self.failed_loops: dict[str, str] = {}
        self.accepting = False
        self.membership: Membership
        self.part_ready: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self._resyncing = True
        self.epochs = 0
        self.leaving = False
        self.transfers = 0  # partitions being handed to this node now
        self.dropped = 0  # copies dropped after their partitions moved away
        self._epoch_since_ms = 0
        self._dropped_since_epoch = False
        self.joined = not config.seeds
        self.first_sync = asyncio.Event()  # set once the start-up refill is done
        self._resync: asyncio.Task[None] | None = None
        self._last_tick_ms = self._mono()
        self.pauses = 0
        self.rollbacks = 0  # own writes put back (missed their quorum)
        self.undone_for_others = 0  # copies put back here at a coordinator's request
        # Keys held by writes in flight (see _coordinate).
        self._locks: dict[bytes, asyncio.Future[None]] = {}
        # Per write in flight: its keys and their copies before it (see _unsettled).
        self._inflight: dict[asyncio.Future[None], tuple[npt.NDArray[np.uint8], ResultArray]] = {}
        # Partitions being taken over now, each with the take-over's future.
        self._acquiring: dict[int, asyncio.Future[None]] = {}
        self.metrics.add_gauges(self._gauges)
        if extension is not None:
            self.extension = extension(self)

    # ------------------------------------------------------------------ membership

    def init_membership(self, grpc_port: int, admin_port: int) -> None:
        """This node, alive at a fresh incarnation, plus its configured peers (assumed
        alive until they say otherwise); further members arrive by gossip and --seeds.
        Called once the real ports are known (the config may say 0 = a free port)."""
        cfg = self.config
        self.grpc_port, self.admin_port = grpc_port, admin_port
        admin = f"{cfg.advertised}:{admin_port}" if admin_port > 0 else ""
        me = MemberState(
            cfg.node_id,
            f"{cfg.advertised}:{grpc_port}",
            admin,
            self.clock.wall_ms(),  # a restart outranks every rumour about the old process
            MemberStatus.ALIVE,
        )
        now = self._mono()
        self.membership = Membership(me, round(cfg.suspicion_timeout_s * 1000))
        for peer in cfg.peers:
            self.membership.add_seed(peer, now)
        self.part_ready = np.zeros(cfg.num_partitions, dtype=bool)
        self._rebuild()

    def _rebuild(self) -> None:
        """Build the table of the active members (a new epoch if the set changed) and
        start handing off the partitions this node newly replicates."""
        cfg = self.config
        if self.leaving:
            return  # keep the last table: a leaving node only hands off
        active = self.membership.active()
        rf = min(cfg.replication_factor, len(active))
        pmap = PartitionMap.build(active, cfg.num_partitions, rf, cfg.vnodes)
        old = self.pmap
        if old is not None and pmap.epoch == old.epoch:
            return
        self.pmap = pmap
        self.self_index = pmap.index_of(cfg.node_id)
        mine = replica_mask(pmap, self.self_index)
        if self.repl is None:
            self.repl = Replicator(
                pmap,
                self.self_index,
                self._transport,
                self,
                ReplicationConfig(
                    write_quorum=cfg.write_quorum or 0,
                    rpc_timeout_ms=cfg.rpc_timeout_ms,
                    failure_timeout_ms=round(cfg.failure_timeout_s * 1000),
                    hint_limit=cfg.hint_limit,
                    max_clock_offset_ms=cfg.max_clock_offset_ms,
                ),
                self.part_ready,
                # Terms are HLC stamps. A restart forgets the promises it made; terms
                # handed out before it are below its wall clock at start (up to a clock
                # offset, which a restart - a new process, imports, a refill - outlasts).
                monotonic_ms=self._mono,
                term_floor=hlc_pack(self.clock.wall_ms(), 0),
            )
            self.repl.on_peer_up = lambda member: self.spawn(
                f"hints->{member.node_id}", self._deliver_hints(member)
            )
        else:
            self.repl.set_table(pmap, self.self_index)
        if self.extension is not None:
            self.extension.sized(self.repl, len(active))
        if old is not None:
            acquired = np.flatnonzero(mine & ~self._replicas)
            self.part_ready[acquired] = False
            self.epochs += 1
            if acquired.size:
                self.spawn(f"handoff-{pmap.epoch}", self._handoff(acquired, old))
        self._replicas = mine
        self._epoch_since_ms = self._mono()
        self._dropped_since_epoch = False
        log.info(
            "node %s (pop %s) epoch %d: %d members, %d replicas, W=%d R=%d, primary of %d",
            cfg.node_id,
            cfg.pop,
            pmap.epoch,
            len(pmap.members),
            pmap.replication_factor,
            self.repl.write_quorum,
            self.repl.read_quorum,
            pmap.partition_counts(0)[self.self_index],
        )

    @property
    def in_sync(self) -> bool:
        """Holds the data of every partition it replicates."""
        return bool(self.part_ready[self._replicas].all()) and not self._resyncing

    @property
    def table(self) -> PartitionMap:
        if self.pmap is None:
            raise NotReady("node has not started")
        return self.pmap

    @property
    def replicator(self) -> Replicator:
        if self.repl is None:
            raise NotReady("node has not started")
        return self.repl

    # ------------------------------------------------------------------ readiness

    def live(self) -> bool:
        return not self.failed_loops

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not). Ready = serving and holding all its partitions."""
        reasons = []
        if not self.accepting:
            reasons.append("not accepting calls (starting or stopping)")
        if not self.joined:
            reasons.append("joining: no seed answered yet")
        if self.leaving:
            reasons.append("leaving: handing its partitions off")
        if not self.in_sync:
            reasons.append("refilling its partitions from the other replicas")
        if self.failed_loops:
            reasons.extend(f"background loop {k} failed: {v}" for k, v in self.failed_loops.items())
        if self.store.over_hard_limit:
            reasons.append("store is over its hard record ceiling")
        if self.extension is not None:
            reasons.extend(self.extension.not_ready())
        return (not reasons, reasons)

    # ------------------------------------------------------------------ validation

    def _now_ms(self) -> int:
        return self.clock.wall_ms()

    def _acting_pop(self, pop: int) -> int:
        if pop == 0:
            return self.pop_id
        if self.config.pop_name(pop) is None:
            known = ", ".join(f"{i}={n}" for n, i in self.config.pops.items())
            raise InvalidArgument("pop", f"unknown PoP id {pop} (known: {known})")
        return pop

    def _ttl_ms(self, ttl_s: int) -> int | None:
        if ttl_s == 0:
            return None
        ttl = self.config.ttl
        ttl_ms = ttl_s * 1000
        if not ttl.min_ms <= ttl_ms <= ttl.max_ms:
            raise InvalidArgument(
                "ttl_s", f"{ttl_s} outside the allowed {ttl.min_ms // 1000}..{ttl.max_ms // 1000} s"
            )
        return ttl_ms

    def _validate(self, call: BatchCall) -> _Batch:
        if call.format_version != FORMAT_VERSION:
            raise InvalidArgument(
                "format_version", f"{call.format_version} is not supported (want {FORMAT_VERSION})"
            )
        cfg = self.config
        flows: KeyArray | None = None
        prefixes: npt.NDArray[np.uint8] | None = None
        if call.op.affinity:
            clients = decode_clients(call.payload, cfg.max_batch_keys)
            prefixes = prefix_mask(cfg.limits.prefix_v4, cfg.limits.prefix_v6, clients)
            if call.op is Op.SET_AFFINITY and call.pop == 0:
                raise InvalidArgument("pop", "SetAffinity needs the preferred PoP id")
            raw = affinity_keys(prefixes)
            payload_rows = clients
        else:
            flows = decode_keys(call.payload, cfg.max_batch_keys, KIND_FLOW)
            raw = call.payload
            payload_rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE)
        pop = self._acting_pop(call.pop)
        ttl_ms = self._ttl_ms(call.ttl_s)
        if call.op in (Op.CLAIM, Op.CONFIRM) and not 0 <= call.server <= 65535:
            raise InvalidArgument("server", f"{call.server} outside 0..65535")
        hashes = key_hashes(raw)
        return _Batch(
            call=call,
            keys40=np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE),
            payload_rows=payload_rows,
            hashes=hashes,
            parts=self.table.partitions_of(hashes),
            pop=pop,
            ttl_ms=ttl_ms,
            flows=flows,
            prefixes=prefixes,
        )

    # ------------------------------------------------------------------ batch calls

    async def batch(self, call: BatchCall) -> bytes:
        """Validate, route and apply one batch call; returns packed result records.

        Raises InvalidArgument / LimitExceeded for malformed calls (nothing applied);
        per-key outcomes, including UNAVAILABLE, are statuses in the results."""
        if not self.accepting:
            raise NotReady("node is not accepting calls")
        b = self._validate(call)
        self._check_pause()
        out = new_results(len(b.hashes))
        actions, coord = self._plan(b)
        work = []
        for action in (Action.LOCAL, Action.QUORUM):
            idx = np.flatnonzero(actions == action)
            if idx.size:
                work.append(self._coordinate(b, idx, action is Action.QUORUM, out))
        out["status"][actions == Action.MOVED] = Status.MOVED
        fwd = np.flatnonzero(actions == Action.FORWARD)
        members = self.table.members  # resolved now: the table may change while we wait
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
        LOCAL: the in-sync primary, every replica up, no write in flight holding the key);
        None otherwise, and the caller takes :meth:`batch`. For the UDP lookup listener
        (dht.edge.udp), where a numpy batch of one would cost ~20x more."""
        if not self.accepting:
            raise NotReady("node is not accepting calls")
        self._check_pause()
        h = key_hash(key)
        p = h % self.table.num_partitions
        repl = self.replicator
        if (
            self.table.primaries[p] != self.self_index
            or repl.coordinators()[p] != self.self_index
            or not self.part_ready[p]
            or not repl.all_replicas_up()[p]
            or key in self._locks
        ):
            return None
        return self.store.lookup_one(key, h, self._now_ms(), p)

    def _plan(self, b: _Batch) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int16]]:
        repl = self.replicator
        coord = repl.coordinators()[b.parts]
        me = coord == self.self_index
        replica = self._replicas[b.parts]
        authoritative = (
            (self.table.primaries[b.parts] == self.self_index)
            & self.part_ready[b.parts]
            & repl.all_replicas_up()[b.parts]
        )
        actions = np.full(len(b.parts), Action.MOVED, dtype=np.uint8)
        actions[me & authoritative] = Action.LOCAL
        actions[me & ~authoritative] = Action.QUORUM
        elsewhere = ~me
        if b.call.forwarded or b.call.no_forward or self.forward is None:
            # The caller chose this node; a replica can coordinate safely after a quorum
            # read, anything else is MOVED (a forward is never forwarded again).
            actions[elsewhere & replica] = Action.QUORUM
        else:
            actions[elsewhere & (coord >= 0)] = Action.FORWARD
        return actions, coord

    async def _coordinate(
        self, b: _Batch, idx: npt.NDArray[np.intp], quorum: bool, out: ResultArray
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
        self._writes.add(task)
        task.add_done_callback(self._write_done)
        await asyncio.shield(task)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            # Its caller, if still there, got the error through the shield.
            log.debug("write ended with %r", e)

    async def _coordinate_locked(
        self, b: _Batch, idx: npt.NDArray[np.intp], quorum: bool, out: ResultArray
    ) -> None:
        """The body of _coordinate. A mutating call holds its keys until its copies are
        acknowledged or undone, so no other call sees or builds on a write that may
        still be undone."""
        mutating = b.call.op.mutating
        keys = [b.keys40[i].tobytes() for i in idx] if (mutating or self._locks) else []
        lock = await self._lock(keys, hold=mutating)
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
                self._inflight.pop(lock, None)
                self._unlock(keys, lock)

    async def _coordinate_held(
        self,
        b: _Batch,
        idx: npt.NDArray[np.intp],
        quorum: bool,
        out: ResultArray,
        lock: asyncio.Future[None] | None,
    ) -> npt.NDArray[np.intp]:
        """The body of _coordinate, its keys held. Returns the keys whose write was
        refused as fenced and undone (worth a retry after a new take-over)."""
        repl = self.replicator
        mutating = b.call.op.mutating
        nothing = idx[:0]
        if mutating:
            ok = await self._take_over(b.parts[idx])
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
            self._inflight[lock] = (b.keys40[idx], before)
        terms = repl.held[b.parts[idx]]  # fixed now: a promise may end them meanwhile
        issued = self.clock.now()
        res = self._apply(b, idx)
        out[idx] = res
        if before is None:
            return nothing
        written = np.flatnonzero(np.isin(res["status"], _WRITTEN))
        if not written.size:
            return nothing
        widx = idx[written]
        entries = repl.results_as_entries(b.keys40[widx].tobytes(), res[written])
        outcome = await repl.write(entries, b.parts[widx], b.call.op.value, issued, terms[written])
        acked, held, took = outcome.acked, outcome.holders, outcome.took
        # Our own copy lost to another claim merged in meanwhile (a quorum read of an
        # unrelated call pulled in a claim this one did not see): the write is already
        # beaten, as if a replica had reported it superseded.
        lost_here = ~_same_claim(self._copies(b, widx), res[written])
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
                was = repl.results_as_entries(b.keys40[widx].tobytes(), before[written])
                was["rec"]["status"] = before[written]["status"]
                await repl.undo(took, ~acked, entries, was, terms[written])
        if lock is not None:
            self._inflight.pop(lock, None)
        # Retried: writes refused as fenced and undone, and claims that lost to another
        # claim a replica held (pulled in here meanwhile, so the retry answers with it).
        fenced = (held <= 1) & (repl.held[b.parts[widx]] == 0)
        retry: npt.NDArray[np.intp] = widx[~acked & (fenced | superseded)]
        return retry

    async def _take_over(self, parts: npt.NDArray[np.uint16]) -> npt.NDArray[np.bool_]:
        """Per key of ``parts``: does this node hold a term for its partition (taking
        the partitions over first where it does not, see dht.node.replication)? A partition
        already being taken over by another call is waited for, not taken over twice;
        unrelated take-overs do not wait for each other."""
        repl = self.replicator
        if bool((repl.held[parts] > 0).all()):
            return np.ones(len(parts), dtype=bool)
        need = np.unique(parts[repl.held[parts] == 0]).astype(np.intp)
        waiting = {self._acquiring[p] for p in need.tolist() if p in self._acquiring}
        mine = np.array([p for p in need.tolist() if p not in self._acquiring], dtype=np.intp)
        if mine.size:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for p in mine.tolist():
                self._acquiring[p] = fut
            try:
                got = await repl.acquire(mine, repl.next_term(mine, self.clock.now()))
                if not got.all():
                    log.warning(
                        "took over %d of %d partitions (no promise quorum for the rest)",
                        int(got.sum()),
                        mine.size,
                    )
            finally:
                for p in mine.tolist():
                    if self._acquiring.get(p) is fut:
                        del self._acquiring[p]
                fut.set_result(None)
        if waiting:
            await asyncio.wait(waiting)
        return np.asarray(repl.held[parts] > 0, dtype=bool)

    async def _lock(self, keys: list[bytes], hold: bool) -> asyncio.Future[None] | None:
        """Wait until none of ``keys`` is held by a write in flight; then, if ``hold``,
        hold them all (all at once: no call holds some while waiting for others)."""
        while True:
            busy = {self._locks[k] for k in keys if k in self._locks}
            if not busy:
                break
            await asyncio.wait(busy)
        if not hold or not keys:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for k in keys:
            self._locks[k] = fut
        return fut

    def _unlock(self, keys: list[bytes], fut: asyncio.Future[None]) -> None:
        for k in keys:
            if self._locks.get(k) is fut:
                del self._locks[k]
        fut.set_result(None)

    def _copies(self, b: _Batch, idx: npt.NDArray[np.intp]) -> ResultArray:
        if b.prefixes is not None:
            return self.affinity.copies(b.prefixes[idx])
        assert b.flows is not None
        return self.store.copies(b.flows[idx], b.hashes[idx])

    def _restore(
        self, b: _Batch, idx: npt.NDArray[np.intp], before: ResultArray, wrote: ResultArray
    ) -> None:
        """Take back this node's own write of keys ``idx`` that missed its quorum."""
        keys = np.frombuffer(b.keys40[idx].tobytes(), dtype=KEY_DTYPE)
        self.rollbacks += int(np.count_nonzero(self._put_back(keys, b.hashes[idx], wrote, before)))

    def _put_back(
        self, keys: KeyArray, hashes: U64Array, wrote: ResultArray, before: ResultArray
    ) -> npt.NDArray[np.bool_]:
        """Put the copies ``before`` back where the copy held is still the one written
        (a copy merged in meanwhile, say another coordinator's acknowledged claim, is
        kept). Returns per key whether it was put back."""
        kinds = keys["kind"]
        put = np.zeros(len(keys), dtype=bool)
        flows = np.flatnonzero(kinds == KIND_FLOW)
        if flows.size:
            still = _unchanged(self.store.copies(keys[flows], hashes[flows]), wrote[flows])
            sel = flows[still]
            put[sel] = True
            if sel.size:
                self.store.restore(keys[sel], hashes[sel], before[sel])
        aff = np.flatnonzero(kinds == KIND_AFFINITY)
        if aff.size:
            prefixes = keys["caddr"][aff]
            still = _unchanged(self.affinity.copies(prefixes), wrote[aff])
            put[aff[still]] = True
            if still.any():
                self.affinity.restore(prefixes[still], before[aff[still]])
        return put

    def _apply(self, b: _Batch, idx: npt.NDArray[np.intp]) -> ResultArray:
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
        if op is Op.CLAIM:
            return s.claim(k, h, pop=b.pop, server=call.server, ttl_ms=b.ttl_ms, now_ms=now)
        if op is Op.CONFIRM:
            return s.confirm(k, h, pop=b.pop, server=call.server, ttl_ms=b.ttl_ms, now_ms=now)
        if op is Op.REFRESH:
            return s.refresh(k, h, pop=b.pop, ttl_ms=b.ttl_ms, now_ms=now)
        return s.release(k, h, pop=b.pop, now_ms=now)

    async def _forward(
        self, b: _Batch, member: Member, idx: npt.NDArray[np.intp], out: ResultArray
    ) -> None:
        assert self.forward is not None
        call = b.call
        sub = BatchCall(
            op=call.op,
            payload=b.payload_rows[idx].tobytes(),
            pop=b.pop,
            server=call.server,
            ttl_s=call.ttl_s,
            epoch=self.table.epoch,
            forwarded=True,
        )
        started = self.replicator.now_ms()
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
            self.replicator.mark_failed(member, e, started)
            self.metrics.forward_errors.inc()
            log.warning("forward of %d keys to %s failed: %s", len(idx), member.node_id, e)
            mine = self._replicas[b.parts[idx]]
            out["status"][idx[~mine]] = Status.UNAVAILABLE
            if mine.any():
                await self._coordinate(b, idx[mine], True, out)
            return
        self.replicator.mark_ok(member)
        self.metrics.forwarded.inc(len(idx))
        out[idx] = res

    def _count_keys(self, op: Op, out: ResultArray) -> None:
        counts = np.bincount(out["status"], minlength=len(Status))
        for status in Status:
            if counts[status]:
                self.metrics.keys.labels(op.value, status.name.lower()).inc(int(counts[status]))

    # ------------------------------------------------------------------ local replica

    def merge_entries(self, entries: EntryArray) -> MergeResult:
        """Apply copies from other nodes (replication, hints, anti-entropy, refill)."""
        if len(entries) == 0:
            return MergeResult()
        now = self._now_ms()
        kinds = entries["key"]["kind"]
        flows = entries[kinds == KIND_FLOW]
        applied = refused = 0
        if len(flows):
            stats = self.store.merge_entries(flows, None, now)
            applied, refused = stats.applied, stats.refused
        aff = entries[kinds == KIND_AFFINITY]
        if len(aff):
            applied += self.affinity.merge_entries(aff, now, self.config.ttl.tombstone_extra_ms)
        return MergeResult(applied, refused)

    def partition_digests(self) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        now = self._now_ms()
        p = self.table.num_partitions
        d1, c1 = self.store.partition_digests(p, now)
        d2, c2 = self.affinity.partition_digests(p, now)
        with np.errstate(over="ignore"):
            return d1 + d2, c1 + c2

    def export_entries(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> EntryArray:
        """Every copy of ``partitions``, except those of writes still in flight; with
        ``settled_only``, also except copies of other coordinators' writes taken
        recently, which their coordinator may still take back (see internal_undo)."""
        now = self._now_ms()
        p = self.table.num_partitions
        raw = (
            self.store.export_entries(partitions, p, now).tobytes()
            + self.affinity.export_entries(partitions, p, now).tobytes()
        )
        entries = np.frombuffer(raw, dtype=ENTRY_DTYPE)
        if self._inflight and len(entries):
            unsettled = self._unsettled()
            keys = entries["key"].tobytes()
            keep = [keys[i : i + KEY_SIZE] not in unsettled for i in range(0, len(keys), KEY_SIZE)]
            entries = entries[np.array(keep, dtype=bool)]
        if len(entries) and self._prune(self._undoable):
            recent = np.concatenate([hashes for _, hashes in self._undoable])
            open_ = np.isin(key_hashes(entries["key"].tobytes()), recent)
            if settled_only:
                entries = entries[~open_]
            else:
                self._pin(entries["key"][open_])
        return entries

    def _undo_window_ms(self) -> int:
        """How long a coordinator may still undo a write a replica took: two RPC
        timeouts (its write, then its undo) and a second of slack."""
        return 2 * self.config.rpc_timeout_ms + 1000

    def _mark_undoable(self, hashes: U64Array) -> None:
        """Copies of another coordinator's write (their key hashes), just taken: open
        to its undo."""
        self._prune(self._undoable)
        self._undoable.append((self._mono() + self._undo_window_ms(), hashes))

    def _pin(self, keys: npt.NDArray[np.void]) -> None:
        """Copies open to an undo that a take-over, refill, hand-off or quorum read is
        pulling from here: their puller may decide claims on them, so they stand."""
        if len(keys):
            self._prune(self._pinned)
            until = self._mono() + self._undo_window_ms()
            self._pinned.append((until, key_hashes(keys.tobytes())))

    def _prune(self, batches: deque[tuple[int, U64Array]]) -> int:
        """Forget batches past their window; returns how many remain."""
        now = self._mono()
        while batches and batches[0][0] <= now:
            batches.popleft()
        return len(batches)

    def _unsettled(self) -> dict[bytes, ResultArray]:
        """Keys of writes in flight, with their copies before the write. A write in
        flight may still be undone (no replica took it), so other nodes must not get it
        from this one by any other path (quorum reads, anti-entropy) meanwhile: they get
        the copy from before it, or nothing."""
        out: dict[bytes, ResultArray] = {}
        for keys, before in self._inflight.values():
            for i in range(len(keys)):
                out[keys[i].tobytes()] = before[i : i + 1]
        return out

    # ---- the NodeInternal calls (validated here: they come from the network)

    def internal_replicate(
        self, raw: bytes, issued_hlc: int = 0, terms: bytes = b"", from_node: str = ""
    ) -> MergeResult:
        """Apply copies. A coordinator's write (``terms`` set) is refused whole when a
        higher term was promised for any of its partitions, or when it was issued longer
        ago than the failure timeout (see dht.proto EntryBatch)."""
        check_batch_size(len(raw), ENTRY_SIZE, 1_000_000, "entries")
        entries = np.frombuffer(raw, dtype=ENTRY_DTYPE)
        if issued_hlc:
            # Past the failure timeout others may have routed around the coordinator
            # and acknowledged a conflicting claim (a paused coordinator cannot know).
            limit = round(self.config.failure_timeout_s * 1000) + self.config.max_clock_offset_ms
            if hlc_physical_ms(issued_hlc) < self.clock.wall_ms() - limit:
                return MergeResult(stale=True)
        if terms:
            if len(terms) != 8 * len(entries):
                raise InvalidArgument(
                    "terms", f"{len(terms)} bytes for {len(entries)} entries (want 8 each)"
                )
            hashes = key_hashes(entries["key"].tobytes())
            parts = self.table.partitions_of(hashes)
            if not self._is_member(from_node):
                # A coordinator this node's table does not hold (declared dead, left, not
                # yet known) cannot count its quorums in any table in force here.
                return MergeResult(
                    fenced=np.unique(parts).astype(">u2").tobytes(),
                    fenced_by=int(self.replicator.promised[parts].max()),
                )
            fenced, by = self.replicator.fence(
                parts.astype(np.intp), np.frombuffer(terms, dtype=">u8").astype(np.uint64)
            )
            if fenced:
                return MergeResult(fenced=fenced, fenced_by=by)
            merged = self.merge_entries(entries)
            self._mark_undoable(hashes)
            lost = self._superseded(entries, hashes)
            if lost.size:
                return replace(merged, superseded=lost.astype(">u4").tobytes())
            return merged
        return self.merge_entries(entries)

    def internal_undo(
        self, raw_written: bytes, raw_before: bytes, raw_terms: bytes
    ) -> npt.NDArray[np.intp]:
        """Take back a coordinator's write that missed its quorum (see dht.proto
        UndoRequest): per entry, put ``before`` back where the copy held here is still
        the one written, unless a take-over or quorum read pulled that copy from here
        meanwhile, or this node took the partition over under a higher term since: the
        puller, or this node as coordinator, may have decided claims on it. Returns the
        positions of the entries left standing."""
        check_batch_size(len(raw_written), ENTRY_SIZE, 1_000_000, "written")
        written = np.frombuffer(raw_written, dtype=ENTRY_DTYPE)
        if len(raw_before) != len(raw_written):
            raise InvalidArgument(
                "before", f"{len(raw_before)} bytes for {len(written)} written entries"
            )
        before = np.frombuffer(raw_before, dtype=ENTRY_DTYPE)
        if (before["key"] != written["key"]).any():
            raise InvalidArgument("before", "keys differ from those written")
        if len(raw_terms) != 8 * len(written):
            raise InvalidArgument(
                "terms", f"{len(raw_terms)} bytes for {len(written)} entries (want 8 each)"
            )
        terms = np.frombuffer(raw_terms, dtype=">u8").astype(np.uint64)
        hashes = key_hashes(written["key"].tobytes())
        parts = self.table.partitions_of(hashes)
        ours = self.replicator.led[parts] <= terms
        if self._prune(self._pinned):
            ours &= ~np.isin(hashes, np.concatenate([h for _, h in self._pinned]))
        undone = np.zeros(len(written), dtype=bool)
        mine = np.flatnonzero(ours)
        undone[mine] = self._put_back(
            written["key"][mine], hashes[mine], written["rec"][mine], before["rec"][mine]
        )
        self.undone_for_others += int(np.count_nonzero(undone))
        kept: npt.NDArray[np.intp] = np.flatnonzero(~undone)
        return kept

    def _superseded(self, entries: EntryArray, hashes: U64Array) -> npt.NDArray[np.intp]:
        """Positions of flow ``entries`` whose claim is not the one now held here: a
        different generation or birth won the merge (this replica holds another claim)."""
        flows = np.flatnonzero(entries["key"]["kind"] == KIND_FLOW)
        if not flows.size:
            return flows
        keys = entries["key"][flows]
        held = self.store.copies(keys, hashes[flows])
        same = (held["status"] == Status.OK) & _same_claim(held, entries["rec"][flows])
        if self._inflight and not same.all():
            # A claim this node coordinates itself, still in flight, is no winner yet:
            # a write under a higher term reaching it means another node took the
            # partition over, so that claim can no longer be acknowledged (it is fenced
            # and undone).
            unsettled = self._unsettled()
            raw = keys.tobytes()
            same |= np.array(
                [raw[i : i + KEY_SIZE] in unsettled for i in range(0, len(raw), KEY_SIZE)],
                dtype=bool,
            )
        lost: npt.NDArray[np.intp] = flows[~same]
        return lost

    def internal_promise(self, raw_parts: bytes, term: int, from_node: str) -> bytes:
        """Promise ``term`` for partitions (``from_node`` takes them over); not to a
        node this node's table does not hold (see internal_replicate)."""
        parts = self.partitions_arg(raw_parts)
        if term == 0:
            raise InvalidArgument("term", "must be set")
        repl = self.replicator
        if not self._is_member(from_node):
            return repl.promised[parts].astype(">u8").tobytes()
        return repl.promise_in(parts, term).astype(">u8").tobytes()

    def _is_member(self, node_id: str) -> bool:
        """In this node's table, or (while a membership change settles) its previous."""
        tables = [self.table] + ([self.replicator.prev] if self.replicator.prev else [])
        return any(m.node_id == node_id for t in tables for m in t.members)

    def internal_copies(self, raw: bytes) -> bytes:
        check_batch_size(len(raw), KEY_SIZE, 1_000_000, "keys")
        keys = np.frombuffer(raw, dtype=KEY_DTYPE)
        out = new_results(len(keys))
        flows = np.flatnonzero(keys["kind"] == KIND_FLOW)
        if flows.size:
            out[flows] = self.store.copies(keys[flows], key_hashes(keys[flows].tobytes()))
        aff = np.flatnonzero(keys["kind"] == KIND_AFFINITY)
        if aff.size:
            out[aff] = self.affinity.copies(keys["caddr"][aff])
        other = (keys["kind"] != KIND_FLOW) & (keys["kind"] != KIND_AFFINITY)
        out["status"][other] = Status.NOT_FOUND
        if self._inflight:
            unsettled = self._unsettled()
            for i in range(len(keys)):
                row = unsettled.get(raw[i * KEY_SIZE : (i + 1) * KEY_SIZE])
                if row is not None:
                    out[i] = row[0]
        if self._prune(self._undoable):
            recent = np.concatenate([hashes for _, hashes in self._undoable])
            found = out["status"] == Status.OK
            self._pin(keys[found & np.isin(key_hashes(raw), recent)])
        return out.tobytes()

    def internal_digests(
        self, partitions: npt.NDArray[np.intp]
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        digests, counts = self.partition_digests()
        if partitions.size == 0:
            return digests, counts
        return digests[partitions], counts[partitions]

    async def internal_fetch(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False, batch: int = 20_000
    ) -> AsyncIterator[bytes]:
        if partitions.size == 0:
            partitions = np.arange(self.table.num_partitions)
        entries = self.export_entries(partitions, settled_only)
        for start in range(0, len(entries), batch):
            yield entries[start : start + batch].tobytes()
            await asyncio.sleep(0)  # let calls in flight run between batches

    def partitions_arg(self, raw: bytes) -> npt.NDArray[np.intp]:
        check_batch_size(len(raw), 2, 65535, "partitions")
        parts = np.frombuffer(raw, dtype=">u2").astype(np.intp)
        if parts.size and int(parts.max()) >= self.table.num_partitions:
            raise InvalidArgument("partitions", f"partition {int(parts.max())} does not exist")
        return parts

    # ------------------------------------------------------------------ sync state

    def _check_pause(self) -> None:
        """A long gap since the last tick means this process was paused: peers may have
        coordinated our partitions meanwhile, so resync before trusting our copy. Called
        by the ticker and by every batch (after a SIGCONT a call may run before a tick)."""
        now = self._mono()
        gap = now - self._last_tick_ms
        if gap > self.config.pause_threshold_ms:
            self._last_tick_ms = now
            self.pauses += 1
            log.warning("event loop was paused for %d ms: resyncing", gap)
            self.start_resync()

    def start_resync(self) -> None:
        """Distrust the local copy until a resync round got through (start, pause). The
        terms this node held may have been taken over meanwhile: take them over again
        before the next write rather than learn it from a refused one."""
        self._resyncing = True
        if self.repl is not None:
            self.repl.held[:] = 0
        if self._resync is None or self._resync.done():
            self._resync = asyncio.create_task(
                self._resync_loop(), name=f"{self.config.node_id}:resync"
            )
            self._tasks.add(self._resync)
            self._resync.add_done_callback(self._tasks.discard)

    def _need(self, lost_data: bool) -> int:
        """Replicas of a partition a (re)sync must reach to see every acknowledged write
        this node may lack. An acknowledged write is on W replicas. A node that kept its
        data but missed writes (a pause) finds each one on RF - W of the others; a node
        that lost or never had the data (a restart, a hand-off) may itself have been one
        of the W, so it needs RF - W + 1."""
        rf = self.table.replication_factor
        w = self.replicator.write_quorum
        return min(rf - 1, rf - w + 1 if lost_data else rf - w)

    def _dead(self) -> set[str]:
        return {s.node_id for s in self.membership.view() if not s.active}

    async def _resync_loop(self) -> None:
        """Pull every partition that differs from the peers until enough replicas of each
        partition took part (see _need); then the whole local copy counts again."""
        repl = self.replicator
        repl.stats.resyncs += 1
        lost_data = not self.first_sync.is_set()
        started = time.perf_counter()
        took_part: set[str] = set()
        while not self._stop.is_set():
            await self._join()
            await self._probe_step()
            # Pull only once every peer that is up uses our table: writes acknowledged
            # under another table (say, while the others had declared us dead) are then
            # already on them.
            if repl.epochs_agree():
                took_part |= await repl.anti_entropy_round(push=False)
            mine = np.flatnonzero(self._replicas)
            if Replicator.covered(
                self.table,
                self.config.node_id,
                mine,
                took_part,
                self._need(lost_data),
                self._dead(),
            ):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.config.probe_interval_s)
        if self._stop.is_set():
            return
        self.part_ready[self._replicas] = True
        self._resyncing = False
        self.first_sync.set()
        if not self.leaving:
            self.accepting = True
        log.info(
            "in sync after %.2f s (%d records)", time.perf_counter() - started, len(self.store)
        )

    async def _handoff(self, acquired: npt.NDArray[np.intp], old: PartitionMap) -> None:
        """Stream the partitions this node newly replicates from their previous replicas
        (and any other replica that has them) until enough of the old replicas answered."""
        repl = self.replicator
        started = time.perf_counter()
        self.transfers += int(acquired.size)
        took_part: set[str] = set()
        while not self._stop.is_set() and self.pmap is not None:
            acquired = acquired[~self.part_ready[acquired]]
            if not acquired.size:
                break
            holders = {m.node_id: m for m in self.table.members}
            holders.update({m.node_id: m for m in old.members})
            holders.pop(self.config.node_id, None)
            for member in holders.values():
                if member.node_id in took_part or not repl.is_up(member):
                    continue
                try:
                    await repl.sync_with(member, push=False, partitions=acquired)
                except PeerUnreachable as e:
                    repl.mark_failed(member, e)
                    continue
                took_part.add(member.node_id)
            if Replicator.covered(
                old, self.config.node_id, acquired, took_part, self._need(True), self._dead()
            ):
                self.part_ready[acquired] = True
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.config.probe_interval_s)
        self.transfers -= int(acquired.size)
        log.info(
            "hand-off of %d partitions done in %.2f s", acquired.size, time.perf_counter() - started
        )

    # ------------------------------------------------------------------ membership: SWIM

    @property
    def peers_transport(self) -> PeerTransport:
        return self._transport

    def gossip_in(self, states: list[MemberState]) -> None:
        """Merge a peer's membership view (every probe carries one each way)."""
        refuted = self.membership.refutations
        if self.membership.apply(states, self._mono()):
            self._rebuild()
        if self.membership.refutations != refuted and self.first_sync.is_set():
            # Others took us for suspect or dead: they may have acknowledged writes
            # without us. Resync before answering alone again.
            self.start_resync()

    async def _join(self) -> None:
        """Ask the configured seeds for their view until one answers."""
        if self.joined:
            return
        for address in self.config.seeds:
            seed = Member(f"seed:{address}", address)
            try:
                _, view = await self._transport.ping(seed, self.membership.view())
            except PeerUnreachable as e:
                log.info("seed %s did not answer: %s", address, e)
                continue
            self.gossip_in(view)
            self.joined = True
            log.info("joined through seed %s: %d members", address, len(self.table.members))
            return

    async def _probe_step(self) -> None:
        """Probe every other active member directly, carrying our view; a member that
        does not answer is probed indirectly through up to ``indirect_probes`` others
        before it is suspected. Then declare dead the suspects whose time ran out."""
        repl = self.replicator
        peers = [m for m in self.membership.active() if m.node_id != self.config.node_id]

        async def direct(member: Member) -> bool:
            started = repl.now_ms()
            try:
                epoch, view = await self._transport.ping(member, self.membership.view())
            except PeerUnreachable as e:
                repl.mark_failed(member, e, started)
                return False
            repl.mark_ok(member)
            self.gossip_in(view)
            self.replicator.saw_epoch(member.node_id, epoch)
            return True

        answers = await asyncio.gather(*(direct(m) for m in peers))
        silent = [m for m, ok in zip(peers, answers, strict=True) if not ok]
        for target in silent:
            helpers = [m for m in peers if m not in silent][: self.config.indirect_probes]
            oks = await asyncio.gather(
                *(self._indirect(h, target) for h in helpers), return_exceptions=False
            )
            if not any(oks) and self.membership.suspect(target.node_id, self._mono()):
                log.warning("suspecting %s", target.node_id)
        if self.membership.tick(self._mono()):
            log.warning("declared dead: %s", sorted(self._dead()))
            self._rebuild()
        for member in repl.pmap.members:
            if repl.hints.count(member.node_id) and repl.is_up(member):
                await self._deliver_hints(member)

    async def _indirect(self, via: Member, target: Member) -> bool:
        try:
            return await self._transport.ping_req(via, target)
        except PeerUnreachable:
            return False

    async def leave(self, timeout_s: float) -> None:
        """Graceful leave: announce LEFT, then push this node's partitions to their new
        replicas until their digests match ours (bounded by ``timeout_s``)."""
        if self.pmap is None or self.leaving:
            return
        self.leaving = True
        # Stop coordinating at once: the others stop sending us writes as soon as they
        # hear we left, so our copy may fall behind. Callers get UNAVAILABLE and retry
        # at another replica; the internal service keeps serving the hand-off.
        self.accepting = False
        self.membership.leave()
        others = [m for m in self.table.members if m.node_id != self.config.node_id]
        started = time.perf_counter()

        async def handoff() -> None:
            await asyncio.gather(*(self._announce(m) for m in others), return_exceptions=True)
            if not self.membership.active():
                return  # the last member: nobody to hand off to
            successor = PartitionMap.build(
                self.membership.active(),
                self.config.num_partitions,
                min(self.config.replication_factor, len(self.membership.active())),
                self.config.vnodes,
            )
            held = np.flatnonzero(self._replicas)
            for i, member in enumerate(successor.members):
                theirs = held[(successor.replicas[held] == i).any(axis=1)]
                if theirs.size:
                    await self.replicator.sync_with(member, push=True, partitions=theirs)

        try:
            await asyncio.wait_for(handoff(), timeout_s)
            log.info("left after handing off in %.2f s", time.perf_counter() - started)
        except (TimeoutError, PeerUnreachable) as e:
            log.warning(
                "leave hand-off incomplete after %.2f s: %r", time.perf_counter() - started, e
            )

    async def _announce(self, member: Member) -> None:
        with contextlib.suppress(PeerUnreachable):
            await self._transport.ping(member, self.membership.view())

    # ------------------------------------------------------------------ background loops

    def spawn(self, name: str, coro: Awaitable[None]) -> None:
        """Start an owned background task; a failure is logged and shows in /readyz."""

        async def runner() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("background task %s failed", name)
                self.failed_loops[name] = repr(e)

        task = asyncio.create_task(runner(), name=f"{self.config.node_id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def every(self, interval_s: float, step: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``step`` every ``interval_s`` (+-10% jitter) until stop."""
        while not self._stop.is_set():
            result = step()
            if result is not None:
                await result
            delay = interval_s * random.uniform(0.9, 1.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    def purge_step(self) -> None:
        now = self._now_ms()
        budget = self.config.purge_budget
        self.store.purge_expired(now, budget)
        self.affinity.purge_expired(now - self.config.ttl.tombstone_extra_ms, budget)

    def _tick(self) -> None:
        self._check_pause()
        self._last_tick_ms = self._mono()

    async def _deliver_hints(self, member: Member) -> None:
        await self.replicator.deliver_hints(member)

    async def _anti_entropy_step(self) -> None:
        if self.in_sync and not self.leaving:
            # Not copies of coordinated writes still open to an undo (dht.proto
            # FetchRequest): a write answered as failed must not spread meanwhile.
            await self.replicator.anti_entropy_round(settled_only=True)
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Drop the partitions this node no longer replicates, once the table has been
        stable for ``handoff_grace_s`` (their new replicas have long pulled them)."""
        if not self._dropped_since_epoch and (
            self._mono() - self._epoch_since_ms >= self.config.handoff_grace_s * 1000
        ):
            self._dropped_since_epoch = True
            n = self.store.drop_partitions(self._replicas) + self.affinity.drop_partitions(
                self._replicas
            )
            if n:
                self.dropped += n
                log.info("dropped %d copies of partitions handed off to other nodes", n)

    def start_loops(self) -> None:
        cfg = self.config
        self._stop.clear()
        self._last_tick_ms = self._mono()
        self.spawn("purge", self.every(cfg.purge_interval_s, self.purge_step))
        self.spawn("pause-detector", self.every(0.1, self._tick))
        self.spawn("probe", self.every(cfg.probe_interval_s, self._probe_step))
        self.spawn("anti-entropy", self.every(cfg.anti_entropy_interval_s, self._anti_entropy_step))
        self.start_resync()

    async def stop_loops(self) -> None:
        self._stop.set()
        if self._writes:
            # Let writes in flight end (acknowledged or undone): bounded by their RPCs.
            await asyncio.wait(set(self._writes), timeout=2 * self.config.rpc_timeout_ms / 1000)
        tasks = list(self._tasks | self._writes)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.repl is not None:
            await self.repl.close()

    # ------------------------------------------------------------------ metrics

    def _gauges(self) -> Iterable[Metric]:
        counts = self.store.counts()
        yield m.gauge(
            "dht_records",
            "flow records held by this node, by address family and state",
            ["family", "state"],
            {k: float(v) for k, v in counts.items()},
        )
        yield m.gauge(
            "dht_affinity_records", "client affinity records held", [], {(): len(self.affinity)}
        )
        yield m.counter(
            "dht_expirations",
            "records purged after expiry",
            {(): self.store.expirations + self.affinity.expirations},
        )
        yield m.counter(
            "dht_refusals",
            "records refused, by reason (full/quota: new claims; hard: replicated copies)",
            {(k,): v for k, v in self.store.refusals.items()},
            ["reason"],
        )
        yield m.counter(
            "dht_clock_offset_rejections", "remote HLC stamps rejected", {(): self.clock.rejected}
        )
        ready, _ = self.readiness()
        yield m.gauge("dht_ready", "1 when /readyz is ready", [], {(): 1.0 if ready else 0.0})
        yield m.gauge(
            "dht_in_sync", "1 once the node holds all its partitions", [], {(): float(self.in_sync)}
        )
        yield m.counter(
            "dht_pauses", "event-loop pauses detected (each starts a resync)", {(): self.pauses}
        )
        if self.pmap is None or self.repl is None:
            return
        repl = self.repl
        yield m.gauge("dht_epoch", "partition table epoch", [], {(): float(self.pmap.epoch)})
        yield m.gauge(
            "dht_partitions",
            "partitions this node holds, as primary or any replica",
            ["role"],
            {
                ("primary",): float(self.pmap.partition_counts(0)[self.self_index]),
                ("replica",): float(self._replicas.sum()),
            },
        )
        peers: dict[tuple[str, ...], float] = {(n,): float(h.up) for n, h in repl.health.items()}
        yield m.gauge("dht_peer_up", "1 if the peer answers (this node's view)", ["peer"], peers)
        yield m.counter(
            "dht_peer_transitions",
            "peer up/down changes seen",
            {(n,): h.transitions for n, h in repl.health.items()},
            ["peer"],
        )
        hints: dict[tuple[str, ...], float] = {
            (n,): float(repl.hints.count(n)) for n in repl.health
        }
        yield m.gauge(
            "dht_hints_queued", "copies queued for an unreachable replica", ["peer"], hints
        )
        yield m.counter(
            "dht_hints_delivered", "hinted copies delivered", {(): repl.hints.delivered}
        )
        yield m.counter(
            "dht_hints_dropped", "hints dropped at the per-peer limit", {(): repl.hints.dropped}
        )
        s = repl.stats
        yield m.counter("dht_anti_entropy_rounds", "anti-entropy rounds", {(): s.ae_rounds})
        yield m.counter(
            "dht_anti_entropy_repaired_partitions",
            "partitions whose digests differed",
            {(): s.ae_partitions_repaired},
        )
        yield m.counter(
            "dht_anti_entropy_repaired_records",
            "copies that changed a record during anti-entropy",
            {(): s.ae_records_repaired},
        )
        yield m.counter(
            "dht_quorum_failures",
            "keys whose write did not reach the write quorum, by call",
            {(op,): n for op, n in s.quorum_failures.items()},
            ["method"],
        )
        yield m.counter(
            "dht_read_quorum_failures",
            "keys whose read quorum did not answer",
            {(): s.read_quorum_failures},
        )
        yield m.counter("dht_resyncs", "refills and resyncs started", {(): s.resyncs})
        yield m.counter(
            "dht_stale_writes", "writes a replica refused for their age", {(): s.stale_writes}
        )
        yield m.counter(
            "dht_fenced_writes",
            "writes a replica refused: another node took the partition over (a higher term)",
            {(): s.fenced_writes},
        )
        yield m.counter(
            "dht_superseded_writes",
            "keys of our writes not acknowledged because a replica held another claim "
            "of the key that wins (its copy is pulled in and the call retried once)",
            {(): s.superseded_writes},
        )
        yield m.counter(
            "dht_undone_copies",
            "copies of writes that missed their quorum, put back: by the coordinator in its "
            "own store, at its request by the replicas; or not: a replica did not answer, "
            "or left the copy standing (pulled back in by the coordinator)",
            {
                ("coordinator",): self.rollbacks,
                ("replica",): s.undone_remote,
                ("unanswered",): s.undo_failures,
                ("left_standing",): s.undo_refused,
            },
            ["where"],
        )
        yield m.counter(
            "dht_takeovers",
            "partitions this node took over as coordinator, by result",
            {("ok",): s.takeovers, ("no_quorum",): s.takeover_failures},
            ["result"],
        )
        yield m.counter(
            "dht_streamed_bytes",
            "record copies streamed by anti-entropy, refill and hand-off",
            {("pulled",): s.bytes_pulled, ("pushed",): s.bytes_pushed},
            ["direction"],
        )
