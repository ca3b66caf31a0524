"""Measure the flow store's memory per record and its batch lookup speed.

    python scripts/measure_memory.py --records 1000000 --family ipv4
    python scripts/measure_memory.py --records 1000000 --family ipv6 --via merge

Inserts N distinct established records (claim + confirm in 1000-key batches, or merge_in),
reads the process RSS from /proc/self/statm before and after, and prints bytes per record
(compare: Redis with TTL 145 B IPv4 / 177 B IPv6, docs/benchmarks.md#baselines), then times lookups
of
random 1000-key batches. Keys are made on the fly from their ordinal, so no key list is
held while measuring.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht.core import wire
from dht.core.record import TCP, HybridClock, State, TtlPolicy
from dht.store.flows import FlowStore, StoreLimits

BATCH = 1000
NOW_MS = 1_700_000_000_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_keys(ids: np.ndarray, family: str) -> tuple[np.ndarray, np.ndarray]:
    """Distinct flow keys from ordinals: 64 client ports per client address."""
    n = len(ids)
    raw = np.zeros((n, wire.KEY_SIZE), dtype=np.uint8)
    raw[:, 0] = wire.KIND_FLOW
    raw[:, 1] = TCP
    host = (ids // 64).astype(">u4").view(np.uint8).reshape(n, 4)
    port = (1024 + ids % 64).astype(">u2").view(np.uint8).reshape(n, 2)
    if family == "ipv4":
        raw[:, 12:14] = raw[:, 30:32] = 0xFF
        raw[:, 14] = 10
        raw[:, 15:18] = host[:, 1:]
        raw[:, 32:36] = (192, 0, 2, 1)
    else:
        raw[:, 2:6] = raw[:, 20:24] = (0x20, 0x01, 0x0D, 0xB8)
        raw[:, 14:18] = host
        raw[:, 35] = 1
    raw[:, 18:20] = port
    raw[:, 36:38] = (1, 187)  # service port 443
    data = raw.tobytes()
    return wire.decode_keys(data, max_keys=n), wire.key_hashes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--family", choices=("ipv4", "ipv6"), default="ipv4")
    ap.add_argument("--via", choices=("confirm", "merge"), default="confirm")
    ap.add_argument("--lookup-batches", type=int, default=500)
    args = ap.parse_args()
    n = args.records

    store = FlowStore(
        TtlPolicy(),
        StoreLimits(max_records=2 * n, hard_max_records=2 * n),
        HybridClock(1000, wall_ms=lambda: NOW_MS),
    )
    proto = wire.new_results(BATCH)
    proto["status"] = wire.Status.OK
    proto["state"] = State.ESTABLISHED
    proto["owner_pop"] = proto["birth_pop"] = proto["generation"] = 1
    proto["birth_hlc"] = NOW_MS << 16
    proto["expiry_ms"] = NOW_MS + 3_600_000
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        keys, hashes = make_keys(np.arange(start, min(n, start + BATCH)), args.family)
        if args.via == "merge":
            store.merge_in(keys, hashes, proto[: len(keys)], NOW_MS)
        else:
            store.claim(keys, hashes, pop=1, server=0, ttl_ms=None, now_ms=NOW_MS)
            store.confirm(keys, hashes, pop=1, server=0, ttl_ms=None, now_ms=NOW_MS)
    elapsed = time.perf_counter() - started
    gc.collect()
    grown = rss_bytes() - before
    assert len(store) == n, (len(store), n)

    rng = np.random.default_rng(1)
    batches = [
        make_keys(rng.integers(0, n, BATCH), args.family) for _ in range(args.lookup_batches)
    ]
    store.lookup(*batches[0], NOW_MS)  # warm-up
    t0 = time.perf_counter_ns()
    for keys, hashes in batches:
        out = store.lookup(keys, hashes, NOW_MS)
    lookup_ns = (time.perf_counter_ns() - t0) / (len(batches) * BATCH)
    assert (out["status"] == wire.Status.OK).all()

    print(f"family={args.family} records={n} via={args.via}")
    print(f"rss growth: {grown / 2**20:.1f} MiB = {grown / n:.1f} bytes/record")
    print(f"insert: {n / elapsed:,.0f} records/s ({args.via}, {BATCH}-key batches)")
    print(f"lookup: {lookup_ns:.0f} ns/key ({lookup_ns * BATCH / 1000:.0f} us per {BATCH} keys)")


if __name__ == "__main__":
    main()
