"""The nemesis of a chaos run: faults on a schedule drawn from a seed.

Faults (``KINDS``):

* ``cpu``: CPU starvation, one busy process per core beside the nodes, for a while;
* ``pause``: SIGSTOP a node, SIGCONT it after a while (a VM stall, a long GC);
* ``kill``: SIGKILL a node, start it again (empty) after a while;
* ``leave``: SIGTERM a node (a graceful leave: it hands its data off), start it again.

CPU starvation overlaps anything. Node faults come one at a time, each only once the PoP
has settled after the previous one (every node ready, one epoch, every member in the
table): the failure budget of docs/protocol.md#quorums is one replica down at a time.
Link faults and clock offsets are not here yet (the system tests have the proxy for the
former; a node takes no clock offset from outside).

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dht.tools.cluster import LocalCluster, NodeProcess

KINDS = ("cpu", "pause", "kill", "leave")


@dataclass(frozen=True, slots=True)
class Fault:
    at: float  # seconds after the start of the run
    kind: str
    node: int  # index in the cluster's nodes (-1 for cpu)
    duration: float

    def __str__(self) -> str:
        who = "" if self.node < 0 else f" node {self.node}"
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
    on_nodes = [k for k in kinds if k != "cpu"]
    spans = {"pause": (0.3, 3.0), "kill": (1.0, 5.0), "leave": (0.5, 3.0)}
    t = rng.uniform(4.0, 8.0)
    while on_nodes and t < end - 5.0:
        kind = rng.choice(on_nodes)
        d = rng.uniform(*spans[kind])
        out.append(Fault(t, kind, rng.randrange(nodes), d))
        t += d + rng.uniform(6.0, 12.0)
    return sorted(out, key=lambda f: f.at)


@dataclass
class Nemesis:
    cluster: LocalCluster
    faults: list[Fault]
    settled: Callable[[], Awaitable[bool]]  # every node ready on one epoch, all members
    say: Callable[[str], None]
    settle_timeout_s: float = 60.0
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

    async def _restart(self, node: NodeProcess) -> None:
        fresh = await self.cluster.restart(node)
        self._log(f"{fresh.spec.node_id} started again (pid {fresh.pid})")

    async def heal(self) -> None:
        """End every fault under way: hogs killed, paused nodes resumed, nodes that are
        down started again."""
        await self._end_hogs(list(self._hogs))
        for pid in list(self._stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._stopped.clear()
        for node in list(self.cluster.nodes):
            if node.proc.returncode is not None:
                await self._restart(node)
