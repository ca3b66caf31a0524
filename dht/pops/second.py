"""Second chance (docs/protocol.md#second-chance): flows this PoP holds no live record of,
asked of every other PoP at once, bounded by a short deadline.

A record is shipped only once established (and ``replicate_after_s`` old), and shipping
takes tens of milliseconds; a route change inside that window, or in the middle of a
handshake, lands the flow's next packet on a PoP that has never heard of it. Asking the
other PoPs then costs one WAN round trip, only after a flap and only for flows not yet
shipped, and turns a reset into a tunnelled packet.

Each asked PoP answers from its own table (embryonic claims included, which are never
shipped). The answers are checked like any copy from the network
(:func:`dht.core.ingress.check_entries`) and merged with the merge rule, so two PoPs that
both know the flow give the same owner the table would once their copies meet. A PoP
that is down or slow counts as "does not know": nothing waits past the deadline.
Answers are not stored here: the forwarder caches them like any answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from dht.core.ingress import Bounds, check_entries
from dht.core.record import Record, State, Status, merge
from dht.core.wire import ENTRY_DTYPE, KEY_SIZE, RESULT_DTYPE, ResultArray
from dht.pops.link import PeerPop
from dht.pops.transport import PopTransport, PopUnreachable

log = logging.getLogger(__name__)

# A WAN round trip is 1..100 ms; a second chance gives up well before TCP retransmits.
SECOND_CHANCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class SecondChance:
    """Asks the other PoPs who owns flows this PoP does not know. One per node."""

    def __init__(
        self,
        transport: PopTransport,
        bounds: Bounds,
        timeout_s: float,
        registry: CollectorRegistry,
    ) -> None:
        self.transport = transport
        self.bounds = bounds
        self.timeout_s = timeout_s
        self.queries = Counter(
            "dht_second_chance_queries",
            "look-up batches that asked the other PoPs about flows this PoP does not know",
            registry=registry,
        )
        self.keys = Counter(
            "dht_second_chance_keys",
            "flows asked of the other PoPs, by outcome (found: a live copy named the owner)",
            ["result"],
            registry=registry,
        )
        self.peer_failures = Counter(
            "dht_second_chance_peer_failures",
            "second-chance calls to a PoP that failed or missed the deadline, by PoP and why",
            ["peer_pop", "reason"],
            registry=registry,
        )
        self.seconds = Histogram(
            "dht_second_chance_seconds",
            "time a second chance took (all PoPs asked at once; at most the deadline)",
            buckets=SECOND_CHANCE_BUCKETS,
            registry=registry,
        )
        for result in ("found", "not_found"):
            self.keys.labels(result)

    async def ask(self, links: Sequence[PeerPop], raw: bytes, now_ms: int) -> list[Record | None]:
        """The merged live copy the other PoPs hold of each packed key (None: no PoP
        answered one in time)."""
        n = len(raw) // KEY_SIZE
        started = time.perf_counter()
        self.queries.inc()
        answers = await asyncio.gather(*(self._one(link, raw) for link in links))
        found: list[Record | None] = [None] * n
        keys = np.frombuffer(raw, dtype=ENTRY_DTYPE["key"])
        for link, res in zip(links, answers, strict=True):
            if res is None:
                continue
            if len(res) != n:
                self.peer_failures.labels(link.name, "bad_answer").inc()
                continue
            live = (res["status"] == Status.OK) & np.isin(
                res["state"], (State.EMBRYONIC, State.ESTABLISHED)
            )
            live &= res["expiry_ms"] > now_ms
            idx = np.flatnonzero(live)
            if not idx.size:
                continue
            entries = np.zeros(idx.size, dtype=ENTRY_DTYPE)
            entries["key"] = keys[idx]
            entries["rec"] = res[idx]
            checked = check_entries(entries, self.bounds, now_ms)
            if not checked.all_ok:
                self.peer_failures.labels(link.name, "bad_record").inc(checked.n_refused)
            for i, row in zip(idx[checked.ok], res[idx[checked.ok]], strict=True):
                rec = record_of(row)
                prev = found[int(i)]
                found[int(i)] = rec if prev is None else merge(prev, rec)
        hit = sum(r is not None for r in found)
        self.keys.labels("found").inc(hit)
        self.keys.labels("not_found").inc(n - hit)
        self.seconds.observe(time.perf_counter() - started)
        return found

    async def _one(self, link: PeerPop, raw: bytes) -> ResultArray | None:
        address = link.rotation()[0]
        try:
            async with asyncio.timeout(self.timeout_s):
                got = await self.transport.lookup(address, raw)
        except TimeoutError:
            self.peer_failures.labels(link.name, "deadline").inc()
            return None
        except PopUnreachable as e:
            log.debug("second chance at %s: %s", link.name, e)
            self.peer_failures.labels(link.name, "unreachable").inc()
            return None
        if len(got) % RESULT_DTYPE.itemsize:
            self.peer_failures.labels(link.name, "bad_answer").inc()
            return None
        return np.frombuffer(got, dtype=RESULT_DTYPE)


def record_of(row: np.void) -> Record:
    """A result row (with a record) as a Record."""
    return Record(
        owner_pop=int(row["owner_pop"]),
        owner_server=int(row["owner_server"]),
        state=State(int(row["state"])),
        birth_hlc=int(row["birth_hlc"]),
        birth_pop=int(row["birth_pop"]),
        generation=int(row["generation"]),
        expiry_ms=int(row["expiry_ms"]),
    )
