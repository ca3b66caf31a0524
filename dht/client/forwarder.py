"""The forwarder-side client: one PoP's packet forwarder asks "who owns this flow?" and
acts on the answer with the decision table of docs/protocol.md#decision-table
(``dht.client.decision``).

    async with Client(pop_nodes) as client, Forwarder(client, "ams") as fw:
        out = await fw.handle(key, Packet.SYN)        # claims the new flow for ams
        await fw.established(key)                     # handshake done: confirm
        out = await fw.handle(key, Packet.DATA)       # a cache hit: Action.SERVE
        out = await fw.handle(other, Packet.DATA)     # owned by fra: TUNNEL, target 2

What it adds to ``dht.client.Client`` (which it uses for routing, failover across
replicas and nodes, and keeping the partition table current; the forwarder refreshes the
table every ``table_refresh_s`` too, so an idle forwarder is current when traffic comes):

- a bounded cache (``dht.client.cache``): owners for at most ``owner_ttl_s`` (the bound for
  an owner change to reach this forwarder) and never past the record's expiry, negative
  answers for ``negative_ttl_s``;
- concurrent misses for one key share one look-up (coalescing), and misses from every
  caller are micro-batched: a batch leaves when it holds ``batch_max_keys`` keys or
  ``batch_window_ms`` after its first key, at most ``max_batches_in_flight`` at once.
  Claims, confirms, releases and refreshes are batched the same way;
- live flows (used since the last round) are re-read in batches before their entries
  lapse, and records this PoP owns are refreshed (``Refresh``) when they would expire
  within ``refresh_ahead_s``: a busy flow never waits on a miss and never expires;
- FIN/RST served by the owner releases the record; ``close()`` stops the background
  work, fails callers still waiting, and closes the client if the forwarder opened it;
- the loop guard: a tunnelled-in packet is served, never tunnelled again, and nothing is
  tunnelled to this PoP.

Not safe to share across event loops; safe to call concurrently from many tasks of one.
The table being unreachable is not an error for a packet: the answer is "unknown"
(``Status.UNAVAILABLE``, not cached) and the decision table does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from dht.client.cache import Answer, CacheLimits, FlowCache
from dht.client.decision import Action, Decision, Packet, decide
from dht.core.config import TlsConfig
from dht.core.errors import DhtError, InvalidArgument, Unavailable
from dht.core.record import State, Status
from dht.core.wire import FLAG_AFFINITY_FALLBACK, KEY_SIZE, FlowKey, ResultArray

if TYPE_CHECKING:
    from dht.client.client import Client

log = logging.getLogger(__name__)

_LIVE = (Status.OK, Status.CREATED, Status.ALREADY_OWNED, Status.OWNED_ELSEWHERE)
UNAVAILABLE = Answer(Status.UNAVAILABLE, 0, State.NONE, 0, 0)


@dataclass(frozen=True)
class ForwarderConfig:
    cache: CacheLimits = field(default_factory=CacheLimits)
    # A miss waits at most this long for others to share its batch: 2 ms is far below a
    # TCP retransmission and turns a burst of misses into a few calls.
    batch_window_ms: float = 2.0
    batch_max_keys: int = 1_000
    # Per kind of call (look-up, claim, ...): bounds the load one forwarder puts on its PoP.
    max_batches_in_flight: int = 4
    # Background round: live flows re-read / refreshed this often (keep it well below
    # cache.owner_ttl_s so a busy flow's entry is renewed before it lapses).
    refresh_interval_s: float = 1.0
    # A record this PoP owns is refreshed when it would expire within this long.
    refresh_ahead_s: float = 60.0
    table_refresh_s: float = 30.0
    # Run the rounds above in the background (off: call refresh_live() yourself).
    background_refresh: bool = True
    # Requested TTLs (0 = the server's default for the state; within its bounds).
    claim_ttl_s: int = 0
    confirm_ttl_s: int = 0
    # docs/protocol.md#decision-table: a new flow of a client whose affinity names another PoP goes
    # there ("sticky clients"); off = the flow starts where its SYN lands.
    sticky_clients: bool = False
    # Use the affinity fallback for packets of unknown flows (off: the simulator's
    # "no affinity" comparison).
    use_affinity: bool = True

    def __post_init__(self) -> None:
        if self.batch_window_ms < 0 or not 1 <= self.batch_max_keys <= 10_000:
            raise InvalidArgument("batch", "want batch_window_ms >= 0, batch_max_keys 1..10000")
        if self.max_batches_in_flight < 1 or self.refresh_interval_s <= 0:
            raise InvalidArgument(
                "forwarder", "max_batches_in_flight >= 1 and refresh_interval_s > 0"
            )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with one packet: SERVE here, TUNNEL to ``target``, or SERVE_UNKNOWN
    (no owner known). ``reason`` says why (``dht.client.decision`` reasons, plus "claimed",
    "claim-owned-elsewhere", "claim-refused"); ``cached`` whether the owner came from
    the cache; ``answer`` what the cache or table said (None for tunnelled-in packets
    that needed no look-up)."""

    action: Action
    target: int
    reason: str
    cached: bool
    answer: Answer | None


@dataclass
class ForwarderStats:
    packets: int = 0
    hits: int = 0  # owner (or its absence) answered by the cache
    misses: int = 0
    coalesced: int = 0  # submissions that joined a key already waiting or in flight
    lookups_sent: int = 0  # keys sent in Lookup calls (misses + re-reads of live flows)
    lookup_batches: int = 0
    claims: int = 0
    confirms: int = 0
    releases: int = 0
    refreshes: int = 0  # keys sent in Refresh calls
    revalidated: int = 0  # live entries re-read before they lapsed
    served: int = 0
    tunnelled: int = 0
    unknown: int = 0
    loop_guard: int = 0
    table_errors: int = 0
    # Seconds from a cache miss to the table's answer (recent misses).
    miss_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


def answer_of(row: np.void) -> Answer:
    """A result row as the forwarder's Answer (affinity fallback pulled apart)."""
    status = Status(int(row["status"]))
    state = State(int(row["state"]))
    pop = int(row["owner_pop"])
    if status in _LIVE and state not in (State.NONE, State.RELEASED) and pop:
        return Answer(status, pop, state, 0, int(row["expiry_ms"]))
    affinity = pop if int(row["flags"]) & FLAG_AFFINITY_FALLBACK else 0
    return Answer(status, 0, State.NONE, affinity, 0)


class _Batcher:
    """Micro-batches one kind of call. ``submit`` coalesces a key already waiting or in
    flight; a batch leaves when full or ``window_s`` after its first key."""

    def __init__(
        self,
        name: str,
        send: Callable[[bytes], Awaitable[ResultArray]],
        cfg: ForwarderConfig,
        stats: ForwarderStats,
        spawn: Callable[[Awaitable[None], str], None],
    ) -> None:
        self.name = name
        self._send = send
        self._window_s = cfg.batch_window_ms / 1000
        self._max = cfg.batch_max_keys
        self._slots = asyncio.Semaphore(cfg.max_batches_in_flight)
        self._stats = stats
        self._spawn = spawn
        self._waiting: dict[bytes, asyncio.Future[Answer]] = {}
        self._in_flight: dict[bytes, asyncio.Future[Answer]] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self.batches = 0
        self.keys = 0

    def submit(self, key: bytes) -> asyncio.Future[Answer]:
        fut = self._waiting.get(key) or self._in_flight.get(key)
        if fut is not None:
            self._stats.coalesced += 1
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
            if len(self._waiting) < self._max and self._window_s > 0:
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
        self.batches += 1
        self.keys += len(keys)
        try:
            try:
                rows = await self._send(b"".join(keys))
                answers = [answer_of(r) for r in rows]
            except DhtError as e:
                # The table is unreachable: every key is "unknown" (not cached), so the
                # packet still gets a decision.
                log.warning("%s batch of %d keys failed: %s", self.name, len(keys), e)
                self._stats.table_errors += 1
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


class Forwarder:
    """One PoP's forwarder client (module docstring). ``pop`` is this PoP's name or id;
    ``client`` a ``dht.client.Client`` talking to this PoP's nodes. ``clock`` (monotonic
    seconds) and ``wall_ms`` (Unix ms) can be injected by tests."""

    def __init__(
        self,
        client: Client,
        pop: int | str,
        config: ForwarderConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] | None = None,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.config = cfg = config or ForwarderConfig()
        self._pop_arg = pop
        self.here = 0
        self.cache = FlowCache(cfg.cache)
        self.stats = ForwarderStats()
        self._clock = clock
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._owns_client = owns_client
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._closed = False
        self._last_round = clock()

        def call(method: str, **kw: object) -> Callable[[bytes], Awaitable[ResultArray]]:
            async def send(raw: bytes) -> ResultArray:
                return await self.client.flow_packed(method, raw, **kw)  # type: ignore[arg-type]

            return send

        here = lambda: self.here  # noqa: E731 -- resolved in start()
        self._lookups = _Batcher("lookup", call("Lookup"), cfg, self.stats, self._spawn)
        self._claims = _Batcher(
            "claim", self._acting("Claim", here, cfg.claim_ttl_s), cfg, self.stats, self._spawn
        )
        self._confirms = _Batcher(
            "confirm", self._acting("Confirm", here, cfg.confirm_ttl_s), cfg, self.stats,
            self._spawn,
        )  # fmt: skip
        self._releases = _Batcher(
            "release", self._acting("Release", here, None), cfg, self.stats, self._spawn
        )
        self._refreshes = _Batcher(
            "refresh", self._acting("Refresh", here, cfg.confirm_ttl_s), cfg, self.stats,
            self._spawn,
        )  # fmt: skip
        self._batchers = (
            self._lookups, self._claims, self._confirms, self._releases, self._refreshes
        )  # fmt: skip

    def _acting(
        self, method: str, here: Callable[[], int], ttl_s: int | None
    ) -> Callable[[bytes], Awaitable[ResultArray]]:
        async def send(raw: bytes) -> ResultArray:
            if ttl_s is None:
                return await self.client.flow_packed(method, raw, pop=here())
            return await self.client.flow_packed(method, raw, pop=here(), ttl_s=ttl_s)

        return send

    @classmethod
    async def open(
        cls,
        targets: Sequence[str],
        pop: int | str,
        config: ForwarderConfig | None = None,
        *,
        tls: TlsConfig | None = None,
        timeout_s: float = 5.0,
    ) -> Forwarder:
        """A started forwarder with its own client to ``targets`` (this PoP's nodes);
        ``close()`` closes the client too."""
        from dht.client.client import Client

        client = Client(targets, tls=tls, timeout_s=timeout_s)
        fw = cls(client, pop, config, owns_client=True)
        await fw.start()
        return fw

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            if self.client._table is None:
                await self.client.refresh_table()
            self.here = self.client.pop_id(self._pop_arg)
            if not self.here:
                raise InvalidArgument("pop", "this forwarder's PoP must be named")
        except BaseException:
            await self.close()
            raise
        for b in self._batchers:
            self._spawn(b.run(), f"{b.name}-batcher")
        if self.config.background_refresh:
            self._spawn(self._maintain(), "forwarder-maintenance")

    async def close(self) -> None:
        """Stop the background work, fail callers still waiting (``Unavailable``), close
        the client if this forwarder opened it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in self._batchers:
            b.fail_all(Unavailable("forwarder closed"))
        self.cache.clear()
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("forwarder task %s failed", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------ look-ups

    async def lookup(self, key: FlowKey | bytes) -> Answer:
        """The flow's owner: from the cache, else from the table (coalesced, batched)."""
        return (await self._lookup(_raw(key)))[0]

    async def _lookup(self, k: bytes) -> tuple[Answer, bool]:
        e = self.cache.get(k, self._clock())
        if e is not None:
            self.stats.hits += 1
            return e.answer, True
        self.stats.misses += 1
        t0 = time.perf_counter()
        answer = await self._lookups.submit(k)
        self.stats.miss_latency_s.append(time.perf_counter() - t0)
        self.cache.put(k, answer, self._clock(), self._wall_ms())
        return answer, False

    def invalidate(self, key: FlowKey | bytes) -> None:
        """Drop a cached answer (pushed invalidation, if a deployment has one)."""
        self.cache.invalidate(_raw(key))

    @property
    def lookups_sent(self) -> int:
        return self._lookups.keys

    @property
    def lookup_batches(self) -> int:
        return self._lookups.batches

    # ------------------------------------------------------------------ packets

    async def handle(
        self, key: FlowKey | bytes, packet: Packet, *, tunnelled: bool = False
    ) -> Outcome:
        """Decide one packet (docs/protocol.md#decision-table): look the owner up (cache, then
        table), claim a new flow, release an ended one, and say SERVE, TUNNEL or SERVE_UNKNOWN."""
        k = _raw(key)
        self.stats.packets += 1
        answer: Answer | None = None
        cached = False
        if tunnelled:
            # Hop limit 1: no look-up decides where it goes; only a cached "ours" spares
            # a tunnelled-in SYN its claim.
            e = self.cache.get(k, self._clock())
            owner = e.owner if e else 0
            affinity = 0
        else:
            answer, cached = await self._lookup(k)
            owner = answer.owner
            affinity = answer.affinity if self.config.use_affinity else 0
        d = decide(
            packet,
            here=self.here,
            tunnelled=tunnelled,
            owner=owner,
            affinity=affinity,
            sticky_clients=self.config.sticky_clients,
        )
        if d.reason == "loop-guard":
            self.stats.loop_guard += 1
        if d.action is Action.CLAIM:
            d, answer = await self._claim(k, d)
        if d.release:
            await self.release(k)
        if d.action is Action.TUNNEL:
            self.stats.tunnelled += 1
        elif d.action is Action.SERVE:
            self.stats.served += 1
        else:
            self.stats.unknown += 1
        return Outcome(d.action, d.target, d.reason, cached, answer)

    async def _claim(self, k: bytes, d: Decision) -> tuple[Decision, Answer]:
        self.stats.claims += 1
        answer = await self._claims.submit(k)
        self.cache.put(k, answer, self._clock(), self._wall_ms())
        if answer.owner == self.here:
            return Decision(Action.SERVE, reason=d.reason), answer
        if answer.owner and d.may_tunnel:
            return Decision(Action.TUNNEL, answer.owner, "claim-owned-elsewhere"), answer
        # Refused (full, quota), unreachable, or owned elsewhere but tunnelled in: the
        # connection lives here without a record.
        return Decision(Action.SERVE, reason="claim-refused"), answer

    async def established(self, key: FlowKey | bytes) -> Answer:
        """The local handshake completed (or a UDP flow lived long enough): confirm, so
        the record is established and shipped to the other PoPs."""
        k = _raw(key)
        self.stats.confirms += 1
        answer = await self._confirms.submit(k)
        self.cache.put(k, answer, self._clock(), self._wall_ms())
        return answer

    async def release(self, key: FlowKey | bytes) -> Answer:
        """The connection ended here (FIN/RST served by the owner): leave a tombstone."""
        k = _raw(key)
        self.stats.releases += 1
        answer = await self._releases.submit(k)
        self.cache.invalidate(k)
        return answer

    # ------------------------------------------------------------------ background

    async def refresh_live(self) -> int:
        """One background round: re-read (batched ``Lookup``) the live flows whose entries
        lapse before the next round, and ``Refresh`` those this PoP owns that would expire
        within ``refresh_ahead_s``. Returns the number of keys sent."""
        cfg = self.config
        now = self._clock()
        since, self._last_round = self._last_round, now
        keys = list(self.cache.live(now, since, now + 2 * cfg.refresh_interval_s))
        if not keys:
            return 0
        wall = self._wall_ms()
        ahead_ms = cfg.refresh_ahead_s * 1000
        refresh: list[bytes] = []
        reread: list[bytes] = []
        for k in keys:
            e = self.cache.get(k, now)
            if e is None:
                continue
            own = e.owner == self.here and e.answer.expiry_ms - wall < ahead_ms
            (refresh if own else reread).append(k)
        futs = [self._refreshes.submit(k) for k in refresh]
        futs += [self._lookups.submit(k) for k in reread]
        self.stats.refreshes += len(refresh)
        self.stats.revalidated += len(reread)
        answers = await asyncio.gather(*futs)
        t, w = self._clock(), self._wall_ms()
        for k, a in zip([*refresh, *reread], answers, strict=True):
            if a.status == Status.NOT_FOUND and k in refresh:
                # Our record is gone (expired, or released elsewhere): ask the table.
                self.cache.invalidate(k)
            else:
                self.cache.put(k, a, t, w)
        return len(futs)

    async def _maintain(self) -> None:
        cfg = self.config
        last_table = self._clock()
        while not self._stop.is_set():
            delay = cfg.refresh_interval_s * random.uniform(0.9, 1.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.refresh_live()
                if self._clock() - last_table >= cfg.table_refresh_s:
                    last_table = self._clock()
                    await self.client.refresh_table()
            except DhtError as e:
                self.stats.table_errors += 1
                log.warning("forwarder background round failed: %s", e)


def _raw(key: FlowKey | bytes) -> bytes:
    raw = key if isinstance(key, bytes) else key.to_bytes()
    if len(raw) != KEY_SIZE:
        raise InvalidArgument("key", f"length {len(raw)}: want one {KEY_SIZE}-byte flow key")
    return raw
