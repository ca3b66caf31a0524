"""``dht bench``: throughput of 1000-key batch lookups through ``dht.client`` against a
local cluster of real node processes. A benchmark, never part of the test suite.

    dht bench --nodes 1 3 --records 200000 --runs 7

For each node count: start a PoP, fill it with established records by batch claims,
then time ``--runs`` rounds of looking every record up in ``--batch``-key batches with
``--in-flight`` batches outstanding; report the median keys/s of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from dht.client import Client
from dht.cluster import LocalCluster, plan
from dht.record import Status
from dht.wire import KEY_DTYPE, KIND_FLOW


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark batch lookups against a local cluster")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 3], help="node counts to measure")
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--in-flight", type=int, default=4, help="batches outstanding at once")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the results here")


def synthetic_keys(n: int, seed: int, start: int = 0) -> bytes:
    """n distinct IPv4 TCP flow keys (client 10.x.y.z:port -> 192.0.2.1:443), ids
    ``start .. start + n`` in an order shuffled by ``seed`` (same ``start``, same set)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, dtype=KEY_DTYPE)
    arr["kind"] = KIND_FLOW
    arr["proto"] = 6
    arr["caddr"][:, 10:12] = 0xFF
    arr["saddr"][:, 10:12] = 0xFF
    arr["saddr"][:, 12:] = (192, 0, 2, 1)
    ids = rng.permutation(n).astype(np.uint64) + np.uint64((1 << 20) + start)
    arr["caddr"][:, 12] = 10
    arr["caddr"][:, 13] = (ids >> np.uint64(16)) & np.uint64(0xFF)
    arr["caddr"][:, 14] = (ids >> np.uint64(8)) & np.uint64(0xFF)
    arr["caddr"][:, 15] = ids & np.uint64(0xFF)
    arr["cport"] = 1024 + (ids >> np.uint64(24)) % np.uint64(60000)
    arr["sport"] = 443
    return arr.tobytes()


async def _fill(client: Client, raw: bytes, batch: int) -> None:
    step = batch * 40
    for off in range(0, len(raw), step * 8):
        parts = [raw[o : o + step] for o in range(off, min(len(raw), off + step * 8), step)]
        res = await asyncio.gather(*(client.flow_packed("Confirm", p, ttl_s=3600) for p in parts))
        for r in res:
            if not np.all(r["status"] == Status.CREATED):
                raise RuntimeError("fill failed: not every record was created")


async def _round(client: Client, batches: list[bytes], in_flight: int) -> float:
    queue = list(batches)
    random.shuffle(queue)

    async def worker() -> None:
        while queue:
            await client.flow_packed("Lookup", queue.pop())

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - t


async def measure(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    raw = synthetic_keys(args.records, args.seed)
    step = args.batch * 40
    batches = [raw[o : o + step] for o in range(0, len(raw), step)]
    cluster = LocalCluster(plan(1, nodes), ["--log-level", "error"])
    async with cluster, Client([cluster.nodes[0].spec.grpc]) as client:
        await _fill(client, raw, args.batch)
        await _round(client, batches, args.in_flight)  # warm-up
        rates = []
        for _ in range(args.runs):
            rates.append(args.records / await _round(client, batches, args.in_flight))
    return {
        "nodes": nodes,
        "records": args.records,
        "batch": args.batch,
        "in_flight": args.in_flight,
        "runs": args.runs,
        "keys_per_s_median": round(statistics.median(rates)),
        "keys_per_s_min": round(min(rates)),
        "keys_per_s_max": round(max(rates)),
    }


async def run_bench(args: argparse.Namespace) -> int:
    results = []
    header = ("nodes", "records", "batch", "in-flight", "median keys/s", "min..max")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 9, 6, 9, 14, 22), strict=True)))
    for n in args.nodes:
        r = await measure(n, args)
        results.append(r)
        spread = f"{r['keys_per_s_min']:,}..{r['keys_per_s_max']:,}"
        print(
            f"{n:>5} {r['records']:>9,} {r['batch']:>6} {r['in_flight']:>9} "
            f"{r['keys_per_s_median']:>14,} {spread:>22}",
            flush=True,
        )
    if args.json:
        text = json.dumps({"bulk_lookup": results}, indent=2) + "\n"
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0
