"""The agent: NFQUEUE upcalls decided through ``dht.client.Forwarder``, pins in the nft
map, conntrack events for handshakes and ends, keep-alive rounds, metrics
(docs/forwarder.md#how-it-works).

The NFQUEUE socket is read on the event loop (``loop.add_reader`` on its fd,
``run(block=False)``): the callback copies the packet's bytes and hands it to a task
that decides and gives the verdict, so a packet waiting on the table never stops the
others. Verdicts may come in any order (the kernel matches them by packet id).

Library code: raises, never exits; signals belong to ``dht.tools.forwarder.cli``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Coroutine, Iterable
from dataclasses import fields
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from dht.client.decision import Action, Packet
from dht.client.forwarder import Forwarder
from dht.client.packet import parse_packet
from dht.core.errors import ConfigError, DhtError, InvalidArgument
from dht.core.wire import FlowKey
from dht.tools.forwarder import conntrack, system
from dht.tools.forwarder.config import AgentConfig
from dht.tools.forwarder.pins import Pin, PinTable, verdict_for
from dht.tools.forwarder.rules import PINNED

log = logging.getLogger(__name__)

# Upcalls deciding at once; past this a packet is accepted undecided (served here, as
# with no agent at all) rather than queued without bound.
MAX_IN_FLIGHT = 10_000
# A claim whose handshake never completed is forgotten after this long (the embryonic
# TTL is 10 s).
CLAIM_MEMORY_S = 60.0
# The local flows are checked against a full conntrack listing this often: an event the
# tool lost (a netlink buffer overrun) cannot keep a flow alive for ever.
RESYNC_S = 30.0


class QueuedPacket(Protocol):
    """What the agent uses of ``netfilterqueue.Packet`` (a fake in tests)."""

    indev: int

    def get_payload(self) -> bytes: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...


class Metrics:
    """The agent's own registry (served on --metrics-port)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.upcalls = Counter(
            "dht_forwarder_upcalls", "Packets that reached the agent, by kind", ["kind"],
            registry=r,
        )  # fmt: skip
        self.verdicts = Counter(
            "dht_forwarder_verdicts", "Verdicts given, by action", ["action"], registry=r
        )
        self.pins = Gauge(
            "dht_forwarder_pins", "Live pins in the flow map, by direction", ["toward"], registry=r
        )
        self.map_size = Gauge(
            "dht_forwarder_map_elements", "Elements in the flow maps (as this agent counts)",
            registry=r,
        )  # fmt: skip
        self.pin_updates = Counter(
            "dht_forwarder_pin_updates", "Map updates sent to nft", registry=r
        )
        self.pin_failures = Counter(
            "dht_forwarder_pin_failures", "Map updates nft refused", registry=r
        )
        self.local_flows = Gauge(
            "dht_forwarder_local_flows", "Connections held here (conntrack)", registry=r
        )
        self.confirms = Counter(
            "dht_forwarder_confirms", "Handshakes completed here (conntrack) and confirmed",
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "dht_forwarder_errors", "Upcalls accepted undecided, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "dht_forwarder_decision_seconds", "Upcall to verdict", registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )  # fmt: skip


class StatsCollector:
    """The forwarder library's counters (``fw.stats``, docs/api.md#forwarder-statistics)
    as one gauge family, ``dht_forwarder_stats{stat}``, read at scrape time."""

    def __init__(self, fw: Forwarder) -> None:
        self.fw = fw

    def collect(self) -> Iterable[Metric]:
        fam = GaugeMetricFamily(
            "dht_forwarder_stats", "The forwarder library's counters (fw.stats)", labels=["stat"]
        )
        for f in fields(self.fw.stats):
            value = getattr(self.fw.stats, f.name)
            if isinstance(value, int):
                fam.add_metric([f.name], float(value))
        yield fam


class Agent:
    """One PoP's forwarder agent. ``fw`` is a started Forwarder for this PoP; ``start``
    sets up the kernel (idempotent) and begins; ``stop`` tears everything down (safe
    twice). One event loop."""

    def __init__(self, config: AgentConfig, fw: Forwarder, metrics: Metrics | None = None):
        self.config = config
        self.fw = fw
        self.metrics = metrics or Metrics()
        self.metrics.registry.register(StatsCollector(fw))
        self.pins = PinTable()
        self._pin_wakeup = asyncio.Event()
        self._local: set[bytes] = set()  # flows this host's stack holds (conntrack)
        self._claimed: dict[bytes, float] = {}  # SYNs claimed here, handshake pending
        self._tasks: set[asyncio.Task[None]] = set()  # upcalls being decided, confirms
        self._loops: set[asyncio.Task[None]] = set()  # conntrack, pins, keep-alive
        self._draining = False
        self._in_flight = 0
        self._nfq: object | None = None
        self._fd = -1
        self._events = conntrack.ConntrackEvents()
        self._services = set(config.services)
        self._bb_index = 0
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            self._bb_index = socket.if_nametoindex(self.config.backbone_if)
        except OSError:
            name = self.config.backbone_if
            raise ConfigError(f"--backbone-if {name}: no such interface") from None
        pop_ids = {}
        for h in self.config.next_hops:
            pop_ids[h.pop] = self.fw.client.pop_id(h.pop)
        self._started = True
        await asyncio.to_thread(system.setup, self.config, pop_ids)
        await self._resync()
        await self._events.start()
        self._bind_queue()
        self._spawn(self._read_conntrack(), "conntrack", loop=True)
        self._spawn(self._flush_pins(), "pins", loop=True)
        self._spawn(self._keepalive(), "keep-alive", loop=True)

    def _bind_queue(self) -> None:
        from netfilterqueue import NetfilterQueue

        nfq = NetfilterQueue()
        nfq.bind(self.config.queue_num, self._on_packet, max_len=4096)
        self._nfq = nfq
        self._fd = nfq.get_fd()
        asyncio.get_running_loop().add_reader(self._fd, self._read_queue)

    def _read_queue(self) -> None:
        from netfilterqueue import NetfilterQueue

        nfq = self._nfq
        assert isinstance(nfq, NetfilterQueue)
        try:
            nfq.run(block=False)
        except OSError as e:
            log.error("NFQUEUE read failed: %s", e)

    async def stop(self) -> None:
        """Tear down, losing no packet: the background loops stop, the kernel state goes
        (no new upcalls), the packets still queued or being decided are accepted
        undecided, then the queue is unbound."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        await _cancel(self._loops)
        await self._events.close()
        if self._started:
            await asyncio.to_thread(system.cleanup)
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = -1
            self._read_queue()  # what was queued meanwhile: accepted (draining)
        await _cancel(self._tasks)
        if self._nfq is not None:
            from netfilterqueue import NetfilterQueue

            assert isinstance(self._nfq, NetfilterQueue)
            self._nfq.unbind()
            self._nfq = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, *, loop: bool = False) -> None:
        """An owned task: a background loop (``loop``) or one upcall's work."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        (self._loops if loop else self._tasks).add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._loops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent task %s failed", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------ upcalls

    def _on_packet(self, pkt: QueuedPacket) -> None:
        """NFQUEUE callback (inside ``run``): the payload is only valid now, so copy it
        and decide in a task."""
        t0 = time.perf_counter()
        try:
            key, kind = parse_packet(pkt.get_payload())
        except InvalidArgument:
            self.metrics.errors.labels("unparsable").inc()
            pkt.accept()
            return
        self.metrics.upcalls.labels(kind.name.lower()).inc()
        if self._draining:
            pkt.accept()
            return
        if self._in_flight >= MAX_IN_FLIGHT:
            self.metrics.errors.labels("overload").inc()
            pkt.accept()
            return
        self._in_flight += 1
        self._spawn(self._decide(pkt, key, kind, t0), "upcall")

    async def _decide(self, pkt: QueuedPacket, key: bytes, kind: Packet, t0: float) -> None:
        try:
            tunnelled = pkt.indev == self._bb_index
            try:
                out = await self.fw.handle(key, kind, tunnelled=tunnelled, local=key in self._local)
            except asyncio.CancelledError:
                # Stopping: the packet goes on undecided (served here) rather than being
                # dropped with the queue.
                pkt.accept()
                raise
            except DhtError as e:
                log.debug("decision failed: %s", e)
                self.metrics.errors.labels("table").inc()
                pkt.accept()
                return
            v = verdict_for(
                out, kind,
                pin_timeout_s=self.config.pin_timeout_s,
                owner_ttl_s=self.config.owner_ttl_s,
                now_ms=time.time_ns() // 1_000_000,
            )  # fmt: skip
            if v.mark:
                pkt.set_mark(v.mark)
            pkt.accept()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s %s%s%s -> %s %s (%s%s)", kind.name, FlowKey.from_bytes(key),
                    " tunnelled-in" if tunnelled else "", " local" if key in self._local else "",
                    out.action.name, out.target or "", out.reason,
                    ", second chance" if out.answer and out.answer.second_chance else "",
                )  # fmt: skip
            self.metrics.verdicts.labels(out.action.name.lower()).inc()
            self.metrics.latency.observe(time.perf_counter() - t0)
            if (
                kind in (Packet.SYN, Packet.UDP)
                and out.action is Action.SERVE
                and out.answer is not None
                and out.answer.owner == self.fw.here
            ):
                self._claimed[key] = time.monotonic()
            if v.pin is not None:
                self.pins.set(key, v.pin, time.monotonic())
                self._pin_wakeup.set()
        finally:
            self._in_flight -= 1

    # ------------------------------------------------------------------ conntrack

    def _on_conntrack(self, e: conntrack.Entry) -> None:
        if e.service not in self._services:
            return
        if e.event is conntrack.Event.DESTROY:
            self._local.discard(e.key)
            self._claimed.pop(e.key, None)
            if self.pins.remove(e.key):
                self._pin_wakeup.set()
            return
        if not e.local_socket:
            if e.state in ("TIME_WAIT", "CLOSE"):
                self._local.discard(e.key)
            return
        if e.key not in self._local:
            self._local.add(e.key)
            # Held here: pin it here, so its packets stay in the kernel.
            self.pins.set(e.key, Pin(PINNED, self.config.pin_timeout_s), time.monotonic())
            self._pin_wakeup.set()
        if self._claimed.pop(e.key, None) is not None:
            self.metrics.confirms.inc()
            self._spawn(self._confirm(e.key), "confirm")

    async def _confirm(self, key: bytes) -> None:
        try:
            await self.fw.established(key)
        except DhtError as e:
            log.warning("confirm failed: %s", e)

    async def _read_conntrack(self) -> None:
        """Conntrack events for as long as the agent runs; if ``conntrack -E`` dies it is
        started again (and the table listed again: events may have been missed)."""
        while True:
            try:
                async for e in self._events.entries():
                    self._on_conntrack(e)
            except OSError as err:
                log.error("conntrack events: %s; starting again in 1 s", err)
            await self._events.close()
            await asyncio.sleep(1.0)
            await self._resync()
            await self._events.start()

    async def _resync(self) -> None:
        """The conntrack table as listed now: local flows known before the listing and
        not in it are forgotten (and unpinned), whatever events were missed; the listed
        ones are applied."""
        before = set(self._local)
        entries = await conntrack.list_entries()
        present = {e.key for e in entries if e.service in self._services and e.local_socket}
        for k in before - present:
            self._local.discard(k)
            if self.pins.remove(k):
                self._pin_wakeup.set()
        for e in entries:
            self._on_conntrack(e)

    # ------------------------------------------------------------------ pins

    async def _flush_pins(self) -> None:
        """Pin updates leave in batches: one nft process per batch_ms window."""
        while True:
            await self._pin_wakeup.wait()
            await asyncio.sleep(self.config.pin_batch_ms / 1000)
            self._pin_wakeup.clear()
            scripts = self.pins.take_batch()
            if scripts:
                failed = await system.apply_pins(scripts)
                self.metrics.pin_updates.inc(len(scripts))
                if failed:
                    self.metrics.pin_failures.inc(failed)
                    log.warning("%d of %d pin updates failed", failed, len(scripts))
            self.metrics.map_size.set(len(self.pins))

    async def _keepalive(self) -> None:
        """Every keepalive_interval_s (jittered): the flows held here are alive
        (``fw.alive``, docs/api.md#keep-alive), their local pins are re-armed, and
        forgotten claims and lapsed pins are dropped."""
        cfg = self.config
        last_resync = time.monotonic()
        while True:
            await asyncio.sleep(cfg.keepalive_interval_s * random.uniform(0.9, 1.1))
            now = time.monotonic()
            if now - last_resync >= RESYNC_S:
                last_resync = now
                await self._resync()
            keys = list(self._local)
            if keys:
                try:
                    await self.fw.alive(keys)
                except DhtError as e:
                    log.warning("keep-alive failed: %s", e)
            if self.pins.rearm(keys, cfg.pin_timeout_s, now):
                self._pin_wakeup.set()
            self.pins.prune(now)
            for k in [k for k, t in self._claimed.items() if now - t > CLAIM_MEMORY_S]:
                del self._claimed[k]
            local, remote = self.pins.count(now)
            self.metrics.pins.labels("here").set(local)
            self.metrics.pins.labels("elsewhere").set(remote)
            self.metrics.local_flows.set(len(self._local))

    # ------------------------------------------------------------------ views

    @property
    def local_flows(self) -> frozenset[bytes]:
        return frozenset(self._local)


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    pending = list(tasks)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


__all__ = ["Agent", "Metrics", "QueuedPacket"]
