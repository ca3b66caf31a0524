"""Per-partition digests of the flow store, kept up to date instead of recomputed.

Anti-entropy asks for every partition's digest each interval, and so does every peer
(docs/protocol.md#anti-entropy). Recomputed from the whole table each time they cost
about 15% of a core per node at 20,000 records and would cost seconds at millions
(measured with py-spy under the rolling-restart test's load). They change only when a
copy is written or removed, or when a copy's expiry passes (digests cover only copies
with ``expiry_ms > now``, so replicas that purge at different moments agree). So the
cache keeps, per partition, the digest, the count and the earliest expiry among its
counted copies, and a call recomputes only the partitions written since the last call
(dht.store.table.FamilyTable.take_changes) or whose earliest expiry has passed. Same
answers as the full scan (tests/unit/test_store.py compares them on every step of the
store's model test).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dht.core import digest
from dht.core.wire import U64Array
from dht.store.table import BoolArray, FamilyTable

_NEVER = np.iinfo(np.int64).max
_SCAN_CHUNK = 1 << 16


class DigestCache:
    def __init__(self) -> None:
        self._parts = 0
        self._digests = np.zeros(0, dtype=np.uint64)
        self._counts = np.zeros(0, dtype=np.uint32)
        # Per partition: the earliest expiry among the copies counted (their digest
        # changes when it passes), _NEVER if none.
        self._until = np.zeros(0, dtype=np.int64)
        self._now = 0
        self.recomputed = 0  # partitions recomputed (for tests and the curious)

    def get(
        self, tables: tuple[FamilyTable, FamilyTable], num_partitions: int, now_ms: int
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        changes = [t.take_changes() for t in tables]
        p = np.uint64(num_partitions)
        if num_partitions != self._parts or now_ms < self._now or any(a for a, _ in changes):
            stale: BoolArray = np.ones(num_partitions, dtype=bool)
            self._parts = num_partitions
            self._digests = np.zeros(num_partitions, dtype=np.uint64)
            self._counts = np.zeros(num_partitions, dtype=np.uint32)
            self._until = np.full(num_partitions, _NEVER, dtype=np.int64)
        else:
            stale = self._until <= now_ms
            for _, hashes in changes:
                if hashes.size:
                    stale[(hashes % p).astype(np.intp)] = True
        self._now = now_ms
        if stale.any():
            self._recompute(tables, stale, p, now_ms)
        return self._digests.copy(), self._counts.copy()

    def _recompute(
        self,
        tables: tuple[FamilyTable, FamilyTable],
        stale: BoolArray,
        p: np.uint64,
        now_ms: int,
    ) -> None:
        n = len(stale)
        digests = np.zeros(n, dtype=np.uint64)
        counts = np.zeros(n, dtype=np.uint32)
        until = np.full(n, _NEVER, dtype=np.int64)
        every = bool(stale.all())
        for t in tables:
            for start in range(0, t.high, _SCAN_CHUNK):
                rows = t.unexpired(start, min(t.high, start + _SCAN_CHUNK), now_ms)
                if not rows.size:
                    continue
                h = t.entries["hash"][rows]
                parts = (h % p).astype(np.intp)
                if not every:
                    keep = stale[parts]
                    rows, h, parts = rows[keep], h[keep], parts[keep]
                    if not rows.size:
                        continue
                recs = t.results(rows)
                d, c = digest.partition_sums(parts, digest.record_fingerprints(h, recs), n)
                digests += d  # wraps mod 2**64, like the sum itself
                counts += c
                np.minimum.at(until, parts, recs["expiry_ms"])
        self._digests[stale] = digests[stale]
        self._counts[stale] = counts[stale]
        self._until[stale] = until[stale]
        self.recomputed += int(np.count_nonzero(stale))
