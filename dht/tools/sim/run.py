"""One ``dht simulate`` run over a running cluster (docs/simulator.md).

One forwarder per PoP (``dht.client.Forwarder`` over ``dht.client.Client``) decides every
packet that lands on its PoP with the decision table of docs/protocol.md#decision-table;
the run carries tunnelled packets to their target PoP (whose forwarder serves them, hop
limit 1) and judges where each was served (``dht.tools.sim.judge``). It plays the
forwarders' user too, as a PoP's hosts would:

- a packet that lands on (or is tunnelled to) the PoP holding the connection's socket
  goes through ``handle(..., local=True)``: the SYN's PoP for the handshake's ACK, the
  connection's home after it;
- the handshake completes (``established``, the confirm) only when the ACK is served at
  the SYN's PoP; a UDP flow is confirmed at its home once it lived
  ``udp_confirm_after_s``;
- a pinned flow's packets at its home are served by the data plane, with no
  ``handle()`` call; ``alive()`` is called for each PoP's pinned flows every
  ``SimSettings.keepalive_interval_s()`` (unless keep-alive is off).

One ``time_scale`` factor divides every simulated duration (flow lifetimes, packet
gaps, flaps, the TTLs the forwarders ask for, their cache lifetimes, the nodes'
``replicate_after_s``), so a short run keeps realistic proportions. The load is paced by
the traffic's own schedule (the run falls behind rather than piling up: its lag is
reported).
"""

from __future__ import annotations

import asyncio
import bisect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dht.client import Client
from dht.client.decision import Action, Packet
from dht.client.forwarder import Forwarder, Outcome
from dht.core.errors import ConfigError, DhtError
from dht.core.identity import Role
from dht.tools.certs import client_tls
from dht.tools.sim.judge import Breakage, Tally, before_ship, break_reason, saved_by
from dht.tools.sim.report import SHIPPED_KINDS, build_report, shipped_records
from dht.tools.sim.settings import Endpoint, SimSettings
from dht.tools.traffic import Flow, Send, Step, Traffic


@dataclass
class _Conn:
    """What the run knows of one flow while it lives."""

    flow: Flow
    holder: int = -1  # PoP index holding its socket: the SYN's, then its home
    syn_landed: int = -1  # where the packet that made it landed
    # Simulated time the confirm was sent: by the clock, not the schedule (a run behind
    # schedule confirms late, and records expire by the clock).
    confirmed_s: float | None = None
    pinned: bool = False  # held in its home's data plane now


class Simulation:
    """One run over given endpoints (a cluster started elsewhere)."""

    def __init__(
        self,
        settings: SimSettings,
        endpoints: Sequence[Endpoint],
        traffic: Traffic,
        certs: Path | None = None,
    ) -> None:
        """``certs``: the cluster's certificate directory (dht.tools.certs); each PoP's
        forwarder then calls with that PoP's forwarder certificate. None: plaintext."""
        self.s = settings
        self.certs = certs
        self.endpoints = list(endpoints)
        self.traffic = traffic
        self.tally = Tally()
        self.forwarders: list[Forwarder] = []
        self.pop_names: list[str] = []
        self._pinned: list[set[bytes]] = []  # per PoP index: keys held in its data plane
        self._t0 = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # Plain anycast's verdicts (pure): break times, sorted.
        self.baseline = sorted(
            b for f in traffic.flows if (b := traffic.baseline_break(f)) is not None
        )

    # ------------------------------------------------------------------ clock

    def sim_now(self) -> float:
        return (time.monotonic() - self._t0) * self.s.time_scale

    async def until(self, sim_t: float) -> None:
        delay = self.s.real(sim_t) - (time.monotonic() - self._t0)
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            self.tally.lag_s = max(self.tally.lag_s, -delay)

    # ------------------------------------------------------------------ run

    async def run(self, progress: bool = True) -> dict[str, Any]:
        admins = [e.admin for e in self.endpoints if e.admin]
        before = await shipped_records(admins, self.certs)
        try:
            await self._open()
            started = self._t0 = time.monotonic()
            helpers = [asyncio.create_task(self._progress(progress))]
            if self.s.keepalive:
                helpers.append(asyncio.create_task(self._keepalive()))
            try:
                await self._drive()
            finally:
                for h in helpers:
                    h.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
            wall = time.monotonic() - started
            for fw in self.forwarders:
                await fw.flush()  # the releases FINs sent in the background
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for fw in self.forwarders:
                await fw.close()
        after = await shipped_records(admins, self.certs)
        shipped = {k: int(after.get(k, 0) - before.get(k, 0)) for k in SHIPPED_KINDS}
        return build_report(
            self.s,
            self.traffic,
            self.tally,
            [f.stats for f in self.forwarders],
            self.pop_names,
            self.baseline,
            wall,
            shipped,
        )

    async def _open(self) -> None:
        """One started forwarder per PoP, in wire-id order (traffic PoP i = the i-th)."""
        by_pop: dict[str, list[str]] = {}
        for e in self.endpoints:
            by_pop.setdefault(e.pop, []).append(e.grpc)
        cfg = self.s.forwarder_config()
        for pop, targets in by_pop.items():
            tls = None
            if self.certs is not None:
                tls = client_tls(self.certs, Role.FORWARDER, pop)
                if tls is None:
                    raise ConfigError(f"no forwarder certificate for {pop} in {self.certs}")
            fw = Forwarder(Client(targets, tls=tls), pop, cfg, owns_client=True)
            await fw.start()
            self.forwarders.append(fw)
        ids = self.forwarders[0].client.pops
        self.forwarders.sort(key=lambda f: f.here)
        self.pop_names = [next(n for n, i in ids.items() if i == f.here) for f in self.forwarders]
        self._pinned = [set() for _ in self.forwarders]
        if len(self.forwarders) < self.traffic.pops:
            raise ConfigError(
                f"the traffic spans {self.traffic.pops} PoPs, the cluster has "
                f"{len(self.forwarders)}"
            )

    async def _drive(self) -> None:
        for flow in self.traffic.flows:
            await self.until(flow.start_s)
            task = asyncio.create_task(self._flow(flow))
            self._tasks.add(task)
            task.add_done_callback(self._flow_done)
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    def _flow_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Surfaces in _drive's gather; keep the loop's "never retrieved" quiet.
            task.exception()

    # ------------------------------------------------------------------ packets

    async def _deliver(self, landed: int, packet: Packet, c: _Conn) -> tuple[int, Outcome | None]:
        """A packet of ``c`` landing on PoP ``landed``: its host's socket or data plane
        takes it, or its forwarder decides and a tunnelled packet is carried to the
        target, which serves it. Returns the serving PoP and the landing PoP's outcome
        (None if no forwarder decided there)."""
        key, tally = c.flow.key, self.tally
        if landed == c.holder and packet is not Packet.SYN:
            if c.pinned and packet is not Packet.FIN:
                tally.home["data-plane"] += 1
                tally.pinned["data-plane-packets"] += 1
                return landed, None
            tally.home["local"] += 1
            await self.forwarders[landed].handle(key, packet, local=True)
            return landed, None
        out = await self.forwarders[landed].handle(key, packet)
        if out.action is not Action.TUNNEL:
            return landed, out
        tally.tunnelled += 1
        target = self._index(out.target)
        if target == c.holder and c.pinned and packet is not Packet.FIN:
            tally.pinned["data-plane-packets"] += 1
        else:
            local = target == c.holder and packet is not Packet.SYN
            await self.forwarders[target].handle(key, packet, tunnelled=True, local=local)
        return target, out

    def _index(self, pop_id: int) -> int:
        for i, fw in enumerate(self.forwarders):
            if fw.here == pop_id:
                return i
        raise ConfigError(f"tunnel to unknown PoP id {pop_id}")

    async def _flow(self, flow: Flow) -> None:
        c = _Conn(flow)
        confirm_at = None
        if flow.udp:
            self.tally.udp["flows"] += 1
            confirm_at = flow.start_s + self.s.udp_confirm_after_s
        try:
            for send in self.traffic.plan(flow):
                if confirm_at is not None and send.t_s >= confirm_at and c.confirmed_s is None:
                    # Still sending after udp_confirm_after_s: the flow is confirmed.
                    await self.until(confirm_at)
                    await self._confirm(c)
                await self.until(send.t_s)
                self.tally.packets += 1
                if not await self._send(c, send):
                    return  # reset: the connection is gone
        finally:
            if c.pinned:
                self._pinned[c.holder].discard(flow.key)

    async def _send(self, c: _Conn, send: Send) -> bool:
        """One packet of the flow; False if it broke the connection."""
        tally, step = self.tally, send.step
        landed = self.traffic.route_at(c.flow.client, send.t_s)
        if step in (Step.SYN, Step.UDP_FIRST):
            tally.connections += 1
            c.holder, _ = await self._deliver(landed, send.packet, c)
            c.syn_landed = landed
            return True
        if step is Step.SYN_AGAIN:
            tally.syn_again["sent"] += 1
            tally.syn_again["landed-elsewhere"] += landed != c.syn_landed
            served, _ = await self._deliver(landed, send.packet, c)
            tally.syn_again["lived-elsewhere"] += served != c.holder
            c.holder, c.syn_landed = served, landed
            return True
        moved = step is Step.ACK and landed != c.syn_landed
        tally.handshakes["route-changed"] += moved
        served, out = await self._deliver(landed, send.packet, c)
        if out is not None and landed != c.holder:
            if served != c.holder:
                self._broke(c, send, landed, out)
                return False
            how = saved_by(out)
            tally.foreign[how] += 1
            if before_ship(out):
                tally.before_ship[f"saved-by-{how}"] += 1
        if step is Step.ACK:
            tally.handshakes["saved"] += moved
            await self._confirm(c)
        return True

    def _broke(self, c: _Conn, send: Send, landed: int, out: Outcome) -> None:
        flow, tally = c.flow, self.tally
        ttl = self.s.established_ttl_s
        lapsed = c.confirmed_s is not None and self.sim_now() - c.confirmed_s > ttl
        reason = detail = break_reason(out, self.forwarders[landed].here, lapsed)
        if send.step is Step.ACK:
            reason = "handshake-elsewhere"
            tally.handshakes["broken"] += 1
        else:
            detail = out.reason
        tally.foreign[reason] += 1
        if before_ship(out):
            tally.before_ship[reason] += 1
        tally.udp["broken"] += flow.udp
        tally.pinned["broken"] += c.pinned
        names = self.pop_names
        tally.broken.append(
            Breakage(
                flow.id, round(send.t_s, 3), names[landed], names[c.holder], reason,
                round(send.t_s - flow.open_s, 3), send.step.value, "udp" if flow.udp else "tcp",
                c.pinned, detail,
            )
        )  # fmt: skip

    async def _confirm(self, c: _Conn) -> None:
        """The handshake completed at ``c.holder`` (or a UDP flow lived long enough)."""
        fw = self.forwarders[c.holder]
        c.confirmed_s = self.sim_now()
        try:
            a = await fw.established(c.flow.key)
            self.tally.confirms["ok" if a.owner == fw.here else "owned-elsewhere"] += 1
        except DhtError:
            self.tally.confirms["failed"] += 1
        self.tally.udp["confirmed"] += c.flow.udp
        if c.flow.pinned:
            c.pinned = True
            self._pinned[c.holder].add(c.flow.key)
            self.tally.pinned["flows"] += 1

    # ------------------------------------------------------------------ keep-alive

    async def _keepalive(self) -> None:
        """``alive()`` for every PoP's pinned flows, every keep-alive interval, each PoP on
        its own schedule (a slow round at one PoP does not delay the others')."""
        await asyncio.gather(*(self._keep_pop(i) for i in range(len(self.forwarders))))

    async def _keep_pop(self, i: int) -> None:
        interval = self.s.keepalive_interval_s()
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            if self._pinned[i]:
                await self._alive(i)
            due = max(due, loop.time() - interval)  # a late round does not bunch the next

    async def _alive(self, i: int) -> None:
        fw, keys, ka = self.forwarders[i], list(self._pinned[i]), self.tally.keepalive
        ka["calls"] += 1
        ka["keys"] += len(keys)
        try:
            answers = await fw.alive(keys)
        except DhtError:
            ka["failed"] += 1
            return
        ka["not-owned"] += sum(a.owner != fw.here for a in answers)

    # ------------------------------------------------------------------ progress

    async def _progress(self, enabled: bool) -> None:
        if not enabled:
            return
        tty = sys.stderr.isatty()
        last_line = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self.sim_now()
            base = bisect.bisect_right(self.baseline, now)
            hits = sum(f.stats.hits for f in self.forwarders)
            misses = sum(f.stats.misses for f in self.forwarders)
            real = time.monotonic() - self._t0
            line = (
                f"[{real:5.1f}/{self.s.duration_s:.0f} s] sim {now:6.0f} s  "
                f"connections {self.tally.connections:6d}  broken: with table "
                f"{len(self.tally.broken):4d}, plain anycast {base:4d}  tunnelled "
                f"{self.tally.tunnelled:5d}  cache hits {hits / max(1, hits + misses):6.1%}  "
                f"lag {1000 * self.tally.lag_s:4.0f} ms"
            )
            if tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            elif real - last_line >= 5:
                last_line = real
                print(line, file=sys.stderr, flush=True)
