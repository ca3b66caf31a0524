"""Client affinity records: client prefix -> preferred PoP (DESIGN sections 1 and 7).

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

from dht.record import Status
from dht.wire import ResultArray, new_results


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
    def __init__(self) -> None:
        self._records: dict[bytes, Affinity] = {}
        self._scan: list[bytes] = []
        self.expirations = 0

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
            rec = new if old is None else merge_affinity(old, new)
            self._records[key] = rec
            _put(out, i, rec)
        return out

    def merge_in(self, prefix: bytes, rec: Affinity) -> Affinity:
        old = self._records.get(prefix)
        merged = rec if old is None else merge_affinity(old, rec)
        self._records[prefix] = merged
        return merged

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
