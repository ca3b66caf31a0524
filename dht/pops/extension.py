"""Several PoPs: shipping writes between them, anti-entropy and resync, client affinity
(docs/protocol.md#shipping-between-pops).

Every PoP holds the whole table. A node ships the writes it coordinated (and got
acknowledged inside its PoP) to one node of every other PoP, in batches over a gRPC
stream, each batch acknowledged once the receiving PoP holds every record on its write
quorum. What is shipped is decided by the pure policy in :mod:`dht.pops.shipping`.

* **At-least-once.** A batch stays in flight until acknowledged and is resent on a new
  stream (to the peer PoP's next node) after a failure; merge is idempotent, so a
  duplicate changes nothing. The queue per peer PoP is bounded (the resend buffer);
  a peer that falls behind it is repaired by a resync once it answers again.
* **Anti-entropy.** Every ``pop_anti_entropy_interval_s`` each node compares digests of
  its primary partitions with each other PoP (the shipped set, expiry left out) and
  exchanges the partitions that differ, both ways. A node that starts (a PoP restarted
  from empty) does the same over all the partitions it replicates before /readyz says
  ready: the bulk resync.
* **Applied only through merge.** The receiving node applies a batch to its own PoP's
  replicas of each record's partition (its own store through ``merge_entries``, the
  others through the replication call), so a remote record is as durable as a local
  write when acknowledged. A stamp further ahead than the maximum clock offset is
  rejected and counted. Remote records are never shipped on (no loops: only writes a
  node coordinated for a client enter the queues; anti-entropy exchanges are repairs).
* **Affinity.** A confirmed claim makes the claiming PoP the client prefix's preferred
  PoP (``affinity_on_confirm``); a flow lookup that finds nothing returns the preferred
  PoP, if any, flagged FLAG_AFFINITY_FALLBACK, status still NOT_FOUND
  (``affinity_fallback``).
* **Second chance.** A Lookup with ``second_chance`` set asks the other PoPs about the
  flows it found nothing for, at once and bounded by ``second_chance_timeout_s``
  (:mod:`dht.pops.second`); a live copy found there is answered OK, flagged
  FLAG_SECOND_CHANCE. The other PoPs answer through :meth:`Pops.lookup_for`.
* **Sizing.** A PoP smaller than the replication factor gets quorums that survive a
  failed node (:mod:`dht.core.sizing`).

The parts: :class:`Pops` here is what the node and the PopLink service call (the node's
hooks, the lifecycle, the receiving side); each link to another PoP, with its ship loop
and digest exchange, is a :class:`dht.pops.link.PeerPop`; the metrics are in
:mod:`dht.pops.gauges`. The I/O goes through :class:`dht.pops.transport.PopTransport`
(gRPC in :mod:`dht.edge.pop_grpc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator, Iterable

import numpy as np
import numpy.typing as npt
from prometheus_client.core import Metric

from dht.core import sizing
from dht.core.errors import InvalidArgument
from dht.core.ingress import Bounds
from dht.core.ops import BatchCall, Op
from dht.core.peers import replica_mask
from dht.core.placement import Member
from dht.core.record import ClockOffsetError, State, Status, hlc_physical_ms
from dht.core.wire import (
    ENTRY_DTYPE,
    ENTRY_SIZE,
    KEY_DTYPE,
    KIND_FLOW,
    EntryArray,
    ResultArray,
    check_batch_size,
)
from dht.node.node import Node
from dht.node.peerview import PeerView
from dht.node.transport import PeerUnreachable
from dht.pops.gauges import pop_metrics
from dht.pops.hints import Hints
from dht.pops.link import EXCHANGE_BATCH, PeerPop
from dht.pops.second import SecondChance
from dht.pops.shipping import (
    IS_SHIPPED,
    DelayLine,
    Kind,
    birth_ms,
    classify,
    entry_hashes,
    exchanged_set,
    pop_digests,
)
from dht.pops.transport import Digests, PopTransport, PopUnreachable, ShipResult

log = logging.getLogger(__name__)


class Pops:
    """The node's extension for several PoPs (see the module docstring). One per node,
    used from its event loop."""

    def __init__(self, node: Node, transport: PopTransport) -> None:
        cfg = node.config
        self.node = node
        self.config = cfg
        self.transport = transport
        self.links: dict[str, PeerPop] = {}
        for i, (name, addresses) in enumerate(sorted(cfg.pop_peers.items())):
            dial = [cfg.dial_via.get(a, a) for a in addresses]
            # Spread the PoP's nodes over the peer's nodes.
            first = (zlib.crc32(cfg.node_id.encode()) + i) % len(dial)
            self.links[name] = PeerPop(
                name, cfg.pops[name], dial, first, config=cfg, transport=transport, home=self
            )
        second = SecondChance(
            transport, Bounds.of(cfg), cfg.second_chance_timeout_s, node.metrics.registry
        )
        self.hints = Hints(node, list(self.links.values()), second)
        self.delay = DelayLine(cfg.ship_buffer_records)
        self.replicate_after_ms = round(cfg.replicate_after_s * 1000)
        self.received: dict[str, int] = {}
        self.conflicts = 0
        self.rejected = 0
        self.skipped: dict[str, int] = {}
        self.quorums: sizing.Quorums | None = None
        self._pop_size = 0
        self._started_ms = self.node.mono_ms()
        self.startup = asyncio.Event()  # set once the start-up resync is done or timed out
        if not self.links:
            self.startup.set()
        node.metrics.add_gauges(self._gauges)

    # ------------------------------------------------------------------ node hooks

    def written(self, op: Op, entries: EntryArray, before: ResultArray) -> None:
        if not self.links or not len(entries):
            return
        now = self.node.clock.wall_ms()
        kinds = classify(entries, before, now, self.replicate_after_ms)
        waiting = np.flatnonzero(kinds == Kind.DELAY)
        if waiting.size:
            due = birth_ms(entries["rec"][waiting]) + self.replicate_after_ms
            raw = entries["key"][waiting].tobytes()
            keys = [raw[i : i + 40] for i in range(0, len(raw), 40)]
            self.delay.add(keys, due.tolist())
        tombs = np.flatnonzero(kinds == Kind.TOMBSTONE)
        if tombs.size and self.delay.waiting:
            # Released before the delay line shipped its established record: no other
            # PoP saw the flow, so its tombstone stays home too.
            raw = entries["key"][tombs].tobytes()
            unseen = self.delay.holds([raw[i : i + 40] for i in range(0, len(raw), 40)])
            kinds[tombs[unseen]] = Kind.NONE
        none = int(np.count_nonzero(kinds == Kind.NONE))
        if none:
            self.skipped[op.value] = self.skipped.get(op.value, 0) + none
        ship = IS_SHIPPED[kinds]
        if ship.any():
            self._enqueue(entries[ship].tobytes(), kinds[ship])

    def _enqueue(self, raw: bytes, kinds: npt.NDArray[np.uint8]) -> None:
        now = self.node.mono_ms()
        for link in self.links.values():
            link.enqueue(raw, kinds, now)

    async def after_batch(self, call: BatchCall, out: ResultArray) -> None:
        await self.hints.after_batch(call, out)

    async def lookup_for(self, raw: bytes, from_pop: int) -> bytes:
        """Another PoP's second chance: who owns these flows, from this PoP's table
        (a Lookup of its own; never asked further, no affinity hint)."""
        self.peer_pop_name(from_pop)
        return await self.node.batch(BatchCall(Op.LOOKUP, raw, peer_pop=from_pop))

    def sized(self, view: PeerView, members: int) -> None:
        cfg = self.config
        self._pop_size = max(self._pop_size, members)
        q = sizing.fit(cfg.replication_factor, cfg.write_quorum, self._pop_size, members)
        if q is None:
            self.quorums = None
            return
        view.write_quorum, view.read_quorum = q.write_quorum, q.read_quorum
        if q != self.quorums:
            log.warning(
                "PoP %s has %d node(s), fewer than replication_factor %d: using RF=%d W=%d "
                "R=%d so writes go on with a node down (an acknowledged write may be on one "
                "copy for a moment; see docs/protocol.md#small-pops)",
                cfg.pop,
                self._pop_size,
                cfg.replication_factor,
                q.replication_factor,
                q.write_quorum,
                q.read_quorum,
            )
        self.quorums = q

    def not_ready(self) -> list[str]:
        if self.startup.is_set():
            return []
        waiting = sorted(n for n, link in self.links.items() if not link.synced)
        return [f"resyncing from the other PoPs ({', '.join(waiting)})"]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loops (owned by the node: they stop with it)."""
        if not self.links:
            return
        node = self.node
        for link in self.links.values():
            node.spawn(f"ship->{link.name}", link.ship_loop())
        node.spawn("pop-resync", self._startup_resync())
        interval = self.config.pop_anti_entropy_interval_s
        node.spawn("pop-anti-entropy", node.every(interval, self._ae_step, "pop-anti-entropy"))
        if self.replicate_after_ms:
            node.spawn("pop-delay-line", node.every(0.1, self._delay_step, "pop-delay-line"))

    async def close(self) -> None:
        await self.transport.close()

    # ------------------------------------------------------------------ the delay line

    async def _delay_step(self) -> None:
        """Ship the established records that have become old enough, if still established."""
        keys = self.delay.due(self.node.clock.wall_ms())
        if not keys:
            return
        raw = b"".join(keys)
        copies = np.frombuffer(self.node.internal_copies(raw)[0], dtype=ENTRY_DTYPE["rec"])
        keep = (copies["status"] == Status.OK) & (copies["state"] == State.ESTABLISHED)
        if keep.any():
            entries = np.zeros(int(keep.sum()), dtype=ENTRY_DTYPE)
            entries["key"] = np.frombuffer(raw, dtype=KEY_DTYPE)[keep]
            entries["rec"] = copies[keep]
            entries["rec"]["status"] = Status.OK
            self._enqueue(entries.tobytes(), np.full(len(entries), Kind.ESTABLISHED, np.uint8))

    # ------------------------------------------------------------------ anti-entropy

    def _primaries(self) -> npt.NDArray[np.intp]:
        node = self.node
        return np.flatnonzero(node.table.primaries == node.self_index)

    async def _ae_step(self) -> None:
        node = self.node
        if not node.in_sync or node.leaving or not node.first_sync.is_set():
            return
        for link in self.links.values():
            try:
                await link.sync_with(self._primaries())
            except PopUnreachable as e:
                link.failed(e)
            except Exception as e:  # one PoP's exchange: skipped, the other PoPs go on
                self.loop_error("pop-anti-entropy", e)

    async def _startup_resync(self) -> None:
        """Exchange every partition this node replicates with every other PoP once; until
        then (at most pop_resync_timeout_s) /readyz says not ready."""
        await self.node.first_sync.wait()
        deadline = self._started_ms + round(self.config.pop_resync_timeout_s * 1000)
        while not all(link.synced for link in self.links.values()):
            for link in self.links.values():
                if not link.synced:
                    try:
                        await link.resync("start-up")
                    except Exception as e:  # tried again in a moment, as when unreachable
                        self.loop_error("pop-resync", e)
            if not self.startup.is_set() and self.node.mono_ms() >= deadline:
                log.warning(
                    "ready without a complete resync from %s after %.1f s (PoPs unreachable?)",
                    sorted(n for n, lk in self.links.items() if not lk.synced),
                    self.config.pop_resync_timeout_s,
                )
                self.startup.set()
            if not all(link.synced for link in self.links.values()):
                await asyncio.sleep(min(1.0, self.config.probe_interval_s))
        if not self.startup.is_set():
            log.info("resynced from the other PoPs: %s", sorted(self.links))
        self.startup.set()

    # ------------------------------------------------------------------ for the links

    @property
    def num_partitions(self) -> int:
        return self.node.table.num_partitions

    def mono_ms(self) -> int:
        return self.node.mono_ms()

    def loop_error(self, loop: str, e: BaseException) -> None:
        self.node.tasks.error(loop, e)

    def hlc_now(self) -> int:
        return self.node.clock.now()

    def cutoff_ms(self) -> int:
        return self.node.clock.wall_ms() - self.replicate_after_ms

    def replicated(self) -> npt.NDArray[np.intp]:
        node = self.node
        return np.flatnonzero(replica_mask(node.table, node.self_index))

    def export(self, partitions: npt.NDArray[np.intp]) -> EntryArray:
        return self.node.export_entries(partitions, settled_only=True)

    # ------------------------------------------------------------------ the receiving side

    def peer_pop_name(self, pop_id: int) -> str:
        name = self.config.pop_name(pop_id)
        if name is None or pop_id == self.node.pop_id:
            known = ", ".join(f"{i}={n}" for n, i in self.config.pops.items())
            raise InvalidArgument("from_pop", f"{pop_id} is not another known PoP ({known})")
        return name

    def _check_partitions(self, num_partitions: int) -> None:
        mine = self.node.table.num_partitions
        if num_partitions != mine:
            raise InvalidArgument(
                "num_partitions", f"{num_partitions} differs from this PoP's {mine}"
            )

    async def receive(
        self, raw: bytes, from_pop: int, sent_hlc: int, num_partitions: int
    ) -> ShipResult:
        """Apply records shipped from PoP ``from_pop`` to this PoP's replicas of their
        partitions; ok once every accepted record is on the write quorum. Raises
        InvalidArgument (naming the field) for a malformed batch (nothing is applied);
        a bad record in a well-formed batch is refused on its own (dht.core.ingress),
        counted, and the others applied."""
        name = self.peer_pop_name(from_pop)
        self._check_partitions(num_partitions)
        check_batch_size(len(raw), ENTRY_SIZE, 1_000_000, "entries")
        entries = np.frombuffer(raw, dtype=ENTRY_DTYPE)
        clock = self.node.clock
        limit = clock.wall_ms() + self.config.max_clock_offset_ms
        if sent_hlc and hlc_physical_ms(sent_hlc) <= limit:
            with contextlib.suppress(ClockOffsetError):  # our wall clock stepped back
                clock.observe(sent_hlc)
        checked = self.node.check_entries(entries)
        rejected = checked.n_refused
        if rejected:
            # A PoP whose clock runs ahead would win every conflict: its stamps count as
            # clock-offset rejections too.
            ahead = checked.refused.get("birth_ahead", 0)
            clock.rejected += ahead
            self.rejected += ahead
            log.warning("refused %d records from %s: %s", rejected, name, dict(checked.refused))
            entries = entries[checked.ok]
        self.received[name] = self.received.get(name, 0) + len(entries)
        if not len(entries):
            return ShipResult(True, 0, rejected)
        held, applied = await self._apply(entries)
        ok = bool(held.all())
        return ShipResult(ok, applied, rejected, "" if ok else "write quorum not reached")

    async def _apply(self, entries: EntryArray) -> tuple[npt.NDArray[np.bool_], int]:
        """Merge ``entries`` into every replica of their partitions in this PoP; per entry,
        whether the write quorum holds it, and the copies that changed a record here.
        ``entries`` passed the ingress checks (:meth:`receive`)."""
        node = self.node
        view = node.view
        table = node.table
        parts = table.partitions_of(entry_hashes(entries))
        reps = table.replicas[parts]
        mine = (reps == node.self_index).any(axis=1)
        if mine.any():
            self._count_conflicts(entries[mine])
        counts = np.zeros(len(entries), dtype=np.int32)
        applied = 0
        calls = []
        for member in np.unique(reps).tolist():
            idx = np.flatnonzero((reps == member).any(axis=1))
            if member == node.self_index:
                # receive() ran the ingress checks on them: not twice.
                applied += node.merge_entries(entries[idx], checked=True).applied
                counts[idx] += 1
            else:
                calls.append(self._replicate_to(table.members[member], entries, idx, counts))
        await asyncio.gather(*calls)
        return counts >= view.write_quorum, applied

    async def _replicate_to(
        self,
        member: Member,
        entries: EntryArray,
        idx: npt.NDArray[np.intp],
        counts: npt.NDArray[np.int32],
    ) -> None:
        view = self.node.view
        if view.is_up(member):
            started = view.now_ms()
            try:
                await self.node.peers_transport.replicate(
                    member, entries[idx].tobytes(), hinted=False
                )
            except PeerUnreachable as e:
                view.mark_failed(member, e, started)
            else:
                view.mark_ok(member)
                counts[idx] += 1
                return
        self.node.repair.hints.add(member.node_id, entries[idx])

    def _count_conflicts(self, entries: EntryArray) -> None:
        """Copies of one generation with different births: two PoPs claimed the flow
        while they could not see each other; merge keeps the earliest claim."""
        flows = entries[entries["key"]["kind"] == KIND_FLOW]
        if not len(flows):
            return
        now = self.node.clock.wall_ms()
        ours = np.frombuffer(
            self.node.internal_copies(flows["key"].tobytes())[0], ENTRY_DTYPE["rec"]
        )
        theirs = flows["rec"]
        conflict = (
            (ours["status"] == Status.OK)
            & (ours["expiry_ms"] > now)
            & (ours["generation"] == theirs["generation"])
            & (
                (ours["birth_hlc"] != theirs["birth_hlc"])
                | (ours["birth_pop"] != theirs["birth_pop"])
            )
        )
        self.conflicts += int(np.count_nonzero(conflict))

    def digests_for(
        self, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> Digests:
        """Answer another PoP: digests of the requested partitions this node holds in sync."""
        self._check_partitions(num_partitions)
        node = self.node
        if not node.in_sync:
            empty = np.zeros(0, dtype=np.intp)
            return Digests(empty, np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        held = replica_mask(node.table, node.self_index) & node.part_ready
        covered = partitions[held[partitions]]
        entries = node.export_entries(covered, settled_only=True)
        parts = (entry_hashes(entries) % np.uint64(num_partitions)).astype(np.intp)
        digests, counts = pop_digests(entries, parts, num_partitions, cutoff_ms)
        return Digests(covered, digests[covered], counts[covered])

    async def fetch_for(
        self, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> AsyncIterator[bytes]:
        """Answer another PoP: the exchanged set of ``partitions``, in batches."""
        self._check_partitions(num_partitions)
        node = self.node
        held = replica_mask(node.table, node.self_index) & node.part_ready
        entries = node.export_entries(partitions[held[partitions]], settled_only=True)
        entries = entries[exchanged_set(entries, cutoff_ms)]
        for start in range(0, len(entries), EXCHANGE_BATCH):
            yield entries[start : start + EXCHANGE_BATCH].tobytes()
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ metrics

    def _gauges(self) -> Iterable[Metric]:
        return pop_metrics(
            self.links.values(),
            self.received,
            self.conflicts,
            self.rejected,
            self.skipped,
            len(self.delay.items),
        )
