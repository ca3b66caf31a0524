"""This node's link to one other PoP: its resend buffer, the loop that ships it, and the
digest exchange with the peer PoP's nodes (resync and anti-entropy).

A link gets its collaborators at construction: the :class:`PopTransport` to call the
peer PoP, the node's configuration, and its :class:`Home` (what it needs of its own
node: the clock, the records it holds, the receiving side for what it pulls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dht.core.config import NodeConfig
from dht.core.wire import ENTRY_SIZE, EntryArray
from dht.pops.shipping import Kind, LagSamples, OutQueue, entry_hashes, exchanged_set, pop_digests
from dht.pops.transport import PopTransport, PopUnreachable, ShipResult, ShipStream

log = logging.getLogger(__name__)

# Records per message of a bulk exchange (72 bytes each: 360 KB).
EXCHANGE_BATCH = 5_000


class Home(Protocol):
    """What a link needs of its own node (:class:`dht.pops.extension.Pops` provides it)."""

    @property
    def num_partitions(self) -> int: ...

    def mono_ms(self) -> int:
        """The node's monotonic clock (queue stamps and lag)."""
        ...

    def hlc_now(self) -> int:
        """A fresh HLC stamp of the node's clock (``sent_hlc`` of a batch)."""
        ...

    def cutoff_ms(self) -> int:
        """Records born after this wall time are not exchanged yet."""
        ...

    def replicated(self) -> npt.NDArray[np.intp]:
        """The partitions this node replicates (what a resync exchanges)."""
        ...

    def export(self, partitions: npt.NDArray[np.intp]) -> EntryArray:
        """The node's settled records of ``partitions``."""
        ...

    async def receive(
        self, raw: bytes, from_pop: int, sent_hlc: int, num_partitions: int
    ) -> ShipResult:
        """Apply records pulled from PoP ``from_pop`` (as if shipped)."""
        ...

    def loop_error(self, loop: str, e: BaseException) -> None:
        """One item of a loop failed (logged, counted in dht_loop_errors_total); the loop
        skips it and goes on."""
        ...


@dataclass
class LinkStats:
    batches: int = 0
    records: dict[Kind, int] = field(default_factory=dict)
    resends: int = 0
    resyncs: int = 0
    ae_rounds: int = 0
    ae_partitions: int = 0
    pulled: int = 0
    pushed: int = 0
    failures: int = 0


class PeerPop:
    """This node's link to one other PoP. Used from the node's event loop."""

    def __init__(
        self,
        name: str,
        pop_id: int,
        addresses: list[str],
        first: int,
        *,
        config: NodeConfig,
        transport: PopTransport,
        home: Home,
    ) -> None:
        self.name = name
        self.pop_id = pop_id
        self.addresses = addresses  # dialled (dial_via applied)
        self.first = first  # the address tried first (rotates on failure)
        self.config = config
        self.transport = transport
        self.home = home
        self.queue = OutQueue(config.ship_buffer_records)
        self.lag = LagSamples()
        self.stats = LinkStats()
        self.wake = asyncio.Event()
        self.up = False
        self.synced = False  # one complete exchange of everything this node replicates

    def rotation(self) -> list[str]:
        n = len(self.addresses)
        return [self.addresses[(self.first + i) % n] for i in range(n)]

    def rotate(self) -> None:
        self.first = (self.first + 1) % len(self.addresses)

    def ok(self) -> None:
        if not self.up:
            log.info("PoP %s answers", self.name)
        self.up = True

    def failed(self, e: Exception) -> None:
        self.stats.failures += 1
        if self.up:
            log.warning("PoP %s unreachable: %s", self.name, e)
        self.up = False
        self.rotate()

    # ------------------------------------------------------------------ shipping

    def enqueue(self, raw: bytes, kinds: npt.NDArray[np.uint8], now_ms: int) -> None:
        """Queue records for the peer PoP and wake the ship loop."""
        was = self.queue.overflowed
        if self.queue.add(raw, kinds, now_ms) and not was:
            log.warning(
                "shipping buffer for %s full (%d records): dropping; resync follows",
                self.name,
                self.config.ship_buffer_records,
            )
        self.wake.set()

    async def ship_loop(self) -> None:
        cfg = self.config
        queue = self.queue
        stream: ShipStream | None = None
        backoff_s = min(1.0, cfg.probe_interval_s)
        try:
            while True:
                if not len(queue) and not queue.overflowed:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self.wake.wait()
                    self.wake.clear()
                    continue
                if len(queue.pending) < cfg.ship_batch_records:
                    await asyncio.sleep(cfg.ship_interval_ms / 1000)  # let the batch fill
                failed = False
                while (batch := queue.next_batch(cfg.ship_batch_records)) is not None:
                    if stream is None:
                        stream = self.transport.stream(self.rotation()[0])
                    batch.attempts += 1
                    if batch.attempts > 1:
                        self.stats.resends += 1
                    try:
                        res = await stream.send(batch.seq, batch.raw, self.home.hlc_now())
                        if not res.ok:
                            raise PopUnreachable(
                                f"{self.name}: batch not acknowledged: {res.error}"
                            )
                    except PopUnreachable as e:
                        self.failed(e)
                        await stream.close()
                        stream = None
                        failed = True
                        break
                    except Exception as e:  # an odd answer: resent on a new stream
                        self.home.loop_error(f"ship->{self.name}", e)
                        self.failed(e)
                        await stream.close()
                        stream = None
                        failed = True
                        break
                    queue.acked()
                    self.ok()
                    self._count_shipped(batch.kinds, batch.queued_ms)
                if failed:
                    await asyncio.sleep(backoff_s)
                elif queue.overflowed:
                    await self.resync("fell behind its resend buffer")
                    if queue.overflowed:  # not through: the peer does not answer
                        await asyncio.sleep(backoff_s)
        finally:
            if stream is not None:
                await stream.close()

    def _count_shipped(
        self, kinds: npt.NDArray[np.uint8], queued_ms: npt.NDArray[np.int64]
    ) -> None:
        stats = self.stats
        stats.batches += 1
        for kind, n in zip(*np.unique(kinds, return_counts=True), strict=True):
            k = Kind(int(kind))
            stats.records[k] = stats.records.get(k, 0) + int(n)
        self.lag.add(self.home.mono_ms() - queued_ms)

    # ------------------------------------------------------------------ exchange

    async def resync(self, why: str) -> None:
        """Bulk resync: every partition this node replicates. The overflow mark is
        cleared first, so writes dropped during the resync trigger another."""
        overflowed = self.queue.overflowed
        self.queue.overflowed = False
        try:
            complete = await self.sync_with(self.home.replicated())
        except PopUnreachable as e:
            self.failed(e)
            complete = False
        except Exception as e:  # tried again at the next resync, as when unreachable
            self.home.loop_error(f"pop-resync->{self.name}", e)
            complete = False
        if complete:
            self.stats.resyncs += 1
            self.synced = True
            log.info("resync with PoP %s done (%s)", self.name, why)
        else:
            self.queue.overflowed = self.queue.overflowed or overflowed

    async def sync_with(self, partitions: npt.NDArray[np.intp]) -> bool:
        """Compare digests of ``partitions`` with the peer PoP's nodes (each answers for
        the partitions it holds in sync) and exchange the partitions that differ, both
        ways. True when every partition was compared."""
        home = self.home
        stats = self.stats
        num = home.num_partitions
        cutoff = home.cutoff_ms()
        # Cross-PoP exchange is anti-entropy: not copies still open to an undo.
        entries = home.export(partitions)
        parts = (entry_hashes(entries) % np.uint64(num)).astype(np.intp)
        ours, _ = pop_digests(entries, parts, num, cutoff)
        remaining = np.asarray(partitions, dtype=np.intp)
        for address in self.rotation():
            if not remaining.size:
                break
            try:
                theirs = await self.transport.digests(address, remaining, num, cutoff)
            except PopUnreachable as e:
                log.info("PoP %s node %s: no digests: %s", self.name, address, e)
                continue
            except Exception as e:  # one node's odd answer: skipped, the next one asked
                home.loop_error(f"pop-exchange->{self.name}", e)
                continue
            self.ok()
            try:
                covered = theirs.partitions
                differ = covered[theirs.digests != ours[covered]]
            except Exception as e:
                home.loop_error(f"pop-exchange->{self.name}", e)
                continue
            remaining = np.setdiff1d(remaining, covered)
            if not differ.size:
                continue
            stats.ae_partitions += int(differ.size)
            await self._exchange(address, differ, entries, parts, cutoff)
        stats.ae_rounds += 1
        return not remaining.size

    async def _exchange(
        self,
        address: str,
        differ: npt.NDArray[np.intp],
        entries: EntryArray,
        parts: npt.NDArray[np.intp],
        cutoff: int,
    ) -> None:
        """Pull the partitions that differ from one node of the peer PoP, then push ours.
        A pulled batch that cannot be applied is logged, counted and skipped."""
        home, stats, num = self.home, self.stats, self.home.num_partitions
        async for raw in self.transport.fetch(address, differ, num, cutoff):
            stats.pulled += len(raw) // ENTRY_SIZE
            try:
                await home.receive(raw, self.pop_id, 0, num)
            except Exception as e:
                home.loop_error(f"pop-exchange->{self.name}", e)
        mine = entries[np.isin(parts, differ) & exchanged_set(entries, cutoff)]
        for start in range(0, len(mine), EXCHANGE_BATCH):
            chunk = mine[start : start + EXCHANGE_BATCH].tobytes()
            res = await self.transport.push(address, chunk, home.hlc_now())
            if not res.ok:
                raise PopUnreachable(f"{self.name}: push not acknowledged: {res.error}")
            stats.pushed += len(chunk) // ENTRY_SIZE
