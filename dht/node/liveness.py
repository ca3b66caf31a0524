"""Liveness of a node in its PoP: SWIM probes and gossip, join, graceful leave, the
table changes they bring (hand-off of partitions), the pause detector, and resync.

A node is *in sync* once it has pulled the copies of all its partitions from the peers
that are up: at start (a restarted node refills before /readyz says ready) and after a
pause of its event loop longer than ``pause_threshold_ms`` (it may have missed writes).
See docs/protocol.md#membership.

Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import numpy.typing as npt

from dht.core.clock import MonoMs
from dht.core.config import NodeConfig
from dht.core.membership import Membership, MemberState
from dht.core.peers import replica_mask
from dht.core.placement import Member, PartitionMap
from dht.node.extension import NodeExtension
from dht.node.peerview import PeerView
from dht.node.repair import Repair, covered
from dht.node.replica import Replica
from dht.node.state import NodeState
from dht.node.tasks import Tasks
from dht.node.terms import Terms
from dht.node.transport import PeerTransport, PeerUnreachable

log = logging.getLogger(__name__)


class Liveness:
    def __init__(
        self,
        config: NodeConfig,
        state: NodeState,
        membership: Membership,
        view: PeerView,
        repair: Repair,
        terms: Terms,
        replica: Replica,
        transport: PeerTransport,
        tasks: Tasks,
        mono_ms: MonoMs,
        extension: NodeExtension | None,
    ) -> None:
        self.config = config
        self.state = state
        self.membership = membership
        self.view = view
        self.repair = repair
        self.terms = terms
        self.replica = replica
        self._transport = transport
        self.tasks = tasks
        self._mono = mono_ms
        self.extension = extension
        self._resync: asyncio.Task[None] | None = None
        # The others declared this node dead since (see start_resync).
        self._declared = False
        self._last_tick_ms = mono_ms()
        self._epoch_since_ms = mono_ms()
        self._dropped_since_epoch = False
        self.pauses = 0
        self.epochs = 0
        self.transfers = 0  # partitions being handed to this node now
        self.dropped = 0  # copies dropped after their partitions moved away
        self.ping_req_refused = 0  # indirect probes asked of a target not in our view

    # ------------------------------------------------------------------ the table

    def rebuild(self) -> None:
        """Build the table of the active members; adopt it if it is a new epoch."""
        if self.state.leaving:
            return  # keep the last table: a leaving node only hands off
        pmap = table_of(self.config, self.membership)
        old = self.state.pmap
        if old is not None and pmap.epoch == old.epoch:
            return
        self.adopt(pmap, old)

    def adopt(self, pmap: PartitionMap, old: PartitionMap | None) -> None:
        """Adopt a new epoch's table and start handing off the partitions this node
        newly replicates (``old``: the table before, None at start)."""
        cfg = self.config
        self.state.pmap = pmap
        self.state.self_index = pmap.index_of(cfg.node_id)
        mine = replica_mask(pmap, self.state.self_index)
        # This node's part of the PoP-wide prefix quota (docs/protocol.md#capacity-and-quota).
        least = 1.0 / pmap.num_partitions
        self.replica.store.quota.set_shares(
            max(float(mine.mean()), least),
            max(
                float(pmap.partition_counts(0)[self.state.self_index]) / pmap.num_partitions, least
            ),
        )
        self.repair.forget(self.view.set_table(pmap, self.state.self_index))
        if self.extension is not None:
            self.extension.sized(self.view, len(pmap.members))
        if old is not None:
            acquired = np.flatnonzero(mine & ~self.state.replicas)
            self.state.part_ready[acquired] = False
            self.epochs += 1
            if acquired.size:
                self.tasks.spawn(f"handoff-{pmap.epoch}", self._handoff(acquired, old))
        self.state.replicas = mine
        self._epoch_since_ms = self._mono()
        self._dropped_since_epoch = False
        log.info(
            "node %s (pop %s) epoch %d: %d members, %d replicas, W=%d R=%d, primary of %d",
            cfg.node_id,
            cfg.pop,
            pmap.epoch,
            len(pmap.members),
            pmap.replication_factor,
            self.view.write_quorum,
            self.view.read_quorum,
            pmap.partition_counts(0)[self.state.self_index],
        )

    # ------------------------------------------------------------------ SWIM

    def gossip_in(self, states: list[MemberState]) -> None:
        """Merge a peer's membership view (every probe carries one each way)."""
        m = self.membership
        refuted, dead = m.refutations, m.declared_dead
        if m.apply(states, self._mono()):
            self.rebuild()
        if (m.refutations, m.declared_dead) != (refuted, dead) and self.state.first_sync.is_set():
            # Suspected or declared dead: resync before answering alone (start_resync).
            self.start_resync(declared=m.declared_dead != dead)

    async def _join(self) -> None:
        """Ask the configured seeds for their view until one answers."""
        if self.state.joined:
            return
        for address in self.config.seeds:
            seed = Member(f"seed:{address}", address)
            try:
                _, view = await self._transport.ping(seed, self.membership.view())
            except PeerUnreachable as e:
                log.info("seed %s did not answer: %s", address, e)
                continue
            self.gossip_in(view)
            self.state.joined = True
            log.info("joined through seed %s: %d members", address, len(self.state.table.members))
            return

    async def probe_step(self) -> None:
        """Probe every other active member directly, carrying our view; a member that
        does not answer is probed indirectly through up to ``indirect_probes`` others
        before it is suspected. Then declare dead the suspects whose time ran out."""
        peers = [m for m in self.membership.active() if m.node_id != self.config.node_id]

        async def direct(member: Member) -> bool:
            started = self.view.now_ms()
            try:
                epoch, view = await self._transport.ping(member, self.membership.view())
            except PeerUnreachable as e:
                self.view.mark_failed(member, e, started)
                return False
            self.view.mark_ok(member)
            try:
                self.gossip_in(view)
                self.view.saw_epoch(member.node_id, epoch)
            except Exception as e:  # one peer's answer: skipped, the others still count
                self.tasks.error("probe", e)
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
            log.warning("declared dead: %s", sorted(inactive(self.membership)))
            self.rebuild()
        for member in self.view.pmap.members:
            if self.repair.hints.count(member.node_id) and self.view.is_up(member):
                await self._deliver_hints(member)

    async def ping_req(self, node_id: str, address: str) -> bool:
        """Probe a member for a peer that could not reach it (SWIM's indirect probe).
        Only a member of this view at that very address: any other target is answered
        False without a call (a node dials no address a caller names)."""
        s = self.membership.members.get(node_id)
        if s is None or s.member().peer != address or node_id == self.config.node_id:
            self.ping_req_refused += 1
            return False
        try:
            _, view = await self._transport.ping(s.member(), self.membership.view())
        except PeerUnreachable:
            return False
        self.gossip_in(view)
        return True

    async def _indirect(self, via: Member, target: Member) -> bool:
        try:
            return await self._transport.ping_req(via, target)
        except PeerUnreachable:
            return False

    async def leave(
        self, timeout_s: float, drain: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Graceful leave: stop taking calls, announce LEFT, let this node's writes in
        flight end (``drain``), then push its partitions to their new replicas, to each
        at once, until their digests match ours (the whole bounded by ``timeout_s``)."""
        if self.state.pmap is None or self.state.leaving:
            return
        self.state.leaving = True
        # Stop coordinating at once: the others stop sending us writes as soon as they
        # hear we left, so our copy may fall behind. Callers get UNAVAILABLE and retry
        # at another replica; the internal service keeps serving the hand-off.
        self.state.accepting = False
        self.membership.leave()
        others = [m for m in self.state.table.members if m.node_id != self.config.node_id]
        started = time.perf_counter()
        pushed: list[str] = []

        async def push(member: Member, partitions: npt.NDArray[np.intp]) -> None:
            try:
                await self.repair.sync_with(member, push=True, partitions=partitions)
                pushed.append(member.node_id)
            except PeerUnreachable as e:
                log.warning("leave hand-off to %s failed: %r", member.node_id, e)

        async def handoff() -> None:
            await asyncio.gather(*(self._announce(m) for m in others), return_exceptions=True)
            if drain is not None:
                # A write of ours still in flight is hidden from the export below; one
                # that then reached its quorum would be missing on the new replicas that
                # pulled the partition meanwhile (docs/protocol.md#leave). Let those
                # writes end first, so that the push carries them.
                await drain()
            if not self.membership.active():
                return  # the last member: nobody to hand off to
            successor = PartitionMap.build(
                self.membership.active(),
                self.config.num_partitions,
                min(self.config.replication_factor, len(self.membership.active())),
                self.config.vnodes,
            )
            held = np.flatnonzero(self.state.replicas)
            # To every new replica at once: a slow or unreachable one does not hold up
            # the others.
            await asyncio.gather(
                *(
                    push(member, held[(successor.replicas[held] == i).any(axis=1)])
                    for i, member in enumerate(successor.members)
                    if (successor.replicas[held] == i).any()
                )
            )

        try:
            async with asyncio.timeout(timeout_s):
                await handoff()
            log.info("left after handing off to %s in %.2f s", pushed, _since(started))
        except TimeoutError:
            log.warning("leave hand-off incomplete after %.2f s", _since(started))

    async def _announce(self, member: Member) -> None:
        with contextlib.suppress(PeerUnreachable):
            await self._transport.ping(member, self.membership.view())

    # ------------------------------------------------------------------ loops

    def tick(self) -> None:
        self.check_pause()
        self._last_tick_ms = self._mono()

    async def _deliver_hints(self, member: Member) -> None:
        await self.repair.deliver_hints(member)

    async def anti_entropy_step(self) -> None:
        if self.state.in_sync and not self.state.leaving:
            # Not copies of coordinated writes still open to an undo (dht.proto
            # FetchRequest): a write answered as failed must not spread meanwhile.
            await self.repair.anti_entropy_round(settled_only=True)
            self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Drop the partitions this node no longer replicates, once the table has been
        stable for ``handoff_grace_s`` (their new replicas have long pulled them)."""
        if not self._dropped_since_epoch and (
            self._mono() - self._epoch_since_ms >= self.config.handoff_grace_s * 1000
        ):
            self._dropped_since_epoch = True
            # What this node no longer replicates it no longer holds in full either.
            self.state.part_ready &= self.state.replicas
            n = self.replica.store.drop_partitions(
                self.state.replicas
            ) + self.replica.affinity.drop_partitions(self.state.replicas)
            if n:
                self.dropped += n
                log.info("dropped %d copies of partitions handed off to other nodes", n)

    # ------------------------------------------------------------------ resync

    def check_pause(self) -> None:
        """A long gap since the last tick means this process was paused: peers may have
        coordinated our partitions meanwhile, so resync before trusting our copy. Called
        by the ticker and by every batch (after a SIGCONT a call may run before a tick).
        A gap as long as the suspicion timeout may have got it declared dead: its copy
        then counts in no quorum until the resync, not only once gossip tells it."""
        now = self._mono()
        gap = now - self._last_tick_ms
        if gap > self.config.pause_threshold_ms:
            self._last_tick_ms = now
            self.pauses += 1
            log.warning("event loop was paused for %d ms: resyncing", gap)
            self.start_resync(declared=gap >= self.config.suspicion_timeout_s * 1000)

    def start_resync(self, declared: bool = False) -> None:
        """Distrust the local copy until a resync round got through (start, pause, or
        ``declared``: the others declared this node dead). The terms it held may have been
        taken over meanwhile: take them over again before the next write rather than
        learn it from a refused one. A resync already running (after the pause that got
        this node declared dead, say) goes on, counting replicas again from this moment
        with the count ``declared`` needs (see replicas_to_reach)."""
        if declared:
            # Its copy lacks writes acknowledged in a table without it: until the resync
            # is done it counts in no quorum (nor answers alone, docs/protocol.md#quorums).
            self._declared = True
            self.state.part_ready[self.state.replicas] = False
        self.state.resyncing = True
        self.terms.forget_held()
        if self._resync is None or self._resync.done():
            self._resync = self.tasks.start("resync", self._resync_loop())

    def _need(self, lost_data: bool) -> int:
        return replicas_to_reach(
            self.state.table.replication_factor, self.view.write_quorum, lost_data
        )

    async def _resync_loop(self) -> None:
        """Pull every partition that differs from the peers until enough replicas of each
        partition took part (see replicas_to_reach); then the whole local copy counts again."""
        self.repair.stats.resyncs += 1
        lost_data = not self.state.first_sync.is_set()
        started = time.perf_counter()
        took_part: set[str] = set()
        while not self.tasks.stopping.is_set():
            if self._declared:
                # Declared dead (before this resync or while it ran): more replicas must
                # take part, all after it (writes were acknowledged without this node).
                self._declared, lost_data = False, True
                took_part.clear()
            try:
                done = await self._resync_round(took_part, lost_data)
                self.tasks.succeeded("resync")
                if done and not self._declared:
                    break
            except Exception as e:  # one bad round (a peer's answer, a copy): try again
                self.tasks.error("resync", e)
            await self.tasks.pause(self.config.probe_interval_s)
        if self.tasks.stopping.is_set():
            return
        self.state.part_ready[self.state.replicas] = True
        self.state.resyncing = False
        self.state.first_sync.set()
        if not self.state.leaving:
            self.state.accepting = True
        log.info(
            "in sync after %.2f s (%d records)",
            time.perf_counter() - started,
            len(self.replica.store),
        )

    async def _resync_round(self, took_part: set[str], lost_data: bool) -> bool:
        """One round of the resync loop; True once enough replicas took part."""
        await self._join()
        await self.probe_step()
        # Pull only once every peer that is up uses our table: writes acknowledged
        # under another table (say, while the others had declared us dead) are then
        # already on them.
        if self.view.epochs_agree():
            took_part |= await self.repair.anti_entropy_round(push=False)
        mine = np.flatnonzero(self.state.replicas)
        return covered(
            self.state.table,
            self.config.node_id,
            mine,
            took_part,
            self._need(lost_data),
            inactive(self.membership, self.state.table),
        )

    async def _handoff(self, acquired: npt.NDArray[np.intp], old: PartitionMap) -> None:
        """Stream the partitions this node newly replicates from their previous replicas
        (and any other replica that has them) until enough of the old replicas answered."""
        started = time.perf_counter()
        self.transfers += int(acquired.size)
        took_part: set[str] = set()
        while not self.tasks.stopping.is_set() and self.state.pmap is not None:
            acquired = acquired[~self.state.part_ready[acquired]]
            if not acquired.size:
                break
            holders = {m.node_id: m for m in self.state.table.members}
            holders.update({m.node_id: m for m in old.members})
            holders.pop(self.config.node_id, None)
            for member in holders.values():
                if member.node_id in took_part or not self.view.is_up(member):
                    continue
                try:
                    await self.repair.sync_with(member, push=False, partitions=acquired)
                except PeerUnreachable as e:
                    self.view.mark_failed(member, e)
                    continue
                except Exception as e:  # one peer's copies: skipped, the others go on
                    self.tasks.error("handoff", e)
                    continue
                took_part.add(member.node_id)
            if covered(
                old,
                self.config.node_id,
                acquired,
                took_part,
                self._need(True),
                inactive(self.membership, old),
            ):
                self.state.part_ready[acquired] = True
                break
            await self.tasks.pause(self.config.probe_interval_s)
        self.transfers -= int(acquired.size)
        log.info("hand-off of %d partitions done in %.2f s", acquired.size, _since(started))


def replicas_to_reach(rf: int, w: int, lost_data: bool) -> int:
    """Replicas of a partition (``rf`` of them, write quorum ``w``) a (re)sync must reach
    to see every acknowledged write this node may lack. An acknowledged write is on W
    replicas. A node that kept its data but missed writes (a pause) finds each one on
    RF - W of the others; a node that lost or never had the data (a restart, a hand-off)
    may itself have been one of the W, so it needs RF - W + 1. So does a node the others
    declared dead: they acknowledged writes on W replicas of a table without it; its
    replicas in the table it is back in may include all RF - W of that table's replicas
    that missed a write (the others were handed everything), so only RF - W + 1 of them
    are sure to include a holder."""
    return min(rf - 1, rf - w + 1 if lost_data else rf - w)


def inactive(membership: Membership, *tables: PartitionMap) -> set[str]:
    """Members of the view, or of ``tables``, that are not active (a DEAD or LEFT state,
    or one forgotten since: docs/protocol.md#membership)."""
    active = {m.node_id for m in membership.active()}
    ids = {s.node_id for s in membership.view()}
    for t in tables:
        ids |= {m.node_id for m in t.members}
    return ids - active


def _since(started: float) -> float:
    return time.perf_counter() - started


def membership_of(config: NodeConfig, me: MemberState, now_ms: int) -> Membership:
    """This node's membership view, with the configured bounds."""
    return Membership(
        me,
        round(config.suspicion_timeout_s * 1000),
        now_ms=now_ms,
        forget_ms=round(config.member_forget_s * 1000),
        max_members=config.max_members,
    )


def table_of(config: NodeConfig, membership: Membership) -> PartitionMap:
    """The partition table of the active members."""
    active = membership.active()
    rf = min(config.replication_factor, len(active))
    return PartitionMap.build(active, config.num_partitions, rf, config.vnodes)
