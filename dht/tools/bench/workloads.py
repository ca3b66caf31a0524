"""The workloads of ``dht bench``, each run against this project and against Redis,
interleaved (A, B, A, B ...) so both sides see the same machine noise.

Fairness rules (docs/benchmarks.md): the same number of requests in flight on both sides; no client
cache (dht.client.client has none); on the Redis side the faster of redis-py's sync and asyncio
clients, both with hiredis; memory as process RSS growth on both sides. Every function
returns a plain dict (JSON-able) with both sides' medians and the ratio.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio as aredis

from dht.client import Client
from dht.core.placement import Member, PartitionMap
from dht.core.record import Status
from dht.core.wire import KEY_SIZE, key_hash, key_hashes
from dht.edge.udp import UdpLookupClient
from dht.tools.bench.keys import batches, redis_keys, synthetic_keys
from dht.tools.bench.procs import RedisServer, rss_bytes
from dht.tools.cluster import LocalCluster, plan

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

# A Redis user's record: owner PoP, server, state, generation, birth stamp, packed.
REDIS_VALUE = b"\x00\x01\x00\x00\x02\x00\x00\x00\x01" + b"\x00" * 7
FILL_TTL_S = 3600
# uvloop when installed (the 'fast' extra): the UDP lookup's latency halves with it.
NODE_ARGS = ["--log-level", "error", "--event-loop", "uvloop" if HAVE_UVLOOP else "asyncio"]
CLAIM_TTL_S = 10  # the embryonic TTL (docs/protocol.md#time-to-live), on both sides
# Server-side loop: fills Redis ~10x faster than a client pipeline (not measured).
_FILL_LUA = "for i=1,#KEYS do redis.call('SET',KEYS[i],ARGV[1],'EX',ARGV[2]) end return #KEYS"


@dataclass(frozen=True)
class Settings:
    records: int  # bulk lookup and IPv4/IPv6 memory
    runs: int  # interleaved rounds per workload
    round_keys: int  # keys looked up per bulk round
    claim_keys: int  # fresh keys claimed per claims round
    miss_samples: int  # per side, UDP and Redis GET
    grpc_miss_samples: int  # the gRPC single-key path, for reference
    growth_sizes: tuple[int, ...]
    syn_samples: int = 150  # single-key calls per path and round (the connection path)
    batch: int = 1000
    in_flight: int = 4
    seed: int = 1


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


async def dht_fill(client: Client, raw: bytes, batch: int, in_flight: int) -> None:
    """Established records (Confirm creates them) with a 1 h TTL."""
    parts = batches(raw, batch)
    for i in range(0, len(parts), in_flight):
        res = await asyncio.gather(
            *(client.flow_packed("Confirm", p, ttl_s=FILL_TTL_S) for p in parts[i : i + in_flight])
        )
        for r in res:
            if not np.all(r["status"] == Status.CREATED):
                raise RuntimeError("fill failed: not every record was created")


def redis_fill(r: redis.Redis, keys: list[bytes], ttl_s: int = FILL_TTL_S) -> None:
    sha = r.script_load(_FILL_LUA)
    for i in range(0, len(keys), 10_000):
        chunk = keys[i : i + 10_000]
        r.evalsha(sha, len(chunk), *chunk, REDIS_VALUE, ttl_s)


async def workers(items: list[Any], in_flight: int, work: Callable[[Any], Awaitable[None]]) -> None:
    queue = list(items)

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def _timed(coro: Awaitable[None]) -> float:
    t = time.perf_counter()
    await coro
    return time.perf_counter() - t


def _sync_timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _versus(
    name: str, setup: str, unit: str, ours: float, theirs: float, ratio: float, goal: str,
    met: bool, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "workload": name, "setup": setup, "unit": unit, "dht": ours, "redis": theirs,
        "ratio": round(ratio, 3), "goal": goal, "met": met, **extra,
    }  # fmt: skip


# --------------------------------------------------------------------------- bulk lookup


async def bulk_lookup(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """1000-key batch lookups on a 1-node PoP vs MGET on one Redis, ``s.records`` IPv4
    records on each; also yields both sides' memory per IPv4 record (RSS growth)."""
    raw = synthetic_keys(s.records, s.seed)
    rkeys = redis_keys(raw)
    dht_batches = batches(raw, s.batch)
    r_batches = [rkeys[i : i + s.batch] for i in range(0, len(rkeys), s.batch)]
    per_round = max(1, min(len(dht_batches), s.round_keys // s.batch))
    cluster = LocalCluster(plan(1, 1), [*NODE_ARGS, "--max-records", str(2 * s.records)])
    async with RedisServer() as rs, cluster, Client([cluster.nodes[0].spec.grpc]) as client:
        node_pid = cluster.nodes[0].pid
        rsync = redis.Redis(port=rs.port)
        rasync = aredis.Redis(port=rs.port, max_connections=2 * s.in_flight)
        try:
            log(f"bulk: filling {s.records:,} records on each side")
            rss0 = rss_bytes(node_pid), rss_bytes(rs.pid)
            await dht_fill(client, raw, s.batch, s.in_flight)
            await asyncio.to_thread(redis_fill, rsync, rkeys)
            rss1 = rss_bytes(node_pid), rss_bytes(rs.pid)
            got = rsync.mget(r_batches[0])
            if any(v is None for v in got):
                raise RuntimeError("redis fill failed")

            async def ours(idx: list[int]) -> None:
                async def one(i: int) -> None:
                    res = await client.flow_packed("Lookup", dht_batches[i])
                    if not np.all(res["status"] == Status.OK):
                        raise RuntimeError("dht lookup missed a stored key")

                await workers(idx, s.in_flight, one)

            def theirs_sync(idx: list[int]) -> None:
                for j in range(0, len(idx), s.in_flight):
                    pipe = rsync.pipeline(transaction=False)
                    for i in idx[j : j + s.in_flight]:
                        pipe.mget(r_batches[i])
                    pipe.execute()

            async def theirs_async(idx: list[int]) -> None:
                async def one(i: int) -> None:
                    await rasync.mget(r_batches[i])

                await workers(idx, s.in_flight, one)

            rng = random.Random(s.seed)
            ours_rate, sync_rate, async_rate = [], [], []
            for rnd in range(s.runs + 1):  # round 0 warms up
                idx = rng.sample(range(len(dht_batches)), per_round)
                n = sum(len(dht_batches[i]) // KEY_SIZE for i in idx)
                a = n / await _timed(ours(idx))
                b = n / await asyncio.to_thread(_sync_timed, functools.partial(theirs_sync, idx))
                c = n / await _timed(theirs_async(idx))
                if rnd:
                    ours_rate.append(a)
                    sync_rate.append(b)
                    async_rate.append(c)
        finally:
            rsync.close()
            await rasync.aclose()
    o, rs_, ra = _median(ours_rate), _median(sync_rate), _median(async_rate)
    best, which = (rs_, "sync pipeline") if rs_ >= ra else (ra, "asyncio")
    ratio = o / best
    v4_dht = (rss1[0] - rss0[0]) / s.records
    v4_redis = (rss1[1] - rss0[1]) / s.records
    return [
        _versus(
            "bulk lookup",
            f"1 node vs 1 redis, {s.records:,} IPv4 records, {s.batch}-key batches, "
            f"{s.in_flight} in flight",
            "keys/s",
            round(o),
            round(best),
            ratio,
            ">= 1.5",
            ratio >= 1.5,
            key="bulk_lookup_vs_redis_mget",
            redis_client=which,
            redis_sync=round(rs_),
            redis_async=round(ra),
            dht_min=round(min(ours_rate)),
            dht_max=round(max(ours_rate)),
        ),
        _memory_row("ipv4", s.records, v4_dht, v4_redis, 0.7),
    ]


def _memory_row(family: str, n: int, ours: float, theirs: float, goal: float) -> dict[str, Any]:
    ratio = ours / theirs
    return _versus(
        f"memory/record {family}",
        f"1 node (1 replica) vs 1 redis with TTLs, {n:,} records, 16-byte redis value, RSS growth",
        "bytes", round(ours, 1), round(theirs, 1), ratio, f"<= {goal}", ratio <= goal,
        key=f"memory_vs_redis_ttl_{family}",
    )  # fmt: skip


async def memory(s: Settings, family: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Fresh processes on both sides; RSS growth per record after ``s.records``."""
    raw = synthetic_keys(s.records, s.seed, family=family)
    rkeys = redis_keys(raw)
    log(f"memory {family}: filling {s.records:,} records on each side")
    cluster = LocalCluster(plan(1, 1), [*NODE_ARGS, "--max-records", str(2 * s.records)])
    async with RedisServer() as rs, cluster, Client([cluster.nodes[0].spec.grpc]) as client:
        pid = cluster.nodes[0].pid
        rsync = redis.Redis(port=rs.port)
        try:
            rss0 = rss_bytes(pid), rss_bytes(rs.pid)
            await dht_fill(client, raw, s.batch, s.in_flight)
            await asyncio.to_thread(redis_fill, rsync, rkeys)
            rss1 = rss_bytes(pid), rss_bytes(rs.pid)
        finally:
            rsync.close()
    goal = 0.7 if family == "ipv4" else 0.8
    return _memory_row(
        family, s.records, (rss1[0] - rss0[0]) / s.records, (rss1[1] - rss0[1]) / s.records, goal
    )


# --------------------------------------------------------------------------- claims + misses


async def claims_and_misses(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """On a 3-node PoP (rf 3, W 2, UDP lookup listener on): batches of create-once claims
    vs pipelined SET NX GET EX; then single-key miss latency, 1 in flight."""
    cluster = LocalCluster(plan(1, 3), [*NODE_ARGS, "--udp-lookup-port", "0"])
    async with RedisServer() as rs, cluster, Client([n.spec.grpc for n in cluster.nodes]) as client:
        rsync = redis.Redis(port=rs.port)
        rasync = aredis.Redis(port=rs.port, max_connections=2 * s.in_flight)
        try:
            rows = [await _claims(s, client, rsync, rasync, log)]
            rows += await _misses(s, client, rsync, log)
        finally:
            rsync.close()
            await rasync.aclose()
    return rows


async def _claims(
    s: Settings, client: Client, rsync: redis.Redis, rasync: aredis.Redis,
    log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    log(f"claims: {s.runs} rounds of {s.claim_keys:,} fresh keys per side")

    async def ours(raw: bytes) -> None:
        async def one(b: bytes) -> None:
            res = await client.flow_packed("Claim", b, pop="ams", ttl_s=CLAIM_TTL_S)
            if not np.all(res["status"] == Status.CREATED):
                raise RuntimeError(f"claims not created: {np.bincount(res['status'])}")

        await workers(batches(raw, s.batch), s.in_flight, one)

    def theirs_sync(keys: list[bytes]) -> None:
        step = s.batch * s.in_flight
        for j in range(0, len(keys), step):
            pipe = rsync.pipeline(transaction=False)
            for k in keys[j : j + step]:
                pipe.set(k, REDIS_VALUE, nx=True, get=True, ex=CLAIM_TTL_S)
            if any(v is not None for v in pipe.execute()):
                raise RuntimeError("redis: a fresh key already existed")

    async def theirs_async(keys: list[bytes]) -> None:
        async def one(chunk: list[bytes]) -> None:
            async with rasync.pipeline(transaction=False) as pipe:
                for k in chunk:
                    pipe.set(k, REDIS_VALUE, nx=True, get=True, ex=CLAIM_TTL_S)
                await pipe.execute()

        chunks = [keys[i : i + s.batch] for i in range(0, len(keys), s.batch)]
        await workers(chunks, s.in_flight, one)

    n = s.claim_keys
    ours_rate, sync_rate, async_rate = [], [], []
    for rnd in range(s.runs + 1):  # round 0 warms up
        base = 10_000_000 + rnd * 3 * n
        raw = synthetic_keys(n, s.seed + rnd, start=base)
        a = n / await _timed(ours(raw))
        k_sync = redis_keys(synthetic_keys(n, s.seed + rnd, start=base + n))
        b = n / await asyncio.to_thread(_sync_timed, functools.partial(theirs_sync, k_sync))
        c = n / await _timed(
            theirs_async(redis_keys(synthetic_keys(n, s.seed, start=base + 2 * n)))
        )
        if rnd:
            ours_rate.append(a)
            sync_rate.append(b)
            async_rate.append(c)
    o, rs_, ra = _median(ours_rate), _median(sync_rate), _median(async_rate)
    best, which = (rs_, "sync pipeline") if rs_ >= ra else (ra, "asyncio")
    ratio = o / best
    return _versus(
        "claims",
        f"3 nodes rf 3 W 2 vs 1 redis SET NX GET EX, {s.batch}-key batches, "
        f"{s.in_flight} in flight, fresh keys, no cross-PoP shipping",
        "keys/s", round(o), round(best), ratio, ">= 1.0", ratio >= 1.0,
        key="claims_vs_redis_setnx", redis_client=which,
        redis_sync=round(rs_), redis_async=round(ra),
    )  # fmt: skip


async def _misses(
    s: Settings, client: Client, rsync: redis.Redis, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    log(f"misses: {s.miss_samples:,} single-key lookups per side, 1 in flight")
    raw = synthetic_keys(s.miss_samples, s.seed, start=40_000_000)
    keys = [raw[o : o + KEY_SIZE] for o in range(0, len(raw), KEY_SIZE)]
    rkeys = redis_keys(raw)
    udp = UdpLookupClient(client.table)
    block = 500

    def udp_block(ks: list[bytes]) -> list[float]:
        out = []
        for k in ks:
            t = time.perf_counter_ns()
            res = udp.lookup_one(k)
            out.append((time.perf_counter_ns() - t) / 1000)
            if res[0] != Status.NOT_FOUND:
                raise RuntimeError("a miss was found")
        return out

    def redis_block(ks: list[bytes]) -> list[float]:
        out = []
        for k in ks:
            t = time.perf_counter_ns()
            if rsync.get(k) is not None:
                raise RuntimeError("a miss was found")
            out.append((time.perf_counter_ns() - t) / 1000)
        return out

    async def grpc_block(ks: list[bytes]) -> list[float]:
        out = []
        for k in ks:
            t = time.perf_counter_ns()
            await client.flow_packed("Lookup", k)
            out.append((time.perf_counter_ns() - t) / 1000)
        return out

    try:
        await asyncio.to_thread(udp_block, keys[:block])  # warm-up
        await asyncio.to_thread(redis_block, rkeys[:block])
        await grpc_block(keys[:100])
        lat_udp: list[float] = []
        lat_redis: list[float] = []
        lat_grpc: list[float] = []
        grpc_every = max(1, s.miss_samples // max(1, s.grpc_miss_samples))
        for i in range(0, len(keys), block):
            lat_udp += await asyncio.to_thread(udp_block, keys[i : i + block])
            lat_redis += await asyncio.to_thread(redis_block, rkeys[i : i + block])
            lat_grpc += await grpc_block(keys[i : i + block : grpc_every])
    finally:
        udp.close()
    p99 = _pct(lat_udp, 99) / _pct(lat_redis, 99)
    setup = "3 nodes rf 3 vs 1 redis, keys never stored, 1 in flight, interleaved blocks"
    return [
        _versus(
            "miss p99 (UDP lookup)", setup, "us", round(_pct(lat_udp, 99), 1),
            round(_pct(lat_redis, 99), 1), p99, "<= 2.0", p99 <= 2.0,
            key="miss_p99_vs_redis_get", samples=len(lat_udp),
            dht_p50=round(_pct(lat_udp, 50), 1), redis_p50=round(_pct(lat_redis, 50), 1),
            redis_client="sync (one request in flight: asyncio only adds a loop turn)",
        ),
        _versus(
            "miss p50 (UDP lookup)", setup, "us", round(_pct(lat_udp, 50), 1),
            round(_pct(lat_redis, 50), 1), _pct(lat_udp, 50) / _pct(lat_redis, 50), "-", True,
        ),
        _versus(
            "miss p99 (gRPC, reference)", setup + f", {len(lat_grpc):,} samples", "us",
            round(_pct(lat_grpc, 99), 1), round(_pct(lat_redis, 99), 1),
            _pct(lat_grpc, 99) / _pct(lat_redis, 99), "-", True,
            dht_p50=round(_pct(lat_grpc, 50), 1),
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------- routing


def routing(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Key -> owner node, per key: our partition table (one xxh3 + one array index) vs
    uhashring get_node (md5 ketama ring), 3 nodes, in process."""
    from uhashring import HashRing

    log("routing: key -> node, per key")
    n = 100_000
    raw = synthetic_keys(n, s.seed)
    keys = [raw[o : o + KEY_SIZE] for o in range(0, len(raw), KEY_SIZE)]
    parts = batches(raw, s.batch)
    members = [Member(f"n{i}", f"127.0.0.1:{7000 + i}") for i in range(3)]
    table = PartitionMap.build(members)
    ring = HashRing(nodes=[m.node_id for m in members])

    def scalar() -> None:
        for k in keys:
            table.primary_of(key_hash(k))

    def batch() -> None:
        for b in parts:
            table.primaries[table.partitions_of(key_hashes(b))]

    def theirs() -> None:
        for k in keys:
            ring.get_node(k)

    t_scalar, t_batch, t_ring = [], [], []
    for rnd in range(s.runs + 1):
        a, b, c = _sync_timed(scalar), _sync_timed(batch), _sync_timed(theirs)
        if rnd:
            t_scalar.append(a * 1e9 / n)
            t_batch.append(b * 1e9 / n)
            t_ring.append(c * 1e9 / n)
    ours, ring_ns = _median(t_scalar), _median(t_ring)
    ratio = ours / ring_ns
    return [
        _versus(
            "routing (one key)", "3 nodes, 4096 partitions vs uhashring get_node (defaults)",
            "ns/key", round(ours), round(ring_ns), ratio, "<= 0.3", ratio <= 0.3,
            key="routing_vs_uhashring",
        ),
        _versus(
            "routing (1000-key batch)", "the client's path: vectorised over a batch",
            "ns/key", round(_median(t_batch)), round(ring_ns), _median(t_batch) / ring_ns,
            "-", True,
        ),
    ]  # fmt: skip
