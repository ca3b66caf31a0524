"""Client affinity records: client prefix -> preferred PoP (docs/protocol.md#client-affinity).

A hint, not an ownership claim: last writer wins by (HLC stamp, PoP id), which is a
total order, so merging copies is commutative, associative and idempotent too. Keyed by
the masked 16-byte prefix. Pure: time is an argument.

There are far fewer client prefixes than flows, so a dict is the simple, adequate layout
here; the compact layout is reserved for flow records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dht.core.digest import partition_sums, record_fingerprints
from dht.core.record import Status
from dht.core.wire import (
    ENTRY_DTYPE,
    EntryArray,
    ResultArray,
    U64Array,
    affinity_keys,
    key_hashes,
    new_results,
)


@dataclass(frozen=True, slots=True)
class Affinity:
    pop: int
    stamp_hlc: int
    expiry_ms: int

    def order(self) -> tuple[int, int]:
        return (self.stamp_hlc, self.pop)


def merge_affinity(a: Affinity, b: Affinity) -> Affinity:
    """Last writer wins; equal stamps (the same write) keep the later expiry."""
    if a.order() != b.order():
        return a if a.order() > b.order() else b
    return a if a.expiry_ms >= b.expiry_ms else b


class AffinityStore:
    """The affinity records of one node. Bounded: a SetAffinity for a prefix not held yet
    is refused per key (REFUSED_FULL) at ``max_records``; copies from replicas and other
    PoPs of prefixes not held are refused past ``hard_max_records``. Both are counted in
    ``refusals`` (``full``, ``hard``); records held are always updated."""

    def __init__(self, max_records: int = 1_000_000, hard_max_records: int = 1_200_000) -> None:
        self._records: dict[bytes, Affinity] = {}
        self._scan: list[bytes] = []
        self._max = max_records
        self._hard_max = max(max_records, hard_max_records)
        self.expirations = 0
        self.refusals: dict[str, int] = {"full": 0, "hard": 0}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, prefixes: npt.NDArray[np.uint8], now_ms: int) -> ResultArray:
        out = new_results(len(prefixes))
        out["status"] = Status.NOT_FOUND
        for i, prefix in enumerate(prefixes):
            rec = self._records.get(prefix.tobytes())
            if rec is not None and rec.expiry_ms > now_ms:
                _put(out, i, rec)
        return out

    def set(
        self, prefixes: npt.NDArray[np.uint8], pop: int, stamp_hlc: int, expiry_ms: int
    ) -> ResultArray:
        out = new_results(len(prefixes))
        new = Affinity(pop, stamp_hlc, expiry_ms)
        for i, prefix in enumerate(prefixes):
            key = prefix.tobytes()
            old = self._records.get(key)
            if old is None and len(self._records) >= self._max:
                out["status"][i] = Status.REFUSED_FULL
                self.refusals["full"] += 1
                continue
            rec = new if old is None else merge_affinity(old, new)
            self._records[key] = rec
            _put(out, i, rec)
        return out

    # ------------------------------------------------------------------ replication

    def copies(self, prefixes: npt.NDArray[np.uint8]) -> ResultArray:
        """Raw stored copies (expired included), for quorum reads."""
        out = new_results(len(prefixes))
        out["status"] = Status.NOT_FOUND
        for i, prefix in enumerate(prefixes):
            rec = self._records.get(prefix.tobytes())
            if rec is not None:
                _put(out, i, rec)
        return out

    def drop_partitions(self, keep: npt.NDArray[np.bool_]) -> int:
        prefixes = np.frombuffer(b"".join(self._records), dtype=np.uint8).reshape(-1, 16)
        if not len(prefixes):
            return 0
        parts = key_hashes(affinity_keys(prefixes)) % np.uint64(len(keep))
        gone = [bytes(k) for k, p in zip(prefixes, parts.tolist(), strict=True) if not keep[p]]
        for k in gone:
            del self._records[k]
        return len(gone)

    def restore(self, prefixes: npt.NDArray[np.uint8], before: ResultArray) -> None:
        """Undo a write: put back the copies :meth:`copies` returned before it."""
        for prefix, rec in zip(prefixes, before, strict=True):
            key = prefix.tobytes()
            if int(rec["status"]) == Status.OK:
                self._records[key] = Affinity(
                    int(rec["owner_pop"]), int(rec["birth_hlc"]), int(rec["expiry_ms"])
                )
            else:
                self._records.pop(key, None)

    def merge_entries(self, entries: EntryArray, now_ms: int, grace_ms: int) -> int:
        """Apply copies (kind-2 entries); dead copies (expired beyond the grace) are
        skipped and dead stored ones replaced; copies of prefixes not held are refused
        (counted in ``refusals["hard"]``) past the hard ceiling. Returns the copies that
        changed a record."""
        applied = 0
        dead_before = now_ms - grace_ms
        for key, rec in zip(entries["key"]["caddr"], entries["rec"], strict=True):
            expiry = int(rec["expiry_ms"])
            if expiry <= dead_before:
                continue
            prefix = key.tobytes()
            new = Affinity(int(rec["owner_pop"]), int(rec["birth_hlc"]), expiry)
            old = self._records.get(prefix)
            if old is None and len(self._records) >= self._hard_max:
                self.refusals["hard"] += 1
                continue
            merged = (
                new if old is None or old.expiry_ms <= dead_before else merge_affinity(old, new)
            )
            if merged != old:
                self._records[prefix] = merged
                applied += 1
        return applied

    def _live(self, now_ms: int) -> tuple[npt.NDArray[np.uint8], ResultArray, U64Array]:
        items = [(k, r) for k, r in self._records.items() if r.expiry_ms > now_ms]
        prefixes = np.frombuffer(b"".join(k for k, _ in items), dtype=np.uint8).reshape(-1, 16)
        recs = new_results(len(items))
        for i, (_, r) in enumerate(items):
            _put(recs, i, r)
        hashes = key_hashes(affinity_keys(prefixes))
        return prefixes, recs, hashes

    def partition_digests(
        self, num_partitions: int, now_ms: int
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        _, recs, hashes = self._live(now_ms)
        return partition_sums(
            hashes % np.uint64(num_partitions), record_fingerprints(hashes, recs), num_partitions
        )

    def export_entries(
        self, partitions: npt.NDArray[np.intp] | None, num_partitions: int, now_ms: int
    ) -> EntryArray:
        prefixes, recs, hashes = self._live(now_ms)
        if partitions is not None:
            keep = np.isin(hashes % np.uint64(num_partitions), partitions.astype(np.uint64))
            prefixes, recs = prefixes[keep], recs[keep]
        out = np.zeros(len(recs), dtype=ENTRY_DTYPE)
        out["key"] = np.frombuffer(affinity_keys(prefixes), dtype=ENTRY_DTYPE["key"])
        out["rec"] = recs
        return out

    def purge_expired(self, now_ms: int, budget: int) -> int:
        """Remove expired records among the next ``budget`` keys of a rotating scan."""
        if not self._scan:
            self._scan = list(self._records)  # a C-level copy of the keys, not a scan
        batch, self._scan = self._scan[-budget:], self._scan[:-budget]
        removed = 0
        for key in batch:
            rec = self._records.get(key)
            if rec is not None and rec.expiry_ms <= now_ms:
                del self._records[key]
                removed += 1
        self.expirations += removed
        return removed


def _put(out: ResultArray, i: int, rec: Affinity) -> None:
    row = out[i]
    row["status"] = Status.OK
    row["owner_pop"] = rec.pop
    row["birth_pop"] = rec.pop
    row["birth_hlc"] = rec.stamp_hlc
    row["expiry_ms"] = rec.expiry_ms
