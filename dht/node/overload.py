"""Overload: how far behind the node's event loop runs, and the shedding it triggers
(docs/operations.md#overload).

A node that is offered more than it can do queues the excess: in its event loop, in
gRPC, behind locks. Every call then waits, and a forwarder's cache miss that waits
hundreds of milliseconds is worth nothing to the packet behind it. So the node watches
its own event loop: a timer due every ``TICK_MS`` that fires late says how long ready
work sits before it runs (the lag). While the lag is above ``overload_lag_ms``, calls
from the client plane are refused at once with RESOURCE_EXHAUSTED ("overloaded"), before
they cost anything; the forwarder answers those packets from its cache and the
affinity, and the work the node admits keeps a bounded latency. Calls between nodes and
PoPs are never shed: they finish what the node already took on (replication, undo,
shipping). Off with ``overload_lag_ms = 0``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from dht.core import metrics as m
from dht.core.clock import MonoMs, monotonic_ms
from dht.core.errors import LimitExceeded

TICK_MS = 20
# Each tick keeps this share of the lag seen before (unless the new one is higher): a
# lone stall of 500 ms is forgotten within ~8 ticks (~0.2 s), overload that lasts stays.
DECAY = 0.6


class Overload:
    def __init__(self, limit_ms: int, mono_ms: MonoMs = monotonic_ms) -> None:
        self.limit_ms = limit_ms
        self.lag_ms = 0.0
        self.shed = 0  # calls refused
        self._mono = mono_ms

    def observe(self, lag_ms: float) -> None:
        """One tick's lateness (ms past its due time)."""
        self.lag_ms = max(float(max(lag_ms, 0)), self.lag_ms * DECAY)

    @property
    def overloaded(self) -> bool:
        return self.limit_ms > 0 and self.lag_ms > self.limit_ms

    def admit(self) -> None:
        """Raise LimitExceeded (RESOURCE_EXHAUSTED) while overloaded; count it."""
        if self.overloaded:
            self.shed += 1
            raise LimitExceeded(
                f"overloaded: the node runs {self.lag_ms:.0f} ms behind "
                f"(overload_lag_ms {self.limit_ms}); retry, or use the cache"
            )

    def gauges(self) -> Iterable[Metric]:
        yield m.gauge(
            "dht_event_loop_lag_seconds",
            "how far behind the event loop runs (decaying maximum of a 20 ms timer's lateness)",
            [],
            {(): self.lag_ms / 1000},
        )
        yield m.counter(
            "dht_shed_calls", "client-plane calls refused as overloaded", [], {(): self.shed}
        )

    async def watch(self) -> None:
        """The timer: runs until cancelled (the node's tasks)."""
        while True:
            due = self._mono() + TICK_MS
            await asyncio.sleep(TICK_MS / 1000)
            self.observe(self._mono() - due)
