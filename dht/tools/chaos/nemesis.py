"""The nemesis of a chaos run: faults on a schedule drawn from a seed.

Faults (``KINDS``):

* ``cpu``: CPU starvation, one busy process per core beside the nodes, for a while;
* ``pause``: SIGSTOP a node, SIGCONT it after a while (a VM stall, a long GC);
* ``kill``: SIGKILL a node, start it again (empty) after a while;
* ``leave``: SIGTERM a node (a graceful leave: it hands its data off), start it again;
* ``slow``: delay the link between two nodes, both ways, by tens to hundreds of ms;
* ``cut``: cut the link between two nodes, both ways (each still reaches the others);
* ``clock``: every node runs with a wall clock offset from the machine's (drawn from the
  seed within +-40% of ``max_clock_offset_ms``, so any two differ by less than the bound),
  and a node started again after a kill or a leave gets a new offset (a clock step).

Link faults need a proxy (dht.tools.chaos.proxy) on every link between two nodes: node i
dials node j through its own proxy ``links[(i, j)]`` (``--dial-via``), so one link can be
delayed or cut without touching the rest.

CPU starvation overlaps anything. Node and link faults come one at a time, each only once
the PoP has settled after the previous one (every node ready, one epoch, every member in
the table): the failure budget of docs/protocol.md#quorums is one replica down (or cut
off from one other) at a time.

Only processes this module started are signalled, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from dht.tools.chaos.proxy import Proxy
from dht.tools.cluster import LocalCluster, NodeProcess

KINDS = ("cpu", "pause", "kill", "leave", "slow", "cut", "clock")
# Faults that come one at a time, each on a node or a link, for a duration (s).
SPANS = {"pause": (0.3, 3.0), "kill": (1.0, 5.0), "leave": (0.5, 3.0), "slow": (2.0, 8.0),
         "cut": (1.0, 5.0)}  # fmt: skip
SLOW_S = (0.02, 0.3)  # how long a slow link holds each chunk, each way
CLOCK_SHARE = 0.4  # node clock offsets within +- this share of max_clock_offset_ms


@dataclass(frozen=True, slots=True)
class Fault:
    at: float  # seconds after the start of the run
    kind: str
    node: int  # index in the cluster's nodes (-1 for cpu)
    duration: float
    peer: int = -1  # the other end of a link fault
    delay_s: float = 0.0  # a slow link's delay

    def __str__(self) -> str:
        who = "" if self.node < 0 else f" node {self.node}"
        if self.peer >= 0:
            who = f" link {self.node}-{self.peer}"
            if self.kind == "slow":
                who += f" +{self.delay_s * 1000:.0f}ms"
        return f"+{self.at:.1f}s {self.kind}{who} for {self.duration:.1f}s"


def plan_faults(seed: int, duration_s: float, nodes: int, kinds: tuple[str, ...]) -> list[Fault]:
    """The schedule of a run: the same seed gives the same faults."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    rng = random.Random(seed)
    out: list[Fault] = []
    end = duration_s - 5.0  # the last seconds are for healing
    if "cpu" in kinds:
        t = rng.uniform(2.0, 6.0)
        while t < end:
            d = min(rng.uniform(5.0, 15.0), end - t)
            out.append(Fault(t, "cpu", -1, d))
            t += d + rng.uniform(3.0, 10.0)
    on_nodes = [k for k in kinds if k in SPANS and (nodes > 1 or k not in ("slow", "cut"))]
    t = rng.uniform(4.0, 8.0)
    while on_nodes and t < end - 5.0:
        kind = rng.choice(on_nodes)
        d = rng.uniform(*SPANS[kind])
        node = rng.randrange(nodes)
        if kind in ("slow", "cut"):
            peer = rng.choice([i for i in range(nodes) if i != node])
            delay = rng.uniform(*SLOW_S) if kind == "slow" else 0.0
            out.append(Fault(t, kind, node, d, peer, delay))
        else:
            out.append(Fault(t, kind, node, d))
        t += d + rng.uniform(6.0, 12.0)
    return sorted(out, key=lambda f: f.at)


def plan_clocks(seed: int, nodes: int, max_offset_ms: int) -> list[int]:
    """Each node's first wall-clock offset (ms), from the seed."""
    rng = random.Random(seed * 7919 + 1)
    bound = int(max_offset_ms * CLOCK_SHARE)
    return [rng.randint(-bound, bound) for _ in range(nodes)]


@dataclass
class Nemesis:
    cluster: LocalCluster
    faults: list[Fault]
    settled: Callable[[], Awaitable[bool]]  # every node ready on one epoch, all members
    say: Callable[[str], None]
    settle_timeout_s: float = 60.0
    links: Mapping[tuple[int, int], Proxy] = field(default_factory=dict)
    # With clock faults: the bound of node clock offsets, and the source of new ones.
    clock_bound_ms: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    events: list[str] = field(default_factory=list)
    unsettled: int = 0  # node faults that found the PoP not settled in time (done anyway)
    _hogs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _stopped: set[int] = field(default_factory=set)
    _t0: float = 0.0

    def _log(self, what: str) -> None:
        line = f"+{time.monotonic() - self._t0:.1f}s {what}"
        self.events.append(line)
        self.say(line)

    async def run(self, t0: float) -> None:
        """Carry out the schedule (``t0``: the run's start, monotonic)."""
        self._t0 = t0
        cpu = [self._starve(f) for f in self.faults if f.kind == "cpu"]
        await asyncio.gather(self._node_faults(), *cpu)

    async def _at(self, f: Fault) -> None:
        await asyncio.sleep(max(0.0, self._t0 + f.at - time.monotonic()))

    async def _starve(self, f: Fault) -> None:
        await self._at(f)
        n = os.cpu_count() or 2
        self._log(f"cpu: {n} busy processes for {f.duration:.1f}s")
        hogs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", "while True: pass", stdin=asyncio.subprocess.DEVNULL
            )
            for _ in range(n)
        ]
        self._hogs += hogs
        try:
            await asyncio.sleep(f.duration)
        finally:
            await self._end_hogs(hogs)
        self._log("cpu: starvation over")

    async def _end_hogs(self, hogs: list[asyncio.subprocess.Process]) -> None:
        for h in hogs:
            with contextlib.suppress(ProcessLookupError):
                h.kill()
        for h in hogs:
            await h.wait()
            if h in self._hogs:
                self._hogs.remove(h)

    async def _node_faults(self) -> None:
        for f in (f for f in self.faults if f.kind != "cpu"):
            await self._at(f)
            if not await self.wait_settled():
                self.unsettled += 1
                self._log(f"not settled after {self.settle_timeout_s:.0f}s; going on")
            if f.kind in ("slow", "cut"):
                await self._link(f)
                continue
            node = self.cluster.nodes[f.node]
            await getattr(self, f"_{f.kind}")(node, f.duration)

    async def wait_settled(self) -> bool:
        deadline = time.monotonic() + self.settle_timeout_s
        while time.monotonic() < deadline:
            if await self.settled():
                return True
            await asyncio.sleep(0.5)
        return False

    async def _pause(self, node: NodeProcess, d: float) -> None:
        self._log(f"pause {node.spec.node_id} for {d:.1f}s")
        self._stopped.add(node.pid)
        os.kill(node.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(d)
        finally:
            os.kill(node.pid, signal.SIGCONT)
            self._stopped.discard(node.pid)
        self._log(f"resume {node.spec.node_id}")

    async def _kill(self, node: NodeProcess, d: float) -> None:
        self._log(f"kill {node.spec.node_id}, down for {d:.1f}s")
        node.proc.kill()
        await node.proc.wait()
        await asyncio.sleep(d)
        await self._restart(node)

    async def _leave(self, node: NodeProcess, d: float) -> None:
        self._log(f"leave {node.spec.node_id} (SIGTERM)")
        t = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = await node.proc.wait()
        self._log(f"{node.spec.node_id} exited {code} after {time.monotonic() - t:.1f}s")
        await asyncio.sleep(d)
        await self._restart(node)

    async def _link(self, f: Fault) -> None:
        ends = [self.links[(f.node, f.peer)], self.links[(f.peer, f.node)]]
        a, b = (self.cluster.nodes[i].spec.node_id for i in (f.node, f.peer))
        if f.kind == "cut":
            self._log(f"cut {a} <-> {b} for {f.duration:.1f}s")
            for p in ends:
                p.cut()
        else:
            self._log(f"slow {a} <-> {b} by {f.delay_s * 1000:.0f}ms for {f.duration:.1f}s")
            for p in ends:
                p.delay_s = f.delay_s
        try:
            await asyncio.sleep(f.duration)
        finally:
            for p in ends:
                p.heal()
        self._log(f"link {a} <-> {b} healed")

    async def _restart(self, node: NodeProcess) -> None:
        note = ""
        if self.clock_bound_ms and "--clock-offset-ms" in node.args:
            i = node.args.index("--clock-offset-ms") + 1
            offset = self.rng.randint(-self.clock_bound_ms, self.clock_bound_ms)
            node.args[i] = str(offset)
            note = f", clock {offset:+d}ms"
        fresh = await self.cluster.restart(node)
        self._log(f"{fresh.spec.node_id} started again (pid {fresh.pid}{note})")

    async def heal(self) -> None:
        """End every fault under way: hogs killed, links healed, paused nodes resumed,
        nodes that are down started again."""
        await self._end_hogs(list(self._hogs))
        for p in self.links.values():
            p.heal()
        for pid in list(self._stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._stopped.clear()
        for node in list(self.cluster.nodes):
            if node.proc.returncode is not None:
                await self._restart(node)
