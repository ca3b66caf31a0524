"""Per-partition digests for anti-entropy: an order-independent fingerprint of the record
copies a node holds in each partition (docs/protocol.md#keys-and-partitions: partitions are the
unit of digests and anti-entropy).

digest(p) = sum over records r in p of mix(r) mod 2**64, where mix hashes the key's hash
with every record field. A sum is order-independent and incremental; two replicas holding
the same merged copies have the same digests, and any field that differs (a later expiry,
a released state, another birth) changes the sum with overwhelming probability.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dht.core.wire import ResultArray, U64Array

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: U64Array) -> U64Array:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def record_fingerprints(hashes: U64Array, recs: ResultArray) -> U64Array:
    """One 64-bit fingerprint per (key hash, record copy); ``recs`` in RESULT_DTYPE."""
    with np.errstate(over="ignore"):
        small = (
            recs["state"].astype(np.uint64)
            | (recs["owner_pop"].astype(np.uint64) << np.uint64(8))
            | (recs["owner_server"].astype(np.uint64) << np.uint64(24))
            | (recs["birth_pop"].astype(np.uint64) << np.uint64(40))
        )
        h = _mix(hashes.astype(np.uint64) ^ _GOLDEN)
        h = _mix(h ^ recs["birth_hlc"].astype(np.uint64))
        h = _mix(h ^ recs["expiry_ms"].astype(np.uint64))
        h = _mix(h ^ small ^ (recs["generation"].astype(np.uint64) << np.uint64(56)))
        return h


def partition_sums(
    partitions: npt.NDArray[np.integer], fingerprints: U64Array, num_partitions: int
) -> tuple[U64Array, npt.NDArray[np.uint32]]:
    """(digest, record count) per partition."""
    digests = np.zeros(num_partitions, dtype=np.uint64)
    np.add.at(digests, partitions.astype(np.intp), fingerprints)
    counts = np.bincount(partitions.astype(np.intp), minlength=num_partitions).astype(np.uint32)
    return digests, counts
