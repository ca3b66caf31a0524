"""Big-endian packing of the arrays carried in internal messages (node-to-node and
PoP-to-PoP): the one place that knows their byte layout, used by the sender and the
receiver alike.

    terms        u64 per partition (fencing terms, promises)      ">u8"
    partitions   u16 partition ids                                 ">u2"
    positions    u32 indexes into a batch (kept, superseded)       ">u4"
    digests      u64 per partition (anti-entropy digests)          ">u8"
    counts       u32 per partition (records behind a digest)       ">u4"
    flags        one byte per item, 1 = set; empty = none set       "u1"

Packing converts with ``astype`` (no range check: partition ids fit 16 bits, positions
32); unpacking returns native-endian copies, and refuses a field whose length is not a
whole number of items with InvalidArgument naming it. Pure: numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from dht.core.errors import InvalidArgument
from dht.core.wire import U64Array

IntpArray = npt.NDArray[np.intp]
U32Array = npt.NDArray[np.uint32]


def _whole(raw: bytes, size: int, field: str) -> bytes:
    if len(raw) % size:
        raise InvalidArgument(
            field, f"length {len(raw)} is not a multiple of the {size}-byte item size"
        )
    return raw


def pack_terms(terms: U64Array) -> bytes:
    return terms.astype(">u8").tobytes()


def unpack_terms(raw: bytes, field: str = "terms") -> U64Array:
    return np.frombuffer(_whole(raw, 8, field), dtype=">u8").astype(np.uint64)


def pack_partitions(partitions: npt.NDArray[np.integer[Any]]) -> bytes:
    return partitions.astype(">u2").tobytes()


def unpack_partitions(raw: bytes, field: str = "partitions") -> IntpArray:
    return np.frombuffer(_whole(raw, 2, field), dtype=">u2").astype(np.intp)


def pack_positions(positions: npt.NDArray[np.integer[Any]]) -> bytes:
    return positions.astype(">u4").tobytes()


def unpack_positions(raw: bytes, field: str = "positions") -> IntpArray:
    return np.frombuffer(_whole(raw, 4, field), dtype=">u4").astype(np.intp)


def pack_digests(digests: U64Array) -> bytes:
    return digests.astype(">u8").tobytes()


def unpack_digests(raw: bytes, field: str = "digests") -> U64Array:
    return np.frombuffer(_whole(raw, 8, field), dtype=">u8").astype(np.uint64)


def pack_counts(counts: npt.NDArray[np.integer[Any]]) -> bytes:
    return counts.astype(">u4").tobytes()


def unpack_counts(raw: bytes, field: str = "counts") -> U32Array:
    return np.frombuffer(_whole(raw, 4, field), dtype=">u4").astype(np.uint32)


def pack_flags(flags: npt.NDArray[np.bool_]) -> bytes:
    """Empty when no flag is set (the answer of a node that knows no such flags)."""
    return flags.astype(np.uint8).tobytes() if flags.any() else b""


def unpack_flags(raw: bytes, n: int, field: str) -> npt.NDArray[np.bool_]:
    """``n`` flags; an empty field is all unset."""
    if not raw:
        return np.zeros(n, dtype=bool)
    if len(raw) != n:
        raise InvalidArgument(field, f"{len(raw)} flags for {n} items")
    out: npt.NDArray[np.bool_] = np.frombuffer(raw, dtype=np.uint8) != 0
    return out
