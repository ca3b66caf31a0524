"""One DHT node: the store, placement and routing of batches, wired to gRPC and timers.

Lifecycle (STYLE habit 6): ``await node.start()`` binds the gRPC server and the admin
endpoint, then starts the background loops; ``await node.stop()`` stops accepting calls,
gives in-flight calls ``shutdown_grace_s``, cancels the loops and closes channels. Safe to
call twice; ``async with Node(cfg) as node`` does both.

Routing (DESIGN section 3): every key is hashed to its partition; keys whose partition's
primary is this node are applied to the local store in one synchronous step (so claims on
a partition are serialized by its primary); the others are forwarded, one hop, to their
primary, or answered MOVED when the caller asked for that or the call was itself a
forward. A stale client table is thus corrected by MOVED or absorbed by forwarding,
never answered wrongly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import grpc
import numpy as np
import numpy.typing as npt
from prometheus_client.core import Metric

from dht import metrics as m
from dht.affinity import AffinityStore
from dht.config import NodeConfig
from dht.errors import InvalidArgument, NotReady
from dht.placement import Member, PartitionMap
from dht.record import HybridClock, Status
from dht.store import FlowStore
from dht.wire import (
    FORMAT_VERSION,
    KIND_FLOW,
    ResultArray,
    U64Array,
    affinity_keys,
    decode_clients,
    decode_keys,
    key_hashes,
    new_results,
    prefix_mask,
)

log = logging.getLogger(__name__)


class Op(Enum):
    CLAIM = "Claim"
    CONFIRM = "Confirm"
    LOOKUP = "Lookup"
    REFRESH = "Refresh"
    RELEASE = "Release"
    GET_AFFINITY = "GetAffinity"
    SET_AFFINITY = "SetAffinity"


@dataclass(frozen=True, slots=True)
class BatchCall:
    """A batch call as the node sees it, free of protobuf types (dht.api converts)."""

    op: Op
    payload: bytes  # packed keys (flow ops) or packed 16-byte client addresses (affinity)
    format_version: int = FORMAT_VERSION
    pop: int = 0
    server: int = 0
    ttl_s: int = 0
    epoch: int = 0
    no_forward: bool = False
    forwarded: bool = False


# Forwards a sub-batch to a member: (member, call) -> packed result records.
Forwarder = Callable[[Member, BatchCall], Awaitable[bytes]]


class Node:
    def __init__(self, config: NodeConfig, wall_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self.metrics = m.NodeMetrics()
        self.clock = HybridClock(config.max_clock_offset_ms, wall_ms)
        self.store = FlowStore(config.ttl, config.limits, self.clock)
        self.affinity = AffinityStore()
        self.pop_id = config.pop_id
        self.pmap: PartitionMap | None = None
        self.self_index = -1
        self.grpc_port = 0
        self.admin_port = 0
        self.forwarder: Forwarder | None = None  # set by the gRPC shell (dht.server)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.failed_loops: dict[str, str] = {}
        self.accepting = False
        self.metrics.add_gauges(self._gauges)

    # ------------------------------------------------------------------ membership

    def set_membership(self, grpc_port: int, admin_port: int) -> None:
        """Static membership: this node plus its configured peers. Called once the real
        ports are known (the config may say 0 = pick a free port)."""
        cfg = self.config
        self.grpc_port, self.admin_port = grpc_port, admin_port
        admin = f"{cfg.advertised}:{admin_port}" if admin_port > 0 else ""
        me = Member(cfg.node_id, f"{cfg.advertised}:{grpc_port}", admin)
        self.pmap = PartitionMap.build(
            (me, *cfg.peers), cfg.num_partitions, cfg.replication_factor, cfg.vnodes
        )
        self.self_index = self.pmap.index_of(cfg.node_id)
        log.info(
            "node %s (pop %s) epoch %d: %d members, rf %d, %d partitions as primary",
            cfg.node_id,
            cfg.pop,
            self.pmap.epoch,
            len(self.pmap.members),
            self.pmap.replication_factor,
            self.pmap.partition_counts(0)[self.self_index],
        )

    @property
    def table(self) -> PartitionMap:
        if self.pmap is None:
            raise NotReady("node has not started")
        return self.pmap

    # ------------------------------------------------------------------ readiness

    def live(self) -> bool:
        return not self.failed_loops

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not). Ready = serving and holding all its partitions
        (with static membership and no persistence, a started node holds them all)."""
        reasons = []
        if not self.accepting:
            reasons.append("not accepting calls (starting or stopping)")
        if self.failed_loops:
            reasons.extend(f"background loop {k} failed: {v}" for k, v in self.failed_loops.items())
        if self.store.over_hard_limit:
            reasons.append("store is over its hard record ceiling")
        return (not reasons, reasons)

    # ------------------------------------------------------------------ batch calls

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

    async def batch(self, call: BatchCall) -> bytes:
        """Validate, route and apply one batch call; returns packed result records.

        Raises InvalidArgument / LimitExceeded for malformed calls (nothing applied);
        per-key outcomes are statuses in the results."""
        if not self.accepting:
            raise NotReady("node is not accepting calls")
        if call.format_version != FORMAT_VERSION:
            raise InvalidArgument(
                "format_version", f"{call.format_version} is not supported (want {FORMAT_VERSION})"
            )
        if call.op in (Op.GET_AFFINITY, Op.SET_AFFINITY):
            return await self._affinity_batch(call)
        keys = decode_keys(call.payload, self.config.max_batch_keys, KIND_FLOW)
        pop = self._acting_pop(call.pop)
        ttl_ms = self._ttl_ms(call.ttl_s)
        if call.op in (Op.CLAIM, Op.CONFIRM) and not 0 <= call.server <= 65535:
            raise InvalidArgument("server", f"{call.server} outside 0..65535")
        hashes = key_hashes(call.payload)
        store = self.store

        def apply(idx: npt.NDArray[np.intp] | None) -> ResultArray:
            k, h = (keys, hashes) if idx is None else (keys[idx], hashes[idx])
            now = self._now_ms()
            if call.op is Op.LOOKUP:
                return store.lookup(k, h, now)
            if call.op is Op.CLAIM:
                return store.claim(k, h, pop=pop, server=call.server, ttl_ms=ttl_ms, now_ms=now)
            if call.op is Op.CONFIRM:
                return store.confirm(k, h, pop=pop, server=call.server, ttl_ms=ttl_ms, now_ms=now)
            if call.op is Op.REFRESH:
                return store.refresh(k, h, pop=pop, ttl_ms=ttl_ms, now_ms=now)
            return store.release(k, h, pop=pop, now_ms=now)

        out = await self._route(call, hashes, apply, lambda idx: keys[idx].tobytes())
        self._count_keys(call.op, out)
        return out.tobytes()

    async def _affinity_batch(self, call: BatchCall) -> bytes:
        cfg = self.config
        clients = decode_clients(call.payload, cfg.max_batch_keys)
        prefixes = prefix_mask(cfg.limits.prefix_v4, cfg.limits.prefix_v6, clients)
        setting = call.op is Op.SET_AFFINITY
        if setting:
            if call.pop == 0:
                raise InvalidArgument("pop", "SetAffinity needs the preferred PoP id")
            self._acting_pop(call.pop)
        ttl_ms = self._ttl_ms(call.ttl_s) or cfg.ttl.max_ms
        hashes = key_hashes(affinity_keys(prefixes))

        def apply(idx: npt.NDArray[np.intp] | None) -> ResultArray:
            p = prefixes if idx is None else prefixes[idx]
            now = self._now_ms()
            if setting:
                return self.affinity.set(p, call.pop, self.clock.now(), now + ttl_ms)
            return self.affinity.get(p, now)

        out = await self._route(call, hashes, apply, lambda idx: clients[idx].tobytes())
        self._count_keys(call.op, out)
        return out.tobytes()

    async def _route(
        self,
        call: BatchCall,
        hashes: U64Array,
        apply: Callable[[npt.NDArray[np.intp] | None], ResultArray],
        payload_of: Callable[[npt.NDArray[np.intp]], bytes],
    ) -> ResultArray:
        pmap = self.table
        parts = pmap.partitions_of(hashes)
        owners = pmap.primaries[parts]
        local = owners == self.self_index
        if local.all():
            out = apply(None)
        else:
            out = new_results(len(hashes))
            local_idx = np.flatnonzero(local)
            if local_idx.size:
                out[local_idx] = apply(local_idx)
            remote_idx = np.flatnonzero(~local)
            if call.forwarded or call.no_forward or self.forwarder is None:
                out["status"][remote_idx] = Status.MOVED
            else:
                await self._forward(call, owners, remote_idx, payload_of, out)
        out["partition"] = parts
        return out

    async def _forward(
        self,
        call: BatchCall,
        owners: npt.NDArray[np.uint16],
        remote_idx: npt.NDArray[np.intp],
        payload_of: Callable[[npt.NDArray[np.intp]], bytes],
        out: ResultArray,
    ) -> None:
        assert self.forwarder is not None
        pmap = self.table
        groups = [
            (int(o), remote_idx[owners[remote_idx] == o]) for o in np.unique(owners[remote_idx])
        ]

        async def one(owner: int, idx: npt.NDArray[np.intp]) -> None:
            sub = BatchCall(
                op=call.op,
                payload=payload_of(idx),
                pop=call.pop or self.pop_id,
                server=call.server,
                ttl_s=call.ttl_s,
                epoch=pmap.epoch,
                forwarded=True,
            )
            member = pmap.members[owner]
            try:
                raw = await self.forwarder(member, sub)  # type: ignore[misc]
                res = np.frombuffer(raw, dtype=out.dtype)
                if len(res) != len(idx):
                    raise ValueError(
                        f"{member.node_id} answered {len(res)} results for {len(idx)} keys"
                    )
                out[idx] = res
            except (grpc.aio.AioRpcError, ValueError) as e:
                # The owner could not be reached in time: the keys are UNAVAILABLE (the
                # caller may retry elsewhere), never answered as something they are not.
                self.metrics.forward_errors.inc()
                log.warning("forward of %d keys to %s failed: %s", len(idx), member.node_id, e)
                out["status"][idx] = Status.UNAVAILABLE
            self.metrics.forwarded.inc(len(idx))

        await asyncio.gather(*(one(o, idx) for o, idx in groups))

    def _count_keys(self, op: Op, out: ResultArray) -> None:
        counts = np.bincount(out["status"], minlength=len(Status))
        for status in Status:
            if counts[status]:
                self.metrics.keys.labels(op.value, status.name.lower()).inc(int(counts[status]))

    # ------------------------------------------------------------------ background loops

    def spawn(self, name: str, coro: Awaitable[None]) -> None:
        """Start an owned background task; a failure is logged and shows in /readyz."""

        async def runner() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("background loop %s failed", name)
                self.failed_loops[name] = repr(e)

        task = asyncio.create_task(runner(), name=f"{self.config.node_id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def every(self, interval_s: float, step: Callable[[], None]) -> None:
        """Run ``step`` every ``interval_s`` (+-10% jitter) until stop."""
        while not self._stop.is_set():
            step()
            delay = interval_s * random.uniform(0.9, 1.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    def purge_step(self) -> None:
        now = self._now_ms()
        budget = self.config.purge_budget
        self.store.purge_expired(now, budget)
        self.affinity.purge_expired(now, budget)

    def start_loops(self) -> None:
        self._stop.clear()
        self.spawn("purge", self.every(self.config.purge_interval_s, self.purge_step))

    async def stop_loops(self) -> None:
        self._stop.set()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        yield m.counter_as_gauge(
            "dht_expirations",
            "records purged after expiry",
            self.store.expirations + self.affinity.expirations,
        )
        yield m.gauge(
            "dht_refusals_total",
            "records refused, by reason (full/quota: new claims; hard: replicated copies)",
            ["reason"],
            {(k,): float(v) for k, v in self.store.refusals.items()},
        )
        yield m.counter_as_gauge(
            "dht_clock_offset_rejections", "remote HLC stamps rejected", self.clock.rejected
        )
        ready, _ = self.readiness()
        yield m.gauge("dht_ready", "1 when /readyz is ready", [], {(): 1.0 if ready else 0.0})
        if self.pmap is not None:
            yield m.gauge("dht_epoch", "partition table epoch", [], {(): float(self.pmap.epoch)})
            yield m.gauge(
                "dht_partitions_primary",
                "partitions this node is primary for",
                [],
                {(): float(self.pmap.partition_counts(0)[self.self_index])},
            )


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000
