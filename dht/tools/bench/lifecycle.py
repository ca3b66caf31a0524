"""The connection lifecycle (``dht bench --only lifecycle``): the whole life of
connections at a fixed offered rate, stepped up, side by side with what a user would
otherwise build (one Redis per PoP), steps interleaved (dht, Redis, dht, ...).

Three PoPs of one node each (plaintext, ``--replicate-after-s 0``: a confirmed flow is
shipped at once; ``--udp-lookup-port 0``) and one ``dht.client.Forwarder`` per PoP (its
default configuration, plus ``udp_lookups``: misses are asked over UDP, as a plaintext
deployment would, docs/api.md#udp-lookup), all in this process. Connection ``i`` starts
at PoP A = ``i % 3``; its events are at fixed offsets after its scheduled SYN (open
loop: a late answer delays nothing else):

* **SYN** (+0): ``handle(key, Packet.SYN)`` at A, one claim; must be SERVE by A.
* **confirm** (+``confirm_ms``): ``established(key)`` at A (the record is shipped).
* **miss** (+``miss_ms``): a route change, ``handle(key, Packet.DATA)`` at the next PoP B
  with a cold cache; must be TUNNEL to A (from B's copy, or by a second chance).
* **release** (+``release_ms``): ``release(key)`` at A, the call ``handle(key,
  Packet.FIN)`` makes in the background, awaited so that its end is measured.

The Redis-per-PoP design does the same four steps through the same harness: a
redis-server per PoP, each forwarder with a redis.asyncio client to every one of them.
Claim: ``SET key owner NX GET EX 10`` at A's Redis. Confirm: ``SET XX EX 600`` at A's and
``SET EX 600`` at the other two (ship), sent together, awaited together. Miss: ``GET`` at
B's Redis, then at the other two together if B's has nothing. Release: ``DEL`` at all
three, together. Commands to one Redis from one forwarder that arrive within one turn
of the event loop go out as one pipeline, at most 4 pipelines in flight per
connection pool and the rest gathered meanwhile (the forwarder's micro-batching rule).

Latency counts from an event's scheduled time to its answer (falling behind shows as
latency). Per step: achieved rate (lives completed per second), CPU per connection of
the server processes (utime + stime from /proc; nodes or redis-servers) and of this
process (the harness: forwarders or redis-py, and the load generator), SYN and miss
p50/p99, answers that were not the expected ones. A design stops stepping up once a
step's miss p99 passes ``GIVE_UP_MS`` or it achieves under ``KEEP_UP`` of the offered
rate (the first ``MIN_STEPS`` steps run whatever their figures). Before the steps every
partition of every PoP is written once (a coordinator's first write to a partition pays
a promise round: start-up cost, not the lifecycle's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import redis.asyncio as aredis
from redis.exceptions import RedisError

from dht.client import Client, Forwarder
from dht.client.decision import Action, Packet
from dht.client.forwarder import ForwarderConfig
from dht.core.errors import DhtError
from dht.core.record import Status
from dht.core.wire import KEY_SIZE
from dht.tools.bench.keys import batches, redis_keys, synthetic_keys
from dht.tools.bench.procs import RedisServer, cpu_seconds
from dht.tools.bench.workloads import NODE_ARGS, REDIS_VALUE, _versus, workers
from dht.tools.cluster import LocalCluster, plan

POPS = 3
MISS_P99_GOAL_MS = 5.0
RATE_GOAL = 3_000  # new connections per second at 3 PoPs x 1 node
GIVE_UP_MS = 50.0  # miss p99 past this: no higher step for that design
KEEP_UP = 0.8  # achieved under this share of offered: no higher step
MIN_STEPS = 3  # every design runs the first steps whatever their figures
COUNTS = 0.9  # a step counts for the rate goal if it achieved this share of offered
WARM_KEYS = 40_000  # claimed at each PoP first: every partition written once
CLAIM_TTL_S = 10  # the embryonic TTL (docs/protocol.md#time-to-live)
HELD_TTL_S = 600  # an established flow's TTL on the Redis side
PIPELINES_IN_FLIGHT = 4  # per Redis client, as the forwarder's max_batches_in_flight
DESIGNS = ("dht", "redis")


@dataclass(frozen=True)
class LifeSettings:
    rates: tuple[int, ...]  # offered new connections per second, one step each
    step_s: float
    warmup_s: float = 1.0  # a first step per design at the lowest rate, not reported
    pause_s: float = 0.5  # between steps: what a step left queued settles
    confirm_ms: float = 5.0
    miss_ms: float = 200.0
    release_ms: float = 600.0
    drain_s: float = 3.0  # after a step's last release is due, lives still open are dropped
    seed: int = 1


class Design(Protocol):
    """One side of the comparison: the four steps of a connection's life at PoP index
    ``a`` (0..2), the miss at ``b``; each returns whether the answer was the expected one."""

    name: str
    pids: list[int]  # its server processes

    def keys(self, n: int, start: int) -> list[Any]: ...
    async def claim(self, a: int, k: Any) -> bool: ...
    async def confirm(self, a: int, k: Any) -> bool: ...
    async def miss(self, b: int, a: int, k: Any) -> bool: ...
    async def release(self, a: int, k: Any) -> bool: ...
    def take_counts(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- dht


class DhtLife:
    """The lifecycle through one ``Forwarder`` per PoP."""

    name = "dht"

    def __init__(self, fws: Sequence[Forwarder], pids: list[int], seed: int) -> None:
        self.fws = list(fws)
        self.pids = pids
        self.seed = seed
        self.second_chance = 0
        self.wrong_misses: dict[str, int] = {}  # "ACTION reason (status)" -> count

    def keys(self, n: int, start: int) -> list[Any]:
        raw = synthetic_keys(n, self.seed, start=start)
        return [raw[o : o + KEY_SIZE] for o in range(0, len(raw), KEY_SIZE)]

    async def claim(self, a: int, k: Any) -> bool:
        fw = self.fws[a]
        o = await fw.handle(k, Packet.SYN)
        return o.action is Action.SERVE and o.answer is not None and o.answer.owner == fw.here

    async def confirm(self, a: int, k: Any) -> bool:
        fw = self.fws[a]
        got = await fw.established(k)
        return got.status == Status.OK and got.owner == fw.here

    async def miss(self, b: int, a: int, k: Any) -> bool:
        o = await self.fws[b].handle(k, Packet.DATA)
        if o.answer is not None and o.answer.second_chance:
            self.second_chance += 1
        if o.action is Action.TUNNEL and o.target == self.fws[a].here:
            return True
        status = o.answer.status.name if o.answer is not None else "-"
        what = f"{o.action.name} {o.target} {o.reason} ({status})"
        self.wrong_misses[what] = self.wrong_misses.get(what, 0) + 1
        return False

    async def release(self, a: int, k: Any) -> bool:
        return (await self.fws[a].release(k)).status == Status.OK

    def take_counts(self) -> dict[str, Any]:
        out = {"miss_by_second_chance": self.second_chance, "wrong_misses": self.wrong_misses}
        self.second_chance, self.wrong_misses = 0, {}
        return out


# --------------------------------------------------------------------------- Redis


class Pipe:
    """One forwarder's commands to one Redis: those submitted within one event-loop turn
    leave as one pipeline; with ``max_in_flight`` pipelines out, the rest wait for one
    to return and leave together."""

    def __init__(self, r: aredis.Redis, max_in_flight: int = PIPELINES_IN_FLIGHT) -> None:
        self.r = r
        self.max_in_flight = max_in_flight
        self.queue: list[tuple[str, tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self.in_flight = 0
        self.scheduled = False
        self.pipelines = 0
        self.commands = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.queue.append((method, args, kwargs, fut))
        self._schedule(loop)
        return fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.scheduled and self.in_flight < self.max_in_flight and self.queue:
            self.scheduled = True
            loop.call_soon(self._go)

    def _go(self) -> None:
        self.scheduled = False
        if not self.queue or self.in_flight >= self.max_in_flight:
            return
        cmds, self.queue = self.queue, []
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(cmds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, cmds: list[tuple[str, tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            pipe = self.r.pipeline(transaction=False)
            for method, args, kwargs, _ in cmds:
                getattr(pipe, method)(*args, **kwargs)
            res = await pipe.execute(raise_on_error=False)
            self.pipelines += 1
            self.commands += len(cmds)
            for (*_, fut), r in zip(cmds, res, strict=True):
                if fut.done():
                    continue
                if isinstance(r, Exception):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)
        except (RedisError, OSError) as e:
            for *_, fut in cmds:
                if not fut.done():
                    fut.set_exception(e)
        finally:
            self.in_flight -= 1
            self._schedule(asyncio.get_running_loop())


class RedisLife:
    """The lifecycle on one Redis per PoP (module doc); ``pipes[p][r]`` carries PoP p's
    forwarder's commands to PoP r's Redis."""

    name = "redis"

    def __init__(self, pipes: list[list[Pipe]], pids: list[int], seed: int) -> None:
        self.pipes = pipes
        self.pids = pids
        self.seed = seed
        # The value a Redis user would store: owner PoP (2 bytes), then the rest.
        self.values = [(p + 1).to_bytes(2, "big") + REDIS_VALUE[2:] for p in range(POPS)]
        self.second_look = 0

    def keys(self, n: int, start: int) -> list[Any]:
        return list(redis_keys(synthetic_keys(n, self.seed, start=start)))

    async def claim(self, a: int, k: Any) -> bool:
        old = await self.pipes[a][a].call(
            "set", k, self.values[a], nx=True, get=True, ex=CLAIM_TTL_S
        )
        return old is None or bytes(old[:2]) == self.values[a][:2]

    async def confirm(self, a: int, k: Any) -> bool:
        v, pipes = self.values[a], self.pipes[a]
        futs = [pipes[a].call("set", k, v, xx=True, ex=HELD_TTL_S)]
        futs += [pipes[r].call("set", k, v, ex=HELD_TTL_S) for r in range(POPS) if r != a]
        res = await asyncio.gather(*futs)
        return all(x is True for x in res)

    async def miss(self, b: int, a: int, k: Any) -> bool:
        pipes = self.pipes[b]
        v = await pipes[b].call("get", k)
        if v is None:
            self.second_look += 1
            got = await asyncio.gather(*(pipes[r].call("get", k) for r in range(POPS) if r != b))
            v = next((x for x in got if x is not None), None)
        return v is not None and bytes(v[:2]) == self.values[a][:2]

    async def release(self, a: int, k: Any) -> bool:
        res = await asyncio.gather(*(self.pipes[a][r].call("delete", k) for r in range(POPS)))
        return all(x == 1 for x in res)

    def take_counts(self) -> dict[str, Any]:
        flat = [p for row in self.pipes for p in row]
        out = {
            "miss_at_other_redis": self.second_look,
            "pipelines": sum(p.pipelines for p in flat),
            "commands": sum(p.commands for p in flat),
        }
        self.second_look = 0
        for p in flat:
            p.pipelines = p.commands = 0
        return out


# --------------------------------------------------------------------------- one step


def _cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


async def _until(loop: asyncio.AbstractEventLoop, t: float) -> None:
    d = t - loop.time()
    if d > 0:
        await asyncio.sleep(d)


async def run_step(
    d: Design, rate: int, seconds: float, ls: LifeSettings, start: int
) -> dict[str, Any]:
    """``rate`` new connections per second for ``seconds``, open loop; one table row."""
    loop = asyncio.get_running_loop()
    n = max(1, round(rate * seconds))
    keys = d.keys(n, start)
    offs = (ls.confirm_ms / 1000, ls.miss_ms / 1000, ls.release_ms / 1000)
    syn_lat: list[float] = []
    miss_lat: list[float] = []
    done_at: list[float] = []
    wrong = dict.fromkeys(("claim", "confirm", "miss", "release"), 0)
    errors: list[str] = []

    async def life(i: int, t: float) -> None:
        a, b, k = i % POPS, (i + 1) % POPS, keys[i]
        try:
            await _until(loop, t)
            wrong["claim"] += not await d.claim(a, k)
            syn_lat.append(loop.time() - t)
            await _until(loop, t + offs[0])
            wrong["confirm"] += not await d.confirm(a, k)
            await _until(loop, t + offs[1])
            wrong["miss"] += not await d.miss(b, a, k)
            miss_lat.append(loop.time() - t - offs[1])
            await _until(loop, t + offs[2])
            wrong["release"] += not await d.release(a, k)
            done_at.append(loop.time())
        except (DhtError, RedisError, OSError) as e:
            errors.append(type(e).__name__)

    d.take_counts()
    cpu0, h0 = _cpu(d.pids), time.process_time()
    t0 = loop.time() + 0.05
    tasks: list[asyncio.Task[None]] = []
    while len(tasks) < n:  # bounded: n connections, one pass of the schedule
        due = min(n, max(0, int((loop.time() + 0.002 - t0) * rate) + 1))
        while len(tasks) < due:
            tasks.append(loop.create_task(life(len(tasks), t0 + len(tasks) / rate)))
        # Wake when the next one is due (spawned 2 ms ahead), at most every 1 ms.
        await asyncio.sleep(max(0.001, t0 + len(tasks) / rate - 0.002 - loop.time()))
    deadline = t0 + n / rate + offs[2] + ls.drain_s
    _, pending = await asyncio.wait(tasks, timeout=max(0.1, deadline - loop.time()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cpu1, h1 = _cpu(d.pids), time.process_time()
    span = max(seconds, (max(done_at) - t0 - offs[2]) if done_at else seconds)
    ms = 1000.0
    return {
        "design": d.name, "offered": rate, "seconds": seconds, "started": n,
        "completed": len(done_at), "achieved": round(len(done_at) / span, 1),
        "node_cpu_ms_per_conn": round((cpu1 - cpu0) * ms / n, 3),
        "harness_cpu_ms_per_conn": round((h1 - h0) * ms / n, 3),
        "syn_p50_ms": round(_pct(syn_lat, 50) * ms, 2),
        "syn_p99_ms": round(_pct(syn_lat, 99) * ms, 2),
        "miss_p50_ms": round(_pct(miss_lat, 50) * ms, 2),
        "miss_p99_ms": round(_pct(miss_lat, 99) * ms, 2),
        "wrong": sum(wrong.values()), "wrong_by_step": wrong, "errors": len(errors),
        "unfinished": len(pending), **d.take_counts(),
    }  # fmt: skip


def failed(step: dict[str, Any]) -> bool:
    """Past this step the design is saturated: no higher step."""
    p99 = step["miss_p99_ms"]
    return bool(
        step["achieved"] < KEEP_UP * step["offered"] or not p99 <= GIVE_UP_MS  # NaN: no misses
    )


def max_rate(steps: Sequence[dict[str, Any]], design: str) -> int:
    """The highest offered rate whose step kept up and held miss p99 <= 5 ms (0: none)."""
    ok = [
        s["offered"]
        for s in steps
        if s["design"] == design
        and s["achieved"] >= COUNTS * s["offered"]
        and s["miss_p99_ms"] <= MISS_P99_GOAL_MS
    ]
    return max(ok, default=0)


# --------------------------------------------------------------------------- workload


async def lifecycle(
    ls: LifeSettings, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lifecycle, dht and Redis per PoP (module doc): the goal rows, the steps."""
    cluster = LocalCluster(
        plan(POPS, 1), [*NODE_ARGS, "--replicate-after-s", "0", "--udp-lookup-port", "0"]
    )
    async with cluster, RedisServer() as r1, RedisServer() as r2, RedisServer() as r3:
        servers = [r1, r2, r3]
        fws: list[Forwarder] = []
        clients: list[aredis.Redis] = []
        try:
            for node in cluster.nodes:
                cfg = ForwarderConfig(udp_lookups=True)
                fw = Forwarder(Client([node.spec.grpc]), node.spec.pop, cfg, owns_client=True)
                await fw.start()
                fws.append(fw)
            for _ in range(POPS):
                for rs in servers:
                    clients.append(aredis.Redis(port=rs.port, max_connections=PIPELINES_IN_FLIGHT))
            pipes = [[Pipe(clients[p * POPS + r]) for r in range(POPS)] for p in range(POPS)]
            ours = DhtLife(fws, [n.pid for n in cluster.nodes], ls.seed)
            theirs = RedisLife(pipes, [rs.pid for rs in servers], ls.seed)
            log(f"lifecycle: writing every partition once at each PoP ({WARM_KEYS:,} claims)")
            await _warm(fws, ls.seed, log)
            idle = await _idle_cpu(ours, theirs)
            steps = await _ramp(ls, ours, theirs, log)
        finally:
            for fw in fws:
                await fw.close()
            for c in clients:
                await c.aclose()
    return _rows(ls, steps, idle), steps


async def _warm(fws: Sequence[Forwarder], seed: int, log: Callable[[str], None]) -> None:
    """Claim ``WARM_KEYS`` keys at each PoP (embryonic: never shipped, gone after their
    10 s TTL, so the tables the steps meet hold only the steps' own flows); keys a busy
    node answered UNAVAILABLE are sent again (at most 3 more times), the rest only
    logged: the warm-up is not measured."""
    for i, fw in enumerate(fws):
        raw = synthetic_keys(WARM_KEYS, seed, start=80_000_000 + i * WARM_KEYS)
        left: list[bytes] = []

        async def one(part: bytes, fw: Forwarder = fw, left: list[bytes] = left) -> None:
            res = await fw.client.flow_packed("Claim", part, pop=fw.here, ttl_s=CLAIM_TTL_S)
            for j in np.flatnonzero(res["status"] != Status.CREATED):
                left.append(part[j * KEY_SIZE : (j + 1) * KEY_SIZE])

        await workers(batches(raw, 1000), 4, one)
        for _ in range(3):  # bounded: three more tries for what was not written
            if not left:
                break
            again, left[:] = b"".join(left), []
            await asyncio.sleep(0.5)
            await workers(batches(again, 1000), 4, one)
        if left:
            log(f"lifecycle: {len(left):,} warm-up claims at PoP {fw.here} not written")
    await asyncio.sleep(CLAIM_TTL_S + 1)  # until the warm-up claims have lapsed


async def _idle_cpu(*designs: Design) -> dict[str, float]:
    """Each side's server CPU with no traffic, and this process's, in ms per second."""
    before, h0 = [_cpu(d.pids) for d in designs], time.process_time()
    await asyncio.sleep(1.0)
    out = {
        d.name: round((_cpu(d.pids) - b) * 1000, 1) for d, b in zip(designs, before, strict=True)
    }
    return out | {"harness": round((time.process_time() - h0) * 1000, 1)}


async def _ramp(
    ls: LifeSettings, ours: Design, theirs: Design, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    start = 100_000_000
    for d in (ours, theirs):  # warm-up step, not reported
        await run_step(d, ls.rates[0], ls.warmup_s, ls, start)
        start += ls.rates[0] * 2 * int(ls.warmup_s + 1)
        await asyncio.sleep(ls.pause_s)
    steps: list[dict[str, Any]] = []
    live = {ours.name: True, theirs.name: True}
    for n, rate in enumerate(ls.rates):
        for d in (ours, theirs):
            if not live[d.name]:
                continue
            step = await run_step(d, rate, ls.step_s, ls, start)
            await asyncio.sleep(ls.pause_s)
            start += int(rate * ls.step_s) + 1
            steps.append(step)
            live[d.name] = n + 1 < MIN_STEPS or not failed(step)
            log(
                f"lifecycle {d.name} {rate}/s: achieved {step['achieved']:,.0f}/s, nodes "
                f"{step['node_cpu_ms_per_conn']:.3f} ms/conn, harness "
                f"{step['harness_cpu_ms_per_conn']:.3f} ms/conn, syn p99 {step['syn_p99_ms']} "
                f"ms, miss p50/p99 {step['miss_p50_ms']}/{step['miss_p99_ms']} ms, "
                f"wrong {step['wrong']}, errors {step['errors']}"
            )
        if not any(live.values()):
            break
    return steps


# --------------------------------------------------------------------------- report


def _rows(
    ls: LifeSettings, steps: list[dict[str, Any]], idle: dict[str, float]
) -> list[dict[str, Any]]:
    by = {(s["design"], s["offered"]): s for s in steps}
    kept = [
        r
        for r in ls.rates
        if all((d, r) in by and by[d, r]["achieved"] >= COUNTS * r for d in DESIGNS)
    ]
    at = max(kept, default=ls.rates[0])
    o, t = by.get(("dht", at)), by.get(("redis", at))
    setup = (
        f"3 PoPs x 1 node (replicate-after 0) vs a redis-server per PoP, a forwarder per "
        f"PoP in one process, at {at:,} new connections/s (the highest both kept up with)"
    )
    rows: list[dict[str, Any]] = []
    if o is not None and t is not None:
        for what, key, goal in (
            ("nodes", "node_cpu_ms_per_conn", "<= 1.5"),
            ("harness", "harness_cpu_ms_per_conn", "report"),
        ):
            ratio = o[key] / t[key] if t[key] else 0.0
            rows.append(
                _versus(
                    f"lifecycle CPU/conn ({what})", setup, "ms", o[key], t[key], ratio, goal,
                    goal == "report" or ratio <= 1.5,
                    key=f"lifecycle_cpu_{what}_vs_redis", rate=at, idle_cpu_ms_per_s=idle,
                )
            )  # fmt: skip
    a, b = max_rate(steps, "dht"), max_rate(steps, "redis")
    ratio = a / b if b else (99.0 if a else 1.0)
    wrong = {
        d: sum(s["wrong"] + s["errors"] + s["unfinished"] for s in steps if s["design"] == d)
        for d in DESIGNS
    }
    rows.append(
        _versus(
            "lifecycle max rate (miss p99 <= 5 ms)",
            f"3 PoPs x 1 node vs a redis per PoP, steps of {ls.step_s:g} s, a step counts "
            f"if it achieved >= {COUNTS:.0%} of the offered rate", "conn/s", a, b, ratio,
            f">= {RATE_GOAL:,}, >= redis", a >= RATE_GOAL and a >= b,
            key="lifecycle_max_rate_vs_redis", wrong_answers=wrong,
            note="lifecycle: wrong answers, errors or dropped lives, dht "
            f"{wrong['dht']:,}, redis {wrong['redis']:,} (per step in the lifecycle table)",
        )
    )  # fmt: skip
    return rows


def step_table(steps: Sequence[dict[str, Any]]) -> str:
    """The per-step table (Markdown), both designs."""
    head = (
        "| offered/s | design | achieved/s | node CPU ms/conn | harness CPU ms/conn | "
        "SYN p50 ms | SYN p99 ms | miss p50 ms | miss p99 ms | wrong |"
    )
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        bad = s["wrong"] + s["errors"] + s["unfinished"]
        lines.append(
            f"| {s['offered']:,} | {s['design']} | {s['achieved']:,.0f} | "
            f"{s['node_cpu_ms_per_conn']:.3f} | {s['harness_cpu_ms_per_conn']:.3f} | "
            f"{s['syn_p50_ms']:.2f} | {s['syn_p99_ms']:.2f} | {s['miss_p50_ms']:.2f} | "
            f"{s['miss_p99_ms']:.2f} | {bad} |"
        )
    return "\n".join(lines)
