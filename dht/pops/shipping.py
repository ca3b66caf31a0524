"""What a PoP ships to the other PoPs, and the bookkeeping of a link
(docs/protocol.md#shipping-between-pops).

Pure: time comes in as an argument, nothing does I/O (dht.pops.extension wires it to gRPC and
timers), so every rule here is tested without sockets.

The policy, per written copy (the record before and after a write the node coordinated):

* embryonic records are never shipped (most flows end before their handshake does, and
  a SYN flood must not cross PoPs);
* an established record is shipped once it is ``replicate_after_ms`` old (by its birth);
  younger ones wait in a delay line and are shipped then, if still established;
* a tombstone is shipped when it ends an established record that was old enough to have
  been shipped (the tombstone of a flow no other PoP ever saw stays home);
* a refresh (same claim, later expiry) is shipped only when the copy the other PoPs hold
  would otherwise come close to lapsing: the expiry is cut into quanta of a power of two
  no longer than half the lease, and a refresh ships when it moves the expiry into a new
  quantum (:func:`refresh_due`). No per-key state is needed, and the remote copy keeps at
  least a quarter of the lease in hand (see :func:`refresh_due`);
* an affinity record is shipped when its preferred PoP changes (or, like a refresh, when
  the remote copy's expiry would lapse).

Anti-entropy between PoPs compares digests of the *shipped set* only (established
records old enough, affinity records), with the expiry left out: PoPs legitimately hold
different expiries of one record (refreshes are not shipped one by one), and counting
those as differences would ship every refresh after all.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from dht.core.digest import partition_sums, record_fingerprints
from dht.core.record import LOGICAL_BITS, State, Status
from dht.core.wire import (
    ENTRY_DTYPE,
    ENTRY_SIZE,
    KEY_SIZE,
    KIND_AFFINITY,
    KIND_FLOW,
    EntryArray,
    ResultArray,
    U64Array,
    key_hashes,
)


class Kind(IntEnum):
    """Why a copy is shipped (the ``kind`` label of the shipping metrics)."""

    NONE = 0
    ESTABLISHED = 1  # first shipped copy of an established claim
    REFRESH = 2  # a later expiry the remote copy needs
    TOMBSTONE = 3
    AFFINITY = 4
    DELAY = 5  # established but younger than replicate_after: ship later


SHIPPED_KINDS = (Kind.ESTABLISHED, Kind.REFRESH, Kind.TOMBSTONE, Kind.AFFINITY)
# Per kind (uint8): is it shipped? An index into this costs a fraction of np.isin.
IS_SHIPPED = np.zeros(256, dtype=np.bool_)
IS_SHIPPED[list(SHIPPED_KINDS)] = True

# Smallest refresh quantum: below a second the rule would ship nearly every refresh.
MIN_QUANTUM_MS = 1_000


def quantum_ms(lease_ms: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The largest power of two <= lease / 2 (at least MIN_QUANTUM_MS), per lease."""
    half = np.maximum(lease_ms // 2, MIN_QUANTUM_MS).astype(np.int64)
    exp = np.floor(np.log2(half.astype(np.float64))).astype(np.int64)
    q = np.left_shift(np.int64(1), exp)
    # log2 of a float may round up at exact powers of two minus a little: correct it.
    q = np.where(q > half, q >> 1, q)
    return np.asarray(q, dtype=np.int64)


def refresh_due(
    old_expiry_ms: npt.NDArray[np.int64], new_expiry_ms: npt.NDArray[np.int64], now_ms: int
) -> npt.NDArray[np.bool_]:
    """Does moving a record's expiry from old to new need shipping?

    With lease L = new - now and quantum Q = the largest power of two <= L/2, a refresh
    ships when ``new // Q != old // Q``. Why the remote copy never lapses while refreshes
    keep coming: the last shipped expiry R reached some boundary m*Q; until the next
    ship the local expiry E stays below (m+1)*Q, so now = E - L <= E - 2Q < (m-1)*Q < R.
    A shorter lease only makes Q smaller (powers of two nest), never the guarantee
    weaker. The remote copy therefore holds at least ~Q >= L/4 in hand for the shipping
    lag: 150 s of a 600 s TCP lease."""
    old = old_expiry_ms.astype(np.int64)
    new = new_expiry_ms.astype(np.int64)
    q = quantum_ms(np.maximum(new - now_ms, 1))
    return np.asarray((new // q) != (old // q), dtype=np.bool_)


def birth_ms(recs: ResultArray) -> npt.NDArray[np.int64]:
    return (recs["birth_hlc"].astype(np.uint64) >> np.uint64(LOGICAL_BITS)).astype(np.int64)


def classify(
    entries: EntryArray, before: ResultArray, now_ms: int, replicate_after_ms: int
) -> npt.NDArray[np.uint8]:
    """The :class:`Kind` of each written copy. ``entries``: the copies after the write
    (ENTRY rows), ``before``: the stored copies before it (RESULT rows, status OK or
    NOT_FOUND), one per entry."""
    n = len(entries)
    kinds = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return kinds
    after = entries["rec"]
    key_kind = entries["key"]["kind"]
    had = before["status"] == Status.OK
    state = after["state"]
    old_expiry = before["expiry_ms"].astype(np.int64)
    new_expiry = after["expiry_ms"].astype(np.int64)
    due = refresh_due(old_expiry, new_expiry, now_ms)

    flow = key_kind == KIND_FLOW
    same_claim = (
        had
        & (before["birth_hlc"] == after["birth_hlc"])
        & (before["birth_pop"] == after["birth_pop"])
        & (before["generation"] == after["generation"])
    )
    was_established = same_claim & (before["state"] == State.ESTABLISHED)
    old_enough = (now_ms - birth_ms(after)) >= replicate_after_ms
    est = flow & (state == State.ESTABLISHED)
    kinds[est & ~old_enough] = Kind.DELAY
    kinds[est & old_enough & ~was_established] = Kind.ESTABLISHED
    kinds[est & old_enough & was_established & due] = Kind.REFRESH
    released = flow & (state == State.RELEASED)
    kinds[released & was_established & old_enough] = Kind.TOMBSTONE

    aff = key_kind == KIND_AFFINITY
    live_before = had & (old_expiry > now_ms)
    changed = ~live_before | (before["owner_pop"] != after["owner_pop"]) | due
    kinds[aff & changed] = Kind.AFFINITY
    return kinds


# --------------------------------------------------------------------------- the shipped set


def shipped_set(entries: EntryArray, cutoff_ms: int) -> npt.NDArray[np.bool_]:
    """Which copies anti-entropy between PoPs compares: established flow records born at
    or before ``cutoff_ms`` (now - replicate_after) and affinity records."""
    recs = entries["rec"]
    kind = entries["key"]["kind"]
    est = (kind == KIND_FLOW) & (recs["state"] == State.ESTABLISHED)
    mask = (est & (birth_ms(recs) <= cutoff_ms)) | (kind == KIND_AFFINITY)
    return np.asarray(mask, dtype=np.bool_)


def exchanged_set(entries: EntryArray, cutoff_ms: int) -> npt.NDArray[np.bool_]:
    """What anti-entropy sends for a partition that differs: the compared set plus the
    tombstones, so a flow released during a cut cannot come back from a PoP that still
    holds it established."""
    released = (entries["key"]["kind"] == KIND_FLOW) & (entries["rec"]["state"] == State.RELEASED)
    return np.asarray(shipped_set(entries, cutoff_ms) | released, dtype=np.bool_)


def pop_digests(
    entries: EntryArray, partitions: npt.NDArray[np.integer], num_partitions: int, cutoff_ms: int
) -> tuple[U64Array, npt.NDArray[np.uint32]]:
    """Per partition (all ``num_partitions``): digest and count of the compared set, the
    expiry left out. ``partitions``: each entry's partition."""
    keep = shipped_set(entries, cutoff_ms)
    recs = entries["rec"][keep].copy()
    recs["expiry_ms"] = 0
    recs["status"] = 0
    hashes = entry_hashes(entries[keep])
    return partition_sums(
        np.asarray(partitions)[keep], record_fingerprints(hashes, recs), num_partitions
    )


def entry_hashes(entries: EntryArray) -> U64Array:
    return key_hashes(np.ascontiguousarray(entries["key"]).tobytes())


# --------------------------------------------------------------------------- the link's queue


@dataclass
class Batch:
    """One batch on its way to a peer PoP: the packed entries, each one's kind, and when
    each was queued (monotonic ms), for the lag."""

    seq: int
    raw: bytes
    kinds: npt.NDArray[np.uint8]
    queued_ms: npt.NDArray[np.int64]
    attempts: int = 0

    def __len__(self) -> int:
        return len(self.raw) // ENTRY_SIZE


@dataclass
class OutQueue:
    """Copies waiting for one peer PoP, newest per key (a key written twice before its
    batch left is shipped once), at most ``limit`` including the batch in flight: the
    bounded resend buffer. Beyond it new copies are dropped and counted; the caller then
    repairs the peer by anti-entropy (:attr:`overflowed`)."""

    limit: int
    pending: dict[bytes, tuple[bytes, int, int]] = field(default_factory=dict)
    inflight: Batch | None = None
    seq: int = 0
    dropped: int = 0
    overflowed: bool = False

    def __len__(self) -> int:
        return len(self.pending) + (len(self.inflight) if self.inflight else 0)

    def add(self, raw: bytes, kinds: npt.NDArray[np.uint8], now_ms: int) -> int:
        """Queue packed ENTRY rows with their kinds; returns how many were dropped."""
        room = self.limit - len(self)
        dropped = 0
        for i, off in enumerate(range(0, len(raw), ENTRY_SIZE)):
            key = raw[off : off + KEY_SIZE]
            rec = raw[off + KEY_SIZE : off + ENTRY_SIZE]
            held = self.pending.get(key)
            if held is None:
                if room <= 0:
                    dropped += 1
                    continue
                room -= 1
                self.pending[key] = (rec, int(kinds[i]), now_ms)
            else:  # keep its place and first queue time: it has waited since then
                self.pending[key] = (rec, int(kinds[i]), held[2])
        if dropped:
            self.dropped += dropped
            self.overflowed = True
        return dropped

    def next_batch(self, n: int) -> Batch | None:
        """The batch in flight (resent until acknowledged), or a new one of up to ``n``."""
        if self.inflight is not None:
            return self.inflight
        if not self.pending:
            return None
        keys = list(self.pending)[:n]
        parts, kinds, times = [], [], []
        for k in keys:
            rec, kind, t = self.pending.pop(k)
            parts.append(k + rec)
            kinds.append(kind)
            times.append(t)
        self.seq += 1
        self.inflight = Batch(
            self.seq,
            b"".join(parts),
            np.array(kinds, dtype=np.uint8),
            np.array(times, dtype=np.int64),
        )
        return self.inflight

    def acked(self) -> Batch | None:
        done, self.inflight = self.inflight, None
        return done


@dataclass
class DelayLine:
    """Established records younger than replicate_after: (due ms, key) in due order
    (the delay is one constant, so appending keeps the order). Bounded; the overflow is
    left to anti-entropy, which compares every established record old enough."""

    limit: int
    items: deque[tuple[int, bytes]] = field(default_factory=deque)
    dropped: int = 0
    waiting: Counter[bytes] = field(default_factory=Counter)  # keys in ``items``

    def add(self, keys: list[bytes], due_ms: list[int]) -> None:
        for k, d in zip(keys, due_ms, strict=True):
            if len(self.items) >= self.limit:
                self.dropped += 1
                continue
            self.items.append((d, k))
            self.waiting[k] += 1

    def due(self, now_ms: int) -> list[bytes]:
        out = []
        while self.items and self.items[0][0] <= now_ms:
            k = self.items.popleft()[1]
            self.waiting[k] -= 1
            if not self.waiting[k]:
                del self.waiting[k]
            out.append(k)
        return out

    def holds(self, keys: list[bytes]) -> npt.NDArray[np.bool_]:
        """Per key: still waiting here (its established record not shipped yet)."""
        return np.array([k in self.waiting for k in keys], dtype=bool)


@dataclass
class LagSamples:
    """The last ``size`` replication lags (ms) to one peer PoP: queued -> acknowledged."""

    size: int = 4096
    samples: deque[int] = field(default_factory=deque)

    def add(self, lags_ms: npt.NDArray[np.int64], per_batch: int = 64) -> None:
        # A big batch adds an even spread of its records, not all of them.
        step = max(1, len(lags_ms) // per_batch)
        for v in lags_ms[::step].tolist():
            self.samples.append(int(v))
            if len(self.samples) > self.size:
                self.samples.popleft()

    def quantile(self, q: float) -> float | None:
        if not self.samples:
            return None
        return float(np.quantile(np.fromiter(self.samples, dtype=np.int64), q))


def entries_of(raw: bytes) -> EntryArray:
    return np.frombuffer(raw, dtype=ENTRY_DTYPE)
