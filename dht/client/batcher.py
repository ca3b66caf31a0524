"""Micro-batching of one kind of forwarder call (look-ups, claims, ...): concurrent
requests for one key share one call (coalescing), and keys from every caller leave
together: at once when no call of the kind is in flight, else when a batch is full or
``window_s`` after its first key, with at most ``max_in_flight`` batches of the kind at
once (docs/api.md#forwarder). A lingering batcher (calls no packet waits on) always
waits the window."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np

from dht.client.cache import Answer
from dht.core.errors import DhtError, LimitExceeded, Unavailable
from dht.core.record import State, Status
from dht.core.wire import FLAG_AFFINITY_FALLBACK, FLAG_SECOND_CHANCE, ResultArray

log = logging.getLogger(__name__)

_LIVE = (Status.OK, Status.CREATED, Status.ALREADY_OWNED, Status.OWNED_ELSEWHERE)
UNAVAILABLE = Answer(Status.UNAVAILABLE, 0, State.NONE, 0, 0)


def answer_of(row: np.void) -> Answer:
    """A result row as the forwarder's Answer (affinity fallback pulled apart)."""
    status = Status(int(row["status"]))
    state = State(int(row["state"]))
    pop = int(row["owner_pop"])
    flags = int(row["flags"])
    if status in _LIVE and state not in (State.NONE, State.RELEASED) and pop:
        second = bool(flags & FLAG_SECOND_CHANCE)
        return Answer(status, pop, state, 0, int(row["expiry_ms"]), second)
    affinity = pop if flags & FLAG_AFFINITY_FALLBACK else 0
    return Answer(status, 0, State.NONE, affinity, 0)


class Counters(Protocol):
    """Where a batcher counts (the forwarder's stats)."""

    coalesced: int  # submissions that joined a key already waiting or in flight
    table_errors: int  # calls that failed whole (every key answered UNAVAILABLE)
    shed_batches: int  # of which the node refused as overloaded (RESOURCE_EXHAUSTED)


class Batcher:
    """Micro-batches one kind of call. ``submit`` coalesces a key already waiting or in
    flight; a batch leaves when full or ``window_s`` after its first key."""

    def __init__(
        self,
        name: str,
        send: Callable[[bytes], Awaitable[ResultArray]],
        *,
        window_ms: float,
        max_keys: int,
        max_in_flight: int,
        spawn: Callable[[Awaitable[None], str], None],
        counters: Counters,
        linger: bool = False,
    ) -> None:
        self.name = name
        self._linger = linger  # wait the window even with nothing in flight
        self._send = send
        self._window_s = window_ms / 1000
        self._max = max_keys
        self._slots = asyncio.Semaphore(max_in_flight)
        self._spawn = spawn
        self._counters = counters
        self._waiting: dict[bytes, asyncio.Future[Answer]] = {}
        self._in_flight: dict[bytes, asyncio.Future[Answer]] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()

    def submit(self, key: bytes) -> asyncio.Future[Answer]:
        fut = self._waiting.get(key) or self._in_flight.get(key)
        if fut is not None:
            self._counters.coalesced += 1
            return fut
        fut = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        self._wake.set()
        if len(self._waiting) >= self._max:
            self._full.set()
        return fut

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            # Nagle's rule: with no call of this kind in flight there is nobody to wait
            # for, so a lone miss leaves at once; while one is in flight, keys gather for
            # at most the window (or until the batch is full). Calls no packet waits on
            # (``linger``) always gather for the window: fewer, larger calls.
            busy = self._in_flight or self._linger
            if len(self._waiting) < self._max and self._window_s > 0 and busy:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._window_s):
                        await self._full.wait()
            self._full.clear()
            keys = list(self._waiting)[: self._max]
            futs = [self._waiting.pop(k) for k in keys]
            if not self._waiting:
                self._wake.clear()
            elif len(self._waiting) >= self._max:
                self._full.set()
            if not keys:
                continue
            for k, f in zip(keys, futs, strict=True):
                self._in_flight[k] = f
            await self._slots.acquire()
            self._spawn(self._flush(keys, futs), f"{self.name}-batch")

    async def _flush(self, keys: list[bytes], futs: list[asyncio.Future[Answer]]) -> None:
        try:
            try:
                rows = await self._send(b"".join(keys))
                answers = [answer_of(r) for r in rows]
            except DhtError as e:
                # The table is unreachable or shedding: every key is "unknown" (not
                # cached), so the packet still gets a decision (cache, affinity).
                if isinstance(e, LimitExceeded):
                    self._counters.shed_batches += 1  # overload: counted, not logged
                else:
                    log.warning("%s batch of %d keys failed: %s", self.name, len(keys), e)
                self._counters.table_errors += 1
                answers = [UNAVAILABLE] * len(keys)
            for f, a in zip(futs, answers, strict=True):
                if not f.done():
                    f.set_result(a)
        except BaseException as e:
            for f in futs:
                if not f.done():
                    f.set_exception(e if isinstance(e, Exception) else Unavailable("cancelled"))
            raise
        finally:
            for k in keys:
                self._in_flight.pop(k, None)
            self._slots.release()

    def fail_all(self, error: Exception) -> None:
        for fut in [*self._waiting.values(), *self._in_flight.values()]:
            if not fut.done():
                fut.set_exception(error)
                # Nobody may be waiting on it any more: do not log "never retrieved".
                fut.exception()
        self._waiting.clear()
        self._in_flight.clear()
