"""The connection path (``dht bench --only syn``): what one packet of a connection waits
for on a forwarder's cache miss, one key at a time (latency, not throughput), side by
side with Redis, rounds interleaved (round 0 warms up).

Two PoPs, A ("ams") and B ("fra"), of 3 nodes each (rf 3, W 2, as in the claims
workload), and one redis-server, all on loopback: the round trip between the PoPs is a
loopback one (~0), where a WAN adds its RTT to the second chance. Plaintext, as every
default workload. Each round, on fresh keys (a cold cache for every key):

* **SYN path**: ``Forwarder.handle(key, Packet.SYN)`` at A: one Claim that names the owner
  (docs/protocol.md#decision-table); the answer must be SERVE. Measured with the
  forwarder's micro-batch window off (one packet in flight: a window only adds delay)
  and with its default (2 ms). Also the path before one call (a Lookup, then a Claim,
  through ``dht.client.Client``) and one Claim through the client alone (no forwarder).
  Redis: ``SET key value NX GET PX 10000`` (a create-once claim that returns the
  existing owner, as the claims workload does).
* **second chance**: keys claimed at B (embryonic claims are never shipped, so A's
  table does not know them); ``handle(key, Packet.DATA)`` at A asks B
  (docs/protocol.md#second-chance) and must answer TUNNEL to B: other answers are counted
  and reported, not raised. Window off and default, as above. Redis: ``GET`` of a key
  stored with an hour's TTL.
* **plain miss**: ``handle(key, Packet.DATA)`` at A for a flow confirmed at A (a cache
  miss the local table answers); must be SERVE. Redis: the same ``GET``.

Before the rounds every partition of both PoPs is written once: a coordinator's first
write to a partition pays a promise round (dht.node.replication), which is start-up
cost, not the SYN path's. The table's figures are medians over rounds of each round's
p50 and p99 (``samples_per_round`` single-key calls per path); the pooled percentiles of
all samples are in ``--json`` too.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from dht.client import Client, Forwarder
from dht.client.decision import Action, Packet
from dht.client.forwarder import ForwarderConfig, Outcome
from dht.core.record import Status
from dht.core.wire import KEY_SIZE
from dht.tools.bench.keys import batches, redis_keys, synthetic_keys
from dht.tools.bench.procs import RedisServer
from dht.tools.bench.workloads import (
    NODE_ARGS,
    REDIS_VALUE,
    Settings,
    _versus,
    redis_fill,
    workers,
)
from dht.tools.cluster import LocalCluster, plan

NODES_PER_POP = 3
REDIS_CLAIM_PX = 10_000  # the embryonic TTL (docs/protocol.md#time-to-live), in ms
# Keys claimed at each PoP before the rounds so that every one of the 4096 partitions
# has been written once (missing one at 40k random keys: about e^-10 per partition).
WARM_KEYS = 40_000


@dataclass(frozen=True)
class Summary:
    """Latencies of one path over the rounds, in microseconds."""

    p50: float  # median over rounds of each round's p50
    p99: float  # median over rounds of each round's p99
    pooled_p50: float  # over all samples of all rounds
    pooled_p99: float
    p99_min: float  # the spread of the rounds' p99
    p99_max: float
    samples: int


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between samples (numpy's default)."""
    if not xs:
        raise ValueError("no samples")
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def summarize(rounds: Sequence[Sequence[float]]) -> Summary:
    """One path's samples, a list per round, as medians of per-round percentiles."""
    if not rounds or not all(rounds):
        raise ValueError("every round needs samples")
    p50s = [percentile(r, 50) for r in rounds]
    p99s = [percentile(r, 99) for r in rounds]
    pooled = [x for r in rounds for x in r]
    return Summary(
        p50=float(statistics.median(p50s)),
        p99=float(statistics.median(p99s)),
        pooled_p50=percentile(pooled, 50),
        pooled_p99=percentile(pooled, 99),
        p99_min=min(p99s),
        p99_max=max(p99s),
        samples=len(pooled),
    )


def latency_rows(
    name: str, key: str, setup: str, ours: Summary, theirs: Summary, note: str = "",
    **extra: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """A p50 row and a p99 row, dht vs Redis, in us; no stated goal ("report"). ``note``
    (printed under the table) goes on the first row only."""
    rows = []
    for q in ("p50", "p99"):
        o, t = getattr(ours, q), getattr(theirs, q)
        rows.append(
            _versus(
                f"{name} {q}", setup, "us", round(o, 1), round(t, 1), o / t, "report", True,
                key=f"{key}_{q}", samples=ours.samples, redis_samples=theirs.samples,
                pooled=round(getattr(ours, f"pooled_{q}"), 1),
                redis_pooled=round(getattr(theirs, f"pooled_{q}"), 1),
                **({"p99_min": round(ours.p99_min, 1), "p99_max": round(ours.p99_max, 1)}
                   if q == "p99" else {}),
                **extra,
            )
        )  # fmt: skip
    if note:
        rows[0]["note"] = f"{name}: {note}"
    return rows


def mismatch_note(wrong: int, total: int, want: str) -> str:
    return f"{wrong:,} of {total:,} answers were not {want}"


# --------------------------------------------------------------------------- timing


async def _each(
    keys: Sequence[bytes], call: Callable[[bytes], Awaitable[Any]], ok: Callable[[Any], bool]
) -> tuple[list[float], int]:
    """One call per key, one in flight: latencies (us) and how many answers were not ok."""
    out: list[float] = []
    wrong = 0
    for k in keys:
        t = time.perf_counter_ns()
        res = await call(k)
        out.append((time.perf_counter_ns() - t) / 1000)
        wrong += not ok(res)
    return out, wrong


def _redis_each(keys: Sequence[bytes], call: Callable[[bytes], Any]) -> list[float]:
    out: list[float] = []
    for k in keys:
        t = time.perf_counter_ns()
        call(k)
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def _packet(fw: Forwarder, packet: Packet) -> Callable[[bytes], Awaitable[Outcome]]:
    async def call(k: bytes) -> Outcome:
        return await fw.handle(k, packet)

    return call


def _split(raw: bytes) -> list[bytes]:
    return [raw[o : o + KEY_SIZE] for o in range(0, len(raw), KEY_SIZE)]


@dataclass
class _Paths:
    """Samples per path and round, and the answers that were wrong."""

    rounds: dict[str, list[list[float]]]
    wrong: dict[str, int]

    def add(self, path: str, samples: list[float], wrong: int = 0) -> None:
        self.rounds.setdefault(path, []).append(samples)
        self.wrong[path] = self.wrong.get(path, 0) + wrong


# --------------------------------------------------------------------------- workload


async def connection_path(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The SYN, second-chance and plain-miss paths vs Redis SET NX and GET (module doc)."""
    n = s.syn_samples
    cluster = LocalCluster(plan(2, NODES_PER_POP), NODE_ARGS)
    fast = ForwarderConfig(batch_window_ms=0.0, background_refresh=False)
    default = ForwarderConfig(background_refresh=False)
    async with (
        RedisServer() as rs,
        cluster,
        Client([x.spec.grpc for x in cluster.nodes if x.spec.pop == "fra"]) as at_b,
        Forwarder(Client([x.spec.grpc for x in cluster.nodes if x.spec.pop == "ams"]), "ams",
                  fast, owns_client=True) as fw,
        Forwarder(Client([x.spec.grpc for x in cluster.nodes if x.spec.pop == "ams"]), "ams",
                  default, owns_client=True) as fw_default,
    ):  # fmt: skip
        here, b = fw.here, at_b.pop_id("fra")
        rsync = redis.Redis(port=rs.port)
        try:
            log(f"syn: writing every partition once at both PoPs ({WARM_KEYS:,} claims each)")
            for i, (c, pop) in enumerate(((fw.client, here), (at_b, b))):
                warm = synthetic_keys(WARM_KEYS, s.seed, start=60_000_000 + i * WARM_KEYS)
                await _claim_all(c, warm, pop, s)
            log(f"syn: {s.runs} rounds of {n:,} single-key calls per path, 1 in flight")
            paths = _Paths({}, {})
            for rnd in range(s.runs + 1):  # round 0 warms up
                got = await _round(s, rnd, fw, fw_default, at_b, b, rsync)
                if rnd:
                    for path, (samples, wrong) in got.items():
                        paths.add(path, samples, wrong)
        finally:
            rsync.close()
    return _rows(s, paths)


async def _claim_all(client: Client, raw: bytes, pop: int, s: Settings) -> None:
    async def one(part: bytes) -> None:
        res = await client.flow_packed("Claim", part, pop=pop)
        if not np.all(res["status"] == Status.CREATED):
            raise RuntimeError(f"syn: claims not created: {np.bincount(res['status'])}")

    await workers(batches(raw, s.batch), s.in_flight, one)


async def _round(
    s: Settings, rnd: int, fw: Forwarder, fw_default: Forwarder, at_b: Client, b: int,
    rsync: redis.Redis,
) -> dict[str, tuple[list[float], int]]:  # fmt: skip
    """One interleaved round on fresh keys: every path once, dht and Redis."""
    n = s.syn_samples
    here, client = fw.here, fw.client
    groups = _split(synthetic_keys(8 * n, s.seed + rnd, start=70_000_000 + rnd * 8 * n))
    syn, syn_d, old, one, sc, sc_d, plain = (groups[i * n : (i + 1) * n] for i in range(7))
    rkeys = redis_keys(b"".join(groups[7 * n :]))
    out: dict[str, tuple[list[float], int]] = {}

    def served(o: Outcome) -> bool:
        return o.action is Action.SERVE and o.target == 0

    def tunnelled_to_b(o: Outcome) -> bool:
        return o.action is Action.TUNNEL and o.target == b

    async def two_calls(k: bytes) -> bool:
        looked = await client.flow_packed("Lookup", k)
        claimed = await client.flow_packed("Claim", k, pop=here)
        return bool(looked["status"][0] == Status.NOT_FOUND) and bool(
            claimed["status"][0] == Status.CREATED
        )

    async def one_call(k: bytes) -> bool:
        return bool((await client.flow_packed("Claim", k, pop=here))["status"][0] == Status.CREATED)

    out["syn"] = await _each(syn, _packet(fw, Packet.SYN), served)
    out["syn_default"] = await _each(syn_d, _packet(fw_default, Packet.SYN), served)
    out["two_calls"] = await _each(old, two_calls, bool)
    out["one_claim"] = await _each(one, one_call, bool)

    def set_nx(k: bytes) -> None:
        if rsync.set(k, REDIS_VALUE, nx=True, get=True, px=REDIS_CLAIM_PX) is not None:
            raise RuntimeError("redis: a fresh key already existed")

    out["redis_set_nx"] = await asyncio.to_thread(_redis_each, rkeys, set_nx), 0
    # Claimed at B just before (embryonic, 10 s TTL): A's table has never heard of them.
    for keys, fwd, path in ((sc, fw, "second_chance"), (sc_d, fw_default, "second_default")):
        await _claim_all(at_b, b"".join(keys), b, s)
        out[path] = await _each(keys, _packet(fwd, Packet.DATA), tunnelled_to_b)
    res = await client.flow_packed("Confirm", b"".join(plain), pop=here, ttl_s=600)
    if not np.all(res["status"] == Status.CREATED):
        raise RuntimeError("syn: confirms at A not created")
    out["plain_miss"] = await _each(plain, _packet(fw, Packet.DATA), served)

    # Redis's counterpart of a flow held for an hour (the claims above lapse in 10 s).
    held = redis_keys(b"".join(plain))
    await asyncio.to_thread(redis_fill, rsync, held)

    def get(k: bytes) -> None:
        if rsync.get(k) is None:
            raise RuntimeError("redis: a stored key is gone")

    out["redis_get"] = await asyncio.to_thread(_redis_each, held, get), 0
    return out


# --------------------------------------------------------------------------- report

# path -> (row name, JSON ratio key, the Redis path it stands next to, expected answer)
_ROWS = (
    ("syn", "SYN path (1 call)", "syn_vs_redis_setnx", "redis_set_nx", "SERVE"),
    ("syn_default", "SYN path (2 ms window)", "syn_window_vs_redis_setnx", "redis_set_nx",
     "SERVE"),
    ("two_calls", "SYN before (Lookup+Claim)", "syn_two_calls_vs_redis_setnx", "redis_set_nx",
     "NOT_FOUND, then CREATED"),
    ("second_chance", "second chance (DATA)", "second_chance_vs_redis_get", "redis_get",
     "TUNNEL to B"),
    ("second_default", "second chance (2 ms window)", "second_chance_window_vs_redis_get",
     "redis_get", "TUNNEL to B"),
    ("plain_miss", "plain miss (DATA)", "plain_miss_vs_redis_get", "redis_get", "SERVE"),
)  # fmt: skip


def _rows(s: Settings, paths: _Paths) -> list[dict[str, Any]]:
    got = {p: summarize(r) for p, r in paths.rounds.items()}
    one = got["one_claim"]
    setup = (
        f"forwarder at PoP A, 2 PoPs x {NODES_PER_POP} nodes (rf 3, W 2) on loopback "
        f"(inter-PoP RTT ~0), cold cache, 1 key in flight, {s.syn_samples} per round; "
        "redis-py sync, hiredis"
    )
    rows: list[dict[str, Any]] = []
    for path, name, key, redis_path, want in _ROWS:
        wrong = paths.wrong.get(path, 0)
        note = mismatch_note(wrong, got[path].samples, want)
        extra: dict[str, Any] = {"wrong_answers": wrong}
        if path == "two_calls":
            # The same basis as the old path: one Claim through the client, no forwarder.
            extra |= {
                "one_claim_p50": round(one.p50, 1), "one_claim_p99": round(one.p99, 1),
                "one_claim_wrong_answers": paths.wrong.get("one_claim", 0),
            }  # fmt: skip
        rows += latency_rows(name, key, setup, got[path], got[redis_path], note, **extra)
    return rows
