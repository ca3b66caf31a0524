"""Synthetic flow keys for benchmarks and tests, and their Redis counterparts."""

from __future__ import annotations

import numpy as np

from dht.core.wire import KEY_DTYPE, KEY_SIZE, KIND_FLOW

# Where each family's compact key lives in the 40-byte record (the store's layout, so a
# Redis key holds exactly the bytes a record's identity needs): proto, client address,
# client port, service address, service port = 13 bytes (IPv4) / 37 bytes (IPv6).
_V4_BYTES = np.array([1, *range(14, 20), *range(32, 38)], dtype=np.intp)
_V6_BYTES = np.arange(1, 38, dtype=np.intp)


def synthetic_keys(n: int, seed: int, start: int = 0, family: str = "ipv4") -> bytes:
    """n distinct TCP flow keys, ids ``start .. start + n`` in an order shuffled by
    ``seed`` (same ``start``, same set). IPv4: client 10.x.y.z:port -> 192.0.2.1:443;
    IPv6: client 2001:db8:<id>::<id>, one /64 per client -> 2001:db8::1 port 443."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, dtype=KEY_DTYPE)
    arr["kind"] = KIND_FLOW
    arr["proto"] = 6
    ids = rng.permutation(n).astype(np.uint64) + np.uint64((1 << 20) + start)
    id_bytes = ids.astype(">u4").view(np.uint8).reshape(n, 4)
    if family == "ipv4":
        arr["caddr"][:, 10:12] = 0xFF
        arr["saddr"][:, 10:12] = 0xFF
        arr["saddr"][:, 12:] = (192, 0, 2, 1)
        arr["caddr"][:, 12] = 10
        arr["caddr"][:, 13:16] = id_bytes[:, 1:]
        arr["cport"] = 1024 + (ids >> np.uint64(24)) % np.uint64(60000)
    elif family == "ipv6":
        arr["caddr"][:, :4] = arr["saddr"][:, :4] = (0x20, 0x01, 0x0D, 0xB8)
        # Each client in its own /64, as a home or a phone is: the embryonic quota is per
        # /64 (docs/protocol.md#capacity-and-quota) and counts records confirms create.
        arr["caddr"][:, 4:8] = id_bytes
        arr["caddr"][:, 12:16] = id_bytes
        arr["saddr"][:, 15] = 1
        arr["cport"] = 1024 + ids % np.uint64(60000)
    else:
        raise ValueError(f"family {family!r}: want ipv4 or ipv6")
    arr["sport"] = 443
    return arr.tobytes()


def redis_keys(raw: bytes) -> list[bytes]:
    """The compact binary key of each 40-byte record (13 bytes IPv4, 37 bytes IPv6):
    what a Redis user would store, so Redis is not charged for the padding of our wire
    format."""
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE)
    v4 = bool(rows.size) and bool(rows[0, 12] == 0xFF and not rows[0, 2:12].any())
    compact = np.ascontiguousarray(rows[:, _V4_BYTES if v4 else _V6_BYTES])
    width = compact.shape[1]
    out: list[bytes] = compact.view(f"S{width}").ravel().tolist()
    # numpy's S dtype strips trailing NUL bytes: put them back (keys are fixed width).
    return [k.ljust(width, b"\0") for k in out]


def batches(raw: bytes, batch: int) -> list[bytes]:
    step = batch * KEY_SIZE
    return [raw[o : o + step] for o in range(0, len(raw), step)]
