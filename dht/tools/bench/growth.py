"""Growth: per-key cost of batch lookups (through dht.client.client and gRPC) and memory per
record as one node fills to 10k, 100k, 1M and 5M records; and a plot of both."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dht.client import Client
from dht.core.record import Status
from dht.tools.bench.keys import batches, synthetic_keys
from dht.tools.bench.procs import rss_bytes
from dht.tools.bench.workloads import NODE_ARGS, Settings, dht_fill, workers
from dht.tools.cluster import LocalCluster, plan


async def growth(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    sizes = sorted(s.growth_sizes)
    top = sizes[-1]
    rows: list[dict[str, Any]] = []
    cluster = LocalCluster(plan(1, 1), [*NODE_ARGS, "--max-records", str(top)])
    async with cluster, Client([cluster.nodes[0].spec.grpc]) as client:
        pid = cluster.nodes[0].pid
        rss0 = rss_bytes(pid)
        filled = 0
        for size in sizes:
            log(f"growth: filling to {size:,} records")
            for start in range(filled, size, 500_000):  # bounded chunks of keys in memory
                n = min(500_000, size - start)
                await dht_fill(client, synthetic_keys(n, s.seed, start=start), s.batch, s.in_flight)
            filled = size
            grown = rss_bytes(pid) - rss0
            per_key = await _lookup_ns(client, size, s)
            rows.append(
                {
                    "records": size,
                    "bytes_per_record": round(grown / size, 1),
                    "lookup_ns_per_key": round(per_key, 1),
                }
            )
            log(f"  {size:>9,} records: {grown / size:6.1f} B/record, {per_key:6.0f} ns/key")
    return rows


async def _lookup_ns(client: Client, size: int, s: Settings) -> float:
    """Median over rounds of random 1000-key batches drawn from all stored records."""
    sample = 200_000  # the same work at every size: fixed costs weigh the same
    rounds = []
    for rnd in range(s.runs + 1):
        # Random stored keys: a permutation of all stored ids, cut or repeated to size.
        perm = synthetic_keys(size, s.seed + 100 + rnd)
        raw = (perm * (sample // size + 1))[: sample * 40]
        t = time.perf_counter()
        await workers(batches(raw, s.batch), s.in_flight, functools.partial(_lookup, client))
        if rnd:
            rounds.append((time.perf_counter() - t) * 1e9 / sample)
    return float(statistics.median(rounds))


async def _lookup(client: Client, raw: bytes) -> None:
    res = await client.flow_packed("Lookup", raw)
    if not np.all(res["status"] == Status.OK):
        raise RuntimeError("growth: a stored key was not found")


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Two panels, log-scale record counts: ns/key of batch lookups, bytes per record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["records"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r["lookup_ns_per_key"] for r in rows], marker="o")
    a.set_xscale("log")
    a.set_xlabel("records on the node")
    a.set_ylabel("ns per key")
    a.set_title("batch lookup cost (1000-key batches, gRPC, 4 in flight)")
    a.set_ylim(bottom=0)
    b.plot(n, [r["bytes_per_record"] for r in rows], marker="o", color="tab:green")
    b.set_xscale("log")
    b.set_xlabel("records on the node")
    b.set_ylabel("bytes per record (RSS growth)")
    b.set_title("memory per record (IPv4 keys)")
    b.set_ylim(bottom=0)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
