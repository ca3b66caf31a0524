"""The forwarder-side client: one PoP's packet forwarder asks "who owns this flow?" and
acts on the answer with the decision table of docs/protocol.md#decision-table
(``dht.client.decision``).

    async with Client(pop_nodes) as client, Forwarder(client, "ams") as fw:
        out = await fw.handle(key, Packet.SYN)        # one call: the claim names the owner
        await fw.established(key)                     # handshake done: confirm
        out = await fw.handle(key, Packet.DATA)       # a cache hit: Action.SERVE
        out = await fw.handle(other, Packet.DATA)     # owned by fra: TUNNEL, target 2
        await fw.alive(pinned_keys)                   # flows the data plane holds: keep them

What it adds to ``dht.client.Client`` (which it uses for routing, failover across
replicas and nodes, and keeping the partition table current; the forwarder refreshes the
table every ``table_refresh_s`` too, so an idle forwarder is current when traffic comes):

- a bounded cache (``dht.client.cache``): owners for at most ``owner_ttl_s`` (the bound for
  an owner change to reach this forwarder) and never past the record's expiry, negative
  answers for ``negative_ttl_s``;
- concurrent misses for one key share one look-up (coalescing), and misses from every
  caller are micro-batched (``dht.client.batcher``): a miss leaves at once when no call
  of its kind is in flight (Nagle's rule), else with the others when the batch holds
  ``batch_max_keys`` keys or ``batch_window_ms`` after its first key, at most
  ``max_batches_in_flight`` at once. Claims, confirms, releases and refreshes are batched
  the same way;
- the SYN path is one call: a claim answers with the owner, nothing waits for a look-up
  first (with sticky clients a look-up comes first: it carries the client's affinity);
- a packet that is not a flow's first (TCP non-SYN, UDP) whose flow this PoP does not know
  is asked of the other PoPs by the table (the second chance,
  docs/protocol.md#second-chance) before affinity may decide;
- a packet of a connection held in a local socket (``local=True``) is served here, with
  no table call;
- FIN/RST served by the owner releases the record in the background: the packet does not
  wait (a failed release is counted in ``stats.release_failures``);
- live flows (used since the last round) are re-read in batches before their entries
  lapse, and records this PoP owns are refreshed (``Refresh``) when they would expire
  within ``refresh_ahead_s``: a busy flow never waits on a miss and never expires. Flows
  the data plane holds (no packet reaches ``handle()``) are kept the same way by
  ``alive(keys)`` (docs/api.md#keep-alive);
- ``close()`` stops the background work, fails callers still waiting, and closes the
  client if the forwarder opened it;
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from dht.client.batcher import UNAVAILABLE, Batcher
from dht.client.cache import Answer, CacheLimits, FlowCache
from dht.client.decision import Action, Decision, Packet, decide
from dht.client.udp import UdpLookups, udp_first
from dht.core.config import TlsConfig
from dht.core.errors import DhtError, InvalidArgument, Unavailable
from dht.core.record import Status
from dht.core.wire import KEY_SIZE, FlowKey, ResultArray

if TYPE_CHECKING:
    from dht.client.client import Client

log = logging.getLogger(__name__)

__all__ = ["UNAVAILABLE", "Forwarder", "ForwarderConfig", "ForwarderStats", "Outcome"]


@dataclass(frozen=True)
class ForwarderConfig:
    cache: CacheLimits = field(default_factory=CacheLimits)
    # While a call of its kind is in flight, a miss waits at most this long for others to
    # share its batch (with none in flight it leaves at once): 2 ms is far below a TCP
    # retransmission and turns a burst of misses into a few calls.
    batch_window_ms: float = 2.0
    # Confirms, releases and refreshes (no packet waits on them) always gather this long:
    # a connection's calls share RPCs with others' (node CPU per connection), at the
    # price of the record being established and shipped that much later.
    background_window_ms: float = 20.0
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
    # docs/protocol.md#decision-table: a new flow of a client whose affinity names another
    # PoP goes there ("sticky clients"); off = the flow starts where its SYN lands. On, a
    # SYN's claim waits for a look-up first (the affinity is in its answer).
    sticky_clients: bool = False
    # Use the affinity fallback for packets of unknown flows (off: the simulator's
    # "no affinity" comparison).
    use_affinity: bool = True
    # Look-ups for packets that are not a flow's first ask the other PoPs about flows this
    # PoP does not know (docs/protocol.md#second-chance); off: this PoP's table only.
    second_chance: bool = True
    # Ask look-ups over the nodes' UDP listeners (docs/api.md#udp-lookup; plaintext
    # deployments, nodes with udp_lookup_port = 0), gRPC when no answer comes within
    # udp_timeout_s (it covers the node's second chance, 0.15 s by default).
    udp_lookups: bool = False
    udp_timeout_s: float = 0.3

    def __post_init__(self) -> None:
        windows = (self.batch_window_ms, self.background_window_ms)
        if min(windows) < 0 or not 1 <= self.batch_max_keys <= 10_000:
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
    """What one forwarder did; every field is listed in docs/api.md#forwarder-statistics."""

    packets: int = 0  # handle() calls
    hits: int = 0  # look-ups answered by the cache (an owner, or a recent "nobody")
    misses: int = 0  # look-ups that went to the table
    coalesced: int = 0  # submissions that joined a key already waiting or in flight
    lookups_sent: int = 0  # keys sent in Lookup calls (misses, re-reads, keep-alives)
    lookup_batches: int = 0  # Lookup calls sent
    second_chance_sent: int = 0  # of lookups_sent, keys that may ask the other PoPs
    second_chance_found: int = 0  # answers another PoP's copy gave (flagged)
    claims: int = 0  # claims asked (new flows: SYN, UDP)
    claim_batches: int = 0  # Claim calls sent
    confirms: int = 0  # confirms asked (established())
    releases: int = 0  # releases asked (FIN/RST served by the owner, release())
    release_failures: int = 0  # background releases the table did not take (UNAVAILABLE)
    refreshes: int = 0  # keys sent in Refresh calls (background round, alive())
    revalidated: int = 0  # live entries re-read before they lapsed
    kept_alive: int = 0  # keys passed to alive()
    local: int = 0  # packets served for a local socket, with no table call
    served: int = 0  # packets served here (local ones included)
    tunnelled: int = 0  # packets tunnelled to another PoP
    unknown: int = 0  # packets served here with no owner known (SERVE_UNKNOWN)
    loop_guard: int = 0  # decisions the loop guard turned into SERVE
    table_errors: int = 0  # calls that failed whole, and failed background rounds
    shed_batches: int = 0  # of those, calls the node refused as overloaded
    udp_lookups: int = 0  # keys looked up over UDP (udp_lookups on)
    udp_fallbacks: int = 0  # UDP look-up batches that got no answer and went to gRPC
    # Seconds from a cache miss to the table's answer (the last 100,000 misses).
    miss_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


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
        self._behind: set[asyncio.Future[Answer]] = set()  # releases sent by handle()
        # Flows served for a local socket that had no cache entry (kept by the next round).
        self._local_unseen: set[bytes] = set()
        self.udp = (
            UdpLookups(lambda: self.client.table, timeout_s=cfg.udp_timeout_s)
            if cfg.udp_lookups
            else None
        )

        def batcher(
            name: str, send: Callable[[bytes], Awaitable[ResultArray]], linger: bool = False
        ) -> Batcher:
            return Batcher(
                name,
                send,
                window_ms=cfg.background_window_ms if linger else cfg.batch_window_ms,
                linger=linger,
                max_keys=cfg.batch_max_keys,
                max_in_flight=cfg.max_batches_in_flight,
                spawn=self._spawn,
                counters=self.stats,
            )

        self._lookups = batcher("lookup", _sender(self, "Lookup"))
        self._asks = batcher("lookup-second-chance", _sender(self, "Lookup", second_chance=True))
        self._claims = batcher("claim", _sender(self, "Claim", cfg.claim_ttl_s))
        self._confirms = batcher("confirm", _sender(self, "Confirm", cfg.confirm_ttl_s), True)
        self._releases = batcher("release", _sender(self, "Release"), True)
        self._refreshes = batcher("refresh", _sender(self, "Refresh", cfg.confirm_ttl_s), True)
        self._batchers = (
            self._lookups, self._asks, self._claims, self._confirms, self._releases,
            self._refreshes,
        )  # fmt: skip

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
        if self.udp is not None:
            self.udp.close()
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

    async def lookup(self, key: FlowKey | bytes, *, second_chance: bool = False) -> Answer:
        """The flow's owner: from the cache, else from the table (coalesced, batched).
        ``second_chance``: if this PoP does not know the flow, the table asks the other
        PoPs (docs/protocol.md#second-chance)."""
        return (await self._lookup(_raw(key), second_chance))[0]

    async def _lookup(self, k: bytes, second_chance: bool) -> tuple[Answer, bool]:
        e = self.cache.get(k, self._clock())
        if e is not None:
            self.stats.hits += 1
            return e.answer, True
        self.stats.misses += 1
        t0 = time.perf_counter()
        answer = await self._ask(k, second_chance)
        self.stats.miss_latency_s.append(time.perf_counter() - t0)
        self.cache.put(k, answer, self._clock(), self._wall_ms())
        return answer, False

    async def _ask(self, k: bytes, second_chance: bool) -> Answer:
        if second_chance and self.config.second_chance:
            answer = await self._asks.submit(k)
            if answer.second_chance:
                self.stats.second_chance_found += 1
            return answer
        return await self._lookups.submit(k)

    def invalidate(self, key: FlowKey | bytes) -> None:
        """Drop a cached answer (pushed invalidation, if a deployment has one)."""
        self.cache.invalidate(_raw(key))

    # ------------------------------------------------------------------ packets

    async def handle(
        self,
        key: FlowKey | bytes,
        packet: Packet,
        *,
        tunnelled: bool = False,
        local: bool = False,
    ) -> Outcome:
        """Decide one packet (docs/protocol.md#decision-table) and say SERVE, TUNNEL or
        SERVE_UNKNOWN. ``tunnelled``: it arrived tunnelled from another PoP (hop limit 1).
        ``local``: this host holds a local socket for the flow (the forwarder knows its
        own sockets): served here, no table call.

        A SYN is one call (a claim answers with the owner); a packet that is not a flow's
        first asks the table (cache first) with a second chance across PoPs; FIN/RST
        releases in the background, never holding the packet."""
        k = _raw(key)
        st = self.stats
        st.packets += 1
        answer: Answer | None = None
        cached = False
        owner = affinity = 0
        if local:
            st.local += 1
            # No call, but the flow is live: the background round keeps its record (its
            # cache entry, marked used, is re-read or refreshed before it lapses; a flow
            # with no entry is looked up there).
            if self.cache.get(k, self._clock()) is None:
                self._local_unseen.add(k)
        elif tunnelled or (packet is Packet.SYN and not self.config.sticky_clients):
            # A SYN needs no look-up: its claim names the owner. Hop limit 1: no look-up
            # decides where a tunnelled-in packet goes. A cached owner spares the claim.
            e = self.cache.get(k, self._clock())
            if e is not None:
                st.hits += 1
                answer, cached, owner = e.answer, True, e.owner
        else:
            answer, cached = await self._lookup(k, packet is not Packet.SYN)
            owner = answer.owner
            affinity = answer.affinity if self.config.use_affinity else 0
        d = decide(
            packet,
            here=self.here,
            tunnelled=tunnelled,
            owner=owner,
            affinity=affinity,
            sticky_clients=self.config.sticky_clients,
            local=local,
        )
        if d.reason == "loop-guard":
            st.loop_guard += 1
        if d.action is Action.CLAIM:
            d, answer = await self._claim(k, d)
        if d.release:
            self._release_behind(k)
        if d.action is Action.TUNNEL:
            st.tunnelled += 1
        elif d.action is Action.SERVE:
            st.served += 1
        else:
            st.unknown += 1
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
        """The connection ended here (FIN/RST served by the owner): leave a tombstone,
        and wait for the table's answer (``handle`` does not wait)."""
        k = _raw(key)
        self.stats.releases += 1
        self.cache.invalidate(k)
        return await self._releases.submit(k)

    def _release_behind(self, k: bytes) -> None:
        self.stats.releases += 1
        self.cache.invalidate(k)
        fut = self._releases.submit(k)
        self._behind.add(fut)
        fut.add_done_callback(self._released)

    @property
    def releases_in_flight(self) -> int:
        """Releases ``handle`` sent in the background that have no answer yet."""
        return len(self._behind)

    async def flush(self) -> None:
        """Wait until the releases ``handle`` sent in the background so far have their
        answers (or failed: counted in ``stats.release_failures``)."""
        if self._behind:
            await asyncio.wait(set(self._behind))

    def _released(self, fut: asyncio.Future[Answer]) -> None:
        self._behind.discard(fut)
        if (
            fut.cancelled()
            or fut.exception() is not None
            or fut.result().status in (Status.UNAVAILABLE, Status.MOVED)
        ):
            self.stats.release_failures += 1

    # ------------------------------------------------------------------ keep-alive

    async def alive(self, keys: Iterable[FlowKey | bytes]) -> list[Answer]:
        """Flows the data plane holds (a kernel map, hardware) are still alive: their
        packets do not pass through ``handle()``, so nothing else would keep their records.
        Records this PoP owns that would expire within ``refresh_ahead_s`` are refreshed;
        the others are re-read (revalidated, second chance included). Batched like every
        call. Returns the current answer per key, in order.

        Call it for every pinned flow at least every ``refresh_ahead_s - slack`` seconds,
        with ``refresh_ahead_s`` below the established TTL (docs/api.md#keep-alive)."""
        raw = [_raw(k) for k in keys]
        self.stats.kept_alive += len(raw)
        now = self._clock()
        out: dict[bytes, Answer] = {}
        unknown: list[bytes] = []
        for k in dict.fromkeys(raw):
            e = self.cache.get(k, now)
            if e is None or e.owner != self.here:
                unknown.append(k)
            else:
                out[k] = e.answer
        out.update(await self._keep(unknown, reread_rest=True))
        # Owned and due now (some re-read just now): refresh them.
        out.update(
            await self._keep([k for k, a in out.items() if a.owner == self.here], reread_rest=False)
        )
        return [out[k] for k in raw]

    async def refresh_live(self) -> int:
        """One background round: re-read (batched ``Lookup``) the live flows whose entries
        lapse before the next round, and ``Refresh`` those this PoP owns that would expire
        within ``refresh_ahead_s``. Returns the number of keys sent."""
        cfg = self.config
        now = self._clock()
        since, self._last_round = self._last_round, now
        keys = list(self.cache.live(now, since, now + 2 * cfg.refresh_interval_s))
        sent = len(await self._keep(keys, reread_rest=True))
        if self._local_unseen:
            # Served for a local socket with no cache entry: read, refreshed if due.
            unseen, self._local_unseen = list(self._local_unseen), set()
            await self.alive(unseen)
            sent += len(unseen)
        return sent

    async def _keep(self, keys: list[bytes], *, reread_rest: bool) -> dict[bytes, Answer]:
        """Refresh the keys this PoP owns whose records expire within ``refresh_ahead_s``;
        re-read the others if ``reread_rest``. Returns the answers of the keys sent."""
        if not keys:
            return {}
        now, wall = self._clock(), self._wall_ms()
        ahead_ms = self.config.refresh_ahead_s * 1000
        refresh: list[bytes] = []
        reread: list[bytes] = []
        for k in keys:
            e = self.cache.get(k, now)
            if e is not None and e.owner == self.here and e.answer.expiry_ms - wall < ahead_ms:
                refresh.append(k)
            elif reread_rest:
                reread.append(k)
        futs: list[Awaitable[Answer]] = [self._refreshes.submit(k) for k in refresh]
        futs += [self._ask(k, True) for k in reread]
        self.stats.refreshes += len(refresh)
        self.stats.revalidated += len(reread)
        answers = await asyncio.gather(*futs)
        t, w = self._clock(), self._wall_ms()
        mine = set(refresh)
        out: dict[bytes, Answer] = {}
        for k, a in zip([*refresh, *reread], answers, strict=True):
            out[k] = a
            if a.status == Status.NOT_FOUND and k in mine:
                # Our record is gone (expired, or released elsewhere): ask the table.
                self.cache.invalidate(k)
            else:
                self.cache.put(k, a, t, w)
        return out

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


def _sender(
    fw: Forwarder, method: str, ttl_s: int = 0, *, second_chance: bool = False
) -> Callable[[bytes], Awaitable[ResultArray]]:
    """One kind of call of ``fw``, counted; acting calls act for its PoP; look-ups go
    over UDP first when ``udp_lookups`` is on."""
    stats = fw.stats

    async def send(raw: bytes) -> ResultArray:
        n = len(raw) // KEY_SIZE
        if method == "Lookup":
            stats.lookups_sent += n
            stats.lookup_batches += 1
            if second_chance:
                stats.second_chance_sent += n
            return await udp_first(fw.udp, fw.client, raw, second_chance, stats)
        if method == "Claim":
            stats.claim_batches += 1
        return await fw.client.flow_packed(method, raw, pop=fw.here, ttl_s=ttl_s)

    return send
