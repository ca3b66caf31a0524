"""One DHT node: its parts, composed, and their lifecycle.

The parts (docs/architecture.md#the-parts-of-a-node), each given its collaborators here:

* the stores (dht.store) and the HLC clock;
* :class:`~dht.node.writes.Coordinator`: a batch call's whole life on this node
  (validate, route, lock, take over, apply, replicate, settle or undo);
* :class:`~dht.node.replica.Replica`: what peers ask of this node's copies;
* :class:`~dht.node.replication.Replicator` and :class:`~dht.node.repair.Repair`: the
  coordinator's half of replication, and hints and anti-entropy, over a
  :class:`~dht.node.peerview.PeerView` of the other nodes and the
  :class:`~dht.node.terms.Terms` both halves of replication share;
* :class:`~dht.node.liveness.Liveness`: SWIM, join, leave, hand-off, pauses, resync;
* gauges (dht.node.gauges).

The node is built in two steps: ``Node(...)`` (stores, clock, extension) and
:meth:`Node.init_membership` once its real ports are known (a config may say 0 = a free
port); the parts that need a table are built then. The gRPC shell is dht.edge.server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import numpy as np
import numpy.typing as npt
from prometheus_client.core import Metric

from dht.core import metrics as m
from dht.core.clock import MonoMs, monotonic_ms
from dht.core.config import NodeConfig
from dht.core.errors import NotReady
from dht.core.ingress import Checked
from dht.core.membership import Membership, MemberState, MemberStatus
from dht.core.ops import BatchCall
from dht.core.placement import PartitionMap
from dht.core.record import HybridClock, hlc_pack
from dht.core.wire import EntryArray, U64Array, check_batch_size
from dht.node.extension import NodeExtension
from dht.node.gauges import (
    ingress_gauges,
    membership_gauges,
    replication_gauges,
    store_gauges,
    undo_gauges,
)
from dht.node.inflight import InFlight
from dht.node.liveness import Liveness, membership_of, table_of
from dht.node.overload import Overload
from dht.node.peerview import PeerView
from dht.node.repair import Repair
from dht.node.replica import Replica
from dht.node.replication import ReplicationConfig, Replicator
from dht.node.state import NodeState
from dht.node.stats import Stats
from dht.node.tasks import Tasks
from dht.node.terms import Terms
from dht.node.transport import ForwardCall, MergeResult, PeerTransport
from dht.node.writes import Coordinator
from dht.store.affinity import AffinityStore
from dht.store.flows import FlowStore

log = logging.getLogger(__name__)

# Copies a repair call ships at once.
REPAIR_BATCH_ENTRIES = 5_000


class Node:
    """One node of a PoP. Its collaborators are given here: ``transport`` for calls to
    the other nodes of the PoP, ``forward`` for one-hop forwarding of keys to their
    coordinator (None: answer MOVED instead), ``extension`` builds the hooks that live
    outside the node (cross-PoP shipping, dht.pops) from it. ``wall_ms`` and ``mono_ms``
    are the wall clock (HLC stamps) and the monotonic clock (intervals), for tests that
    drive time themselves."""

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
        self.pop_id = config.pop_id
        self.metrics = m.NodeMetrics()
        self.clock = HybridClock(config.max_clock_offset_ms, wall_ms)
        self.store = FlowStore(config.ttl, config.limits, self.clock)
        lim = config.limits
        self.affinity = AffinityStore(lim.max_affinity_records, lim.hard_max_affinity_records)
        self.state = NodeState(config.num_partitions, joined=not config.seeds)
        self.tasks = Tasks(config.node_id)
        self.overload = Overload(config.overload_lag_ms, mono_ms)
        self.inflight = InFlight()
        self.stats = Stats()
        # Terms are HLC stamps. A restart forgets the promises it made; terms handed out
        # before it are below its wall clock at start (up to a clock offset, which a
        # restart - a new process, imports, a refill - outlasts).
        self.terms = Terms(config.num_partitions, hlc_pack(self.clock.wall_ms(), 0))
        self._transport = transport
        self._forward = forward
        self.mono_ms = mono_ms  # the monotonic clock the node's parts (and pops) use
        self.grpc_port = 0
        self.admin_port = 0
        self.membership: Membership
        self.view: PeerView
        self.replicator: Replicator
        self.repair: Repair
        self.liveness: Liveness
        self._coordinator: Coordinator | None = None
        self.replica = Replica(
            config,
            self.state,
            self.store,
            self.affinity,
            self.clock,
            self.terms,
            self.inflight,
            mono_ms,
            prev_table=lambda: self.view.prev,
        )
        self.extension: NodeExtension | None = None
        self.metrics.add_gauges(self._gauges)
        self.metrics.add_gauges(self.overload.gauges)
        if extension is not None:
            self.extension = extension(self)

    def init_membership(self, grpc_port: int, admin_port: int, peer_port: int = 0) -> None:
        """This node, alive at a fresh incarnation, plus its configured peers (assumed
        alive until they say otherwise); further members arrive by gossip and --seeds.
        Builds the parts that need a table. ``peer_port``: the peer plane's port (0: the
        peer plane is served on ``grpc_port``, as in the simulator)."""
        cfg = self.config
        self.grpc_port, self.admin_port = grpc_port, admin_port
        self.peer_port = peer_port or grpc_port
        admin = f"{cfg.advertised}:{admin_port}" if admin_port > 0 else ""
        me = MemberState(
            cfg.node_id,
            f"{cfg.advertised}:{grpc_port}",
            admin,
            self.clock.wall_ms(),  # a restart outranks every rumour about the old process
            MemberStatus.ALIVE,
            f"{cfg.advertised}:{peer_port}" if peer_port else "",
        )
        self.membership = membership_of(cfg, me, self.mono_ms())
        for peer in cfg.peers:
            self.membership.add_seed(peer, self.mono_ms())
        pmap = table_of(cfg, self.membership)
        failure_timeout_ms = round(cfg.failure_timeout_s * 1000)
        self.view = PeerView(
            pmap,
            pmap.index_of(cfg.node_id),
            self._transport,
            write_quorum=cfg.write_quorum or 0,
            failure_timeout_ms=failure_timeout_ms,
            joint_ms=failure_timeout_ms + cfg.max_clock_offset_ms,
            mono_ms=self.mono_ms,
            on_peer_up=lambda member: self.tasks.spawn(
                f"hints->{member.node_id}", self.repair.deliver_hints(member)
            ),
        )
        self.repair = Repair(
            self.view,
            self._transport,
            self.replica,
            self.stats,
            hint_limit=cfg.hint_limit,
            batch_entries=REPAIR_BATCH_ENTRIES,
        )
        self.replicator = Replicator(
            self.view,
            self.terms,
            self._transport,
            self.replica,
            self.repair,
            self.stats,
            ReplicationConfig(
                write_quorum=cfg.write_quorum or 0,
                rpc_timeout_ms=cfg.rpc_timeout_ms,
                failure_timeout_ms=failure_timeout_ms,
                max_clock_offset_ms=cfg.max_clock_offset_ms,
            ),
            self.state.part_ready,
            leaving=lambda: self.state.leaving,
        )
        self.liveness = Liveness(
            cfg,
            self.state,
            self.membership,
            self.view,
            self.repair,
            self.terms,
            self.replica,
            self._transport,
            self.tasks,
            self.mono_ms,
            self.extension,
        )
        self._coordinator = Coordinator(
            cfg,
            self.state,
            self.store,
            self.affinity,
            self.clock,
            self.view,
            self.terms,
            self.replicator,
            self.replica,
            self.inflight,
            self.metrics,
            forward=self._forward,
            extension=self.extension,
            check_pause=self.liveness.check_pause,
            spawn=self.tasks.spawn,
        )
        self.liveness.adopt(pmap, None)

    # ------------------------------------------------------------------ lifecycle

    def start_loops(self) -> None:
        cfg = self.config
        live = self.liveness
        self.tasks.stopping.clear()
        live.tick()
        every = self.tasks.every
        self.tasks.spawn("purge", every(cfg.purge_interval_s, self.purge_step, "purge"))
        self.tasks.spawn("pause-detector", every(0.1, live.tick, "pause-detector"))
        self.tasks.spawn("overload", self.overload.watch())
        self.tasks.spawn("probe", every(cfg.probe_interval_s, live.probe_step, "probe"))
        self.tasks.spawn(
            "anti-entropy",
            every(cfg.anti_entropy_interval_s, live.anti_entropy_step, "anti-entropy"),
        )
        live.start_resync()

    async def stop_loops(self) -> None:
        """Stop every loop; writes in flight get two RPC timeouts to end (acknowledged
        or undone), then everything still running is cancelled."""
        self.tasks.stopping.set()
        coordinator = self._coordinator
        if coordinator is not None:
            await coordinator.drain(2 * self.config.rpc_timeout_ms / 1000)
        await self.tasks.cancel_all(*(coordinator.writes if coordinator is not None else ()))
        if coordinator is not None:
            await self.replicator.close()

    async def leave(self, timeout_s: float) -> None:
        """Graceful leave (see Liveness.leave): this node's writes in flight end first
        (at most two RPC timeouts), so that the hand-off carries them."""
        coordinator = self._coordinator
        if coordinator is not None:
            await self.liveness.leave(
                timeout_s, drain=lambda: coordinator.drain(2 * self.config.rpc_timeout_ms / 1000)
            )

    def purge_step(self) -> None:
        now = self.clock.wall_ms()
        budget = self.config.purge_budget
        self.store.purge_expired(now, budget)
        self.affinity.purge_expired(now - self.config.ttl.tombstone_extra_ms, budget)

    def spawn(self, name: str, coro: Awaitable[None]) -> None:
        """Start an owned background task; a failure is logged and shows in /readyz."""
        self.tasks.spawn(name, coro)

    async def every(
        self, interval_s: float, step: Callable[[], Awaitable[None] | None], name: str | None = None
    ) -> None:
        await self.tasks.every(interval_s, step, name)

    # ------------------------------------------------------------------ state

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            raise NotReady("node has not started")
        return self._coordinator

    @property
    def table(self) -> PartitionMap:
        return self.state.table

    @property
    def pmap(self) -> PartitionMap | None:
        return self.state.pmap

    @property
    def self_index(self) -> int:
        return self.state.self_index

    @property
    def part_ready(self) -> npt.NDArray[np.bool_]:
        return self.state.part_ready

    @property
    def in_sync(self) -> bool:
        return self.state.in_sync

    @property
    def first_sync(self) -> asyncio.Event:
        return self.state.first_sync

    @property
    def accepting(self) -> bool:
        return self.state.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.state.accepting = value

    @property
    def joined(self) -> bool:
        return self.state.joined

    @property
    def leaving(self) -> bool:
        return self.state.leaving

    @property
    def failed_loops(self) -> dict[str, str]:
        """Loops that ended with an error, and loops whose every recent step failed."""
        return {**self.tasks.failing, **self.tasks.failed}

    @property
    def peers_transport(self) -> PeerTransport:
        return self._transport

    @property
    def rollbacks(self) -> int:
        return self._coordinator.rollbacks if self._coordinator is not None else 0

    @property
    def undone_for_others(self) -> int:
        return self.replica.undone_for_others

    @property
    def pauses(self) -> int:
        """Event-loop pauses detected (each starts a resync)."""
        return self.liveness.pauses if self._coordinator is not None else 0

    @property
    def dropped(self) -> int:
        return self.liveness.dropped

    def live(self) -> bool:
        return not self.failed_loops

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not). Ready = serving and holding all its partitions."""
        state = self.state
        reasons = []
        if not state.accepting:
            reasons.append("not accepting calls (starting or stopping)")
        if not state.joined:
            reasons.append("joining: no seed answered yet")
        if state.leaving:
            reasons.append("leaving: handing its partitions off")
        if not state.in_sync:
            reasons.append("refilling its partitions from the other replicas")
        failed = self.failed_loops
        if failed:
            reasons.extend(f"background loop {k} failed: {v}" for k, v in failed.items())
        if self.store.over_hard_limit:
            reasons.append("store is over its hard record ceiling")
        if self.extension is not None:
            reasons.extend(self.extension.not_ready())
        return (not reasons, reasons)

    # ------------------------------------------------------------------ the FlowTable calls

    async def batch(self, call: BatchCall) -> bytes:
        """Validate, route and apply one batch call; returns packed result records.

        Raises InvalidArgument / LimitExceeded for malformed calls (nothing applied);
        per-key outcomes, including UNAVAILABLE, are statuses in the results."""
        return await self.coordinator.batch(call)

    def lookup_local(self, key: bytes) -> bytes | None:
        """A Lookup of one key answered from this node's copy alone (the UDP listener's
        fast path), or None: see Coordinator.lookup_local."""
        return self.coordinator.lookup_local(key)

    # ------------------------------------------------------------------ the NodeInternal calls

    def gossip_in(self, states: list[MemberState]) -> None:
        self.liveness.gossip_in(states)

    def internal_replicate(
        self,
        raw: bytes,
        issued_hlc: int = 0,
        terms: npt.NDArray[np.uint64] | None = None,
        from_node: str = "",
    ) -> MergeResult:
        return self.replica.replicate(raw, issued_hlc, terms, from_node)

    def internal_undo(
        self, raw_written: bytes, raw_before: bytes, terms: U64Array, from_node: str
    ) -> npt.NDArray[np.intp]:
        return self.replica.undo(raw_written, raw_before, terms, from_node)

    def internal_promise(
        self, parts: npt.NDArray[np.intp], term: int, from_node: str
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        """The promised term per partition, and where this node's copy is incomplete
        (NodeState.incomplete)."""
        return self.replica.promise(parts, term, from_node), self.state.incomplete(parts)

    def internal_copies(self, raw: bytes) -> tuple[bytes, npt.NDArray[np.bool_]]:
        return self.replica.read_copies(raw)

    def internal_digests(
        self, partitions: npt.NDArray[np.intp]
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        return self.replica.digests(partitions)

    def internal_fetch(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> AsyncIterator[bytes]:
        return self.replica.fetch(partitions, settled_only)

    def partitions_arg(self, raw: bytes) -> npt.NDArray[np.intp]:
        """A packed partition list from the wire, checked against this node's table."""
        check_batch_size(len(raw), 2, 65535, "partitions")
        parts = np.frombuffer(raw, dtype=">u2").astype(np.intp)
        self.replica.check_partitions(parts)
        return parts

    def merge_entries(self, entries: EntryArray, checked: bool = False) -> MergeResult:
        return (self.replica.merge_checked if checked else self.replica.merge_entries)(entries)

    def check_entries(self, entries: EntryArray) -> Checked:
        """The ingress checks of copies from the network, counted (dht.core.ingress)."""
        return self.replica.check(entries)

    def export_entries(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> EntryArray:
        return self.replica.export_entries(partitions, settled_only)

    def partition_digests(self) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        return self.replica.partition_digests()

    # ------------------------------------------------------------------ metrics

    def _gauges(self) -> Iterable[Metric]:
        ready, _ = self.readiness()
        yield from store_gauges(
            self.store, self.affinity, self.clock, ready, self.state.in_sync, self.pauses
        )
        yield m.counter(
            "dht_loop_errors",
            "failed steps of background loops (each skipped; the loop went on), by loop",
            ["loop"],
            {(k,): v for k, v in self.tasks.errors.items()},
        )
        yield from ingress_gauges(self.replica.ingress_refused)
        if self.state.pmap is not None:
            yield from membership_gauges(self.membership, self.liveness.ping_req_refused)
        yield from undo_gauges(self.replica.undo_refused, self.replica.replaced_failed)
        if self._coordinator is None or self.state.pmap is None:
            return
        yield from replication_gauges(
            self.state.pmap, self.state, self.view, self.repair, self.stats, self.rollbacks
        )
