"""``dht simulate``: anycast traffic with route flaps against a real multi-PoP cluster.

One forwarder per PoP (``dht.client.forwarder.Forwarder`` over ``dht.client.Client``) decides
every packet that lands on its PoP with the decision table of docs/protocol.md#decision-table; the
simulator carries tunnelled packets to their target PoP (whose forwarder serves them,
hop limit 1) and judges where each packet was served against where its connection
lives (the PoP that served its SYN). A packet served anywhere else breaks its
connection: "no-owner-known" (a miss with no affinity), "affinity-elsewhere" (the
client's affinity named another PoP), "wrong-owner" (the cache or table named another
PoP). The same traffic (``dht.tools.traffic``) is judged under plain anycast as the baseline.

One ``time_scale`` factor divides every simulated duration: flow lifetimes, packet gaps,
flaps, the record TTLs the forwarders ask for, the forwarders' cache lifetimes and the
nodes' ``replicate_after_s``, so a short run keeps realistic proportions. The load is
paced by the traffic's own schedule (the run falls behind rather than piling up: its
lag is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dht.client import Client
from dht.client.cache import CacheLimits
from dht.client.decision import Action, Packet
from dht.client.forwarder import Forwarder, ForwarderConfig, Outcome
from dht.core.errors import ConfigError
from dht.core.identity import Role
from dht.tools.certs import add_certs_flags, certs_dir, client_tls
from dht.tools.traffic import Flow, Traffic, TrafficConfig

SHIPPED_KINDS = ("established", "refresh", "tombstone", "affinity")
_SHIPPED = re.compile(r"^dht_pop_shipped_records(?:_total)?\{([^}]*)\}\s+(\S+)", re.M)


@dataclass(frozen=True)
class SimSettings:
    """Real seconds for ``duration_s``; every other duration in simulated seconds (the
    run divides them by ``time_scale``)."""

    duration_s: float = 45.0
    time_scale: float = 10.0
    seed: int = 1
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    # Nodes ship an established flow once it is this old (simulated s;
    # docs/protocol.md#the-replicate-after-trade-off).
    replicate_after_s: float = 5.0
    # TTLs the forwarders ask for (simulated s): embryonic, established.
    claim_ttl_s: float = 10.0
    confirm_ttl_s: float = 600.0
    # Forwarder cache: owner-change bound and negative lifetime (simulated s).
    owner_ttl_s: float = 5.0
    negative_ttl_s: float = 1.0
    batch_window_ms: float = 2.0  # real milliseconds
    batch_max_keys: int = 1_000
    sticky_clients: bool = False
    use_affinity: bool = True

    def real(self, sim_s: float) -> float:
        return sim_s / self.time_scale

    def forwarder_config(self) -> ForwarderConfig:
        owner = self.real(self.owner_ttl_s)
        confirm = max(1, round(self.real(self.confirm_ttl_s)))
        return ForwarderConfig(
            cache=CacheLimits(
                capacity=100_000, owner_ttl_s=owner, negative_ttl_s=self.real(self.negative_ttl_s)
            ),
            batch_window_ms=self.batch_window_ms,
            batch_max_keys=self.batch_max_keys,
            refresh_interval_s=owner / 3,
            refresh_ahead_s=confirm / 2,
            table_refresh_s=10.0,
            claim_ttl_s=max(1, round(self.real(self.claim_ttl_s))),
            confirm_ttl_s=confirm,
            sticky_clients=self.sticky_clients,
            use_affinity=self.use_affinity,
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    pop: str
    grpc: str
    admin: str


@dataclass
class Breakage:
    flow: int
    t_s: float  # simulated
    landed: str
    home: str
    reason: str
    age_s: float  # simulated seconds since the connection was confirmed


@dataclass
class Tally:
    """The table run's verdicts as they come in."""

    connections: int = 0
    packets: int = 0
    tunnelled: int = 0
    broken: list[Breakage] = field(default_factory=list)
    # Packets that landed on another PoP than their connection's, by how they were
    # handled: "record" (tunnelled by the record), "affinity" (tunnelled by the
    # client's affinity to the right PoP), or the breaking reason.
    foreign: Counter[str] = field(default_factory=Counter)
    # Of those, the ones whose record the landing PoP did not have (a flap before the
    # record was shipped, or before it was established): saved by affinity or broken.
    before_ship: Counter[str] = field(default_factory=Counter)
    lag_s: float = 0.0


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
        self._t0 = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # Plain anycast's verdicts (pure): break times, sorted.
        self._baseline = sorted(
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
        by_pop: dict[str, list[str]] = {}
        for e in self.endpoints:
            by_pop.setdefault(e.pop, []).append(e.grpc)
        before = await shipped_records([e.admin for e in self.endpoints if e.admin], self.certs)
        cfg = self.s.forwarder_config()
        try:
            for pop, targets in by_pop.items():
                tls = None
                if self.certs is not None:
                    tls = client_tls(self.certs, Role.FORWARDER, pop)
                    if tls is None:
                        raise ConfigError(f"no forwarder certificate for {pop} in {self.certs}")
                fw = Forwarder(Client(targets, tls=tls), pop, cfg, owns_client=True)
                await fw.start()
                self.forwarders.append(fw)
            # Traffic PoP i = the cluster's i-th PoP in wire-id order.
            ids = self.forwarders[0].client.pops
            self.forwarders.sort(key=lambda f: f.here)
            self.pop_names = [
                next(n for n, i in ids.items() if i == f.here) for f in self.forwarders
            ]
            if len(self.forwarders) < self.traffic.pops:
                raise ConfigError(
                    f"the traffic spans {self.traffic.pops} PoPs, the cluster has "
                    f"{len(self.forwarders)}"
                )
            started = time.monotonic()
            self._t0 = time.monotonic()
            reporter = asyncio.create_task(self._progress(progress))
            try:
                await self._drive()
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            wall = time.monotonic() - started
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for fw in self.forwarders:
                await fw.close()
        after = await shipped_records([e.admin for e in self.endpoints if e.admin], self.certs)
        shipped = {k: int(after.get(k, 0) - before.get(k, 0)) for k in SHIPPED_KINDS}
        return self.report(wall, shipped)

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

    async def _deliver(self, landed: int, key: bytes, packet: Packet) -> tuple[int, Outcome]:
        """A packet landing on PoP ``landed``: its forwarder decides; a tunnelled packet is
        carried to the target, whose forwarder serves it. Returns the serving PoP."""
        out = await self.forwarders[landed].handle(key, packet)
        if out.action is Action.TUNNEL:
            self.tally.tunnelled += 1
            target = self._index(out.target)
            await self.forwarders[target].handle(key, packet, tunnelled=True)
            return target, out
        return landed, out

    def _index(self, pop_id: int) -> int:
        for i, fw in enumerate(self.forwarders):
            if fw.here == pop_id:
                return i
        raise ConfigError(f"tunnel to unknown PoP id {pop_id}")

    async def _flow(self, flow: Flow) -> None:
        tr, tally = self.traffic, self.tally
        packets = tr.packets(flow)
        t, _ = packets[0]
        tally.connections += 1
        tally.packets += 1
        home, _ = await self._deliver(tr.route_at(flow.client, t), flow.key, Packet.SYN)
        confirmed = t + tr.handshake_s
        await self.until(confirmed)
        await self.forwarders[home].established(flow.key)
        for t, packet in packets[1:]:
            await self.until(t)
            tally.packets += 1
            landed = tr.route_at(flow.client, t)
            served, out = await self._deliver(landed, flow.key, packet)
            if landed == home and served == home:
                continue
            missed = out.answer is not None and out.answer.owner == 0
            if served == home:
                how = "affinity" if out.reason == "affinity" else "record"
                tally.foreign[how] += 1
                if missed:
                    tally.before_ship["saved-by-affinity"] += 1
                continue
            reason = {
                "unknown": "no-owner-known",
                "affinity": "affinity-elsewhere",
            }.get(out.reason, "wrong-owner")
            if (
                reason == "no-owner-known"
                and out.answer
                and out.answer.affinity == (self.forwarders[landed].here)
            ):
                # The client's affinity names the landing PoP itself (a newer connection
                # of this client started here after the flap): no use to the loop guard.
                reason = "affinity-is-here"
            tally.foreign[reason] += 1
            if missed:
                tally.before_ship[reason] += 1
            names = self.pop_names
            tally.broken.append(
                Breakage(flow.id, t, names[landed], names[home], reason, t - confirmed)
            )
            return  # reset: the connection is gone

    async def _progress(self, enabled: bool) -> None:
        if not enabled:
            return
        tty = sys.stderr.isatty()
        last_line = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self.sim_now()
            base = bisect.bisect_right(self._baseline, now)
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

    # ------------------------------------------------------------------ report

    def report(self, wall_s: float, shipped: Mapping[str, int]) -> dict[str, Any]:
        tr, tally = self.traffic, self.tally
        baseline = self._baseline
        stats = [f.stats for f in self.forwarders]
        lat = np.array([x for s in stats for x in s.miss_latency_s]) * 1000
        hits = sum(s.hits for s in stats)
        misses = sum(s.misses for s in stats)
        s = self.s
        return {
            "connections": tally.connections,
            "broken_with_table": len(tally.broken),
            "broken_without_table": len(baseline),
            "tunnelled_packets": tally.tunnelled,
            "packets": tally.packets,
            "lookups_sent": sum(x.lookups_sent for x in stats),
            "lookup_batches": sum(x.lookup_batches for x in stats),
            "coalesced": sum(x.coalesced for x in stats),
            "claims": sum(x.claims for x in stats),
            "cache_hit_rate": round(hits / max(1, hits + misses), 4),
            "miss_latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                "p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
                "count": int(lat.size),
            },
            "shipped_records": dict(shipped),
            "route_changes": len(tr.flaps),
            "foreign_packets": dict(tally.foreign),
            "flap_before_ship": dict(tally.before_ship),
            "broken_reasons": dict(Counter(b.reason for b in tally.broken)),
            "broken_examples": [vars(b) for b in tally.broken[:20]],
            "timeline": {
                "with_table_s": sorted(b.t_s for b in tally.broken),
                "without_table_s": sorted(baseline),
                "flaps_s": sorted({round(f.t_s, 3) for f in tr.flaps}),
            },
            "max_lag_ms": round(1000 * tally.lag_s, 1),
            "wall_s": round(wall_s, 1),
            "settings": {
                "pops": self.pop_names,
                "duration_s": s.duration_s,
                "simulated_s": tr.duration_s,
                "time_scale": s.time_scale,
                "seed": s.seed,
                "replicate_after_s": s.replicate_after_s,
                "owner_ttl_s": s.owner_ttl_s,
                "negative_ttl_s": s.negative_ttl_s,
                "sticky_clients": s.sticky_clients,
                "use_affinity": s.use_affinity,
                "clients": len(tr.addresses),
            },
        }


async def shipped_records(admins: Sequence[str], certs: Path | None) -> dict[str, float]:
    """Records acknowledged by peer PoPs, by kind, summed over the nodes' /metrics
    (over HTTPS, verified against the cluster's CA, when ``certs`` is given)."""
    import ssl

    import aiohttp

    total: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=5)
    scheme, ctx = "http", None
    if certs is not None:
        scheme, ctx = "https", ssl.create_default_context(cafile=str(certs / "ca.pem"))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for admin in admins:
            try:
                async with http.get(f"{scheme}://{admin}/metrics", ssl=ctx or True) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            for labels, value in _SHIPPED.findall(text):
                kind = re.search(r'kind="([^"]+)"', labels)
                if kind:
                    total[kind.group(1)] = total.get(kind.group(1), 0.0) + float(value)
    return total


# --------------------------------------------------------------------------- output


def format_report(r: Mapping[str, Any]) -> str:
    lat = r["miss_latency_ms"]
    shipped = ", ".join(f"{k} {v:,}" for k, v in r["shipped_records"].items())

    def pct(n: int) -> str:
        return f"{100 * n / max(1, r['connections']):.2f}%"

    st = r["settings"]
    lines = [
        f"simulated {st['simulated_s']:.0f} s of anycast traffic in {r['wall_s']} s "
        f"(time scale {st['time_scale']:g}, seed {st['seed']}) over PoPs "
        f"{', '.join(st['pops'])}; {r['route_changes']} route changes",
        f"connections            {r['connections']:,}",
        f"broken, plain anycast  {r['broken_without_table']:,} ({pct(r['broken_without_table'])})",
        f"broken, with the table {r['broken_with_table']:,} ({pct(r['broken_with_table'])})"
        + (f"  reasons: {r['broken_reasons']}" if r["broken_reasons"] else ""),
        f"packets                {r['packets']:,}, tunnelled {r['tunnelled_packets']:,}",
        f"look-ups sent          {r['lookups_sent']:,} keys in {r['lookup_batches']:,} "
        f"batches ({r['coalesced']:,} coalesced); cache hit rate {r['cache_hit_rate']:.1%}",
        f"miss latency           p50 {lat['p50']} ms, p99 {lat['p99']} ms "
        f"({lat['count']:,} misses)",
        f"records shipped        {shipped} (copies acknowledged by peer PoPs)",
        f"packets on a foreign PoP: {r['foreign_packets'] or 'none'}; of these, record not "
        f"there yet (a flap before it was shipped): {r['flap_before_ship'] or 'none'}",
        f"max lag behind schedule {r['max_lag_ms']} ms",
    ]
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    end = report["settings"]["simulated_s"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label, color in (
        ("without_table_s", "plain anycast (no table)", "tab:red"),
        ("with_table_s", "with the table (forwarders tunnel to the owner)", "tab:green"),
    ):
        ts = tl[key]
        ax.step([0, *ts, end], [0, *range(1, len(ts) + 1), len(ts)], where="post",
                label=label, color=color)  # fmt: skip
    for i, t in enumerate(tl["flaps_s"]):
        ax.axvline(t, color="grey", alpha=0.15, lw=0.8, label="route flap" if i == 0 else None)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("broken connections (cumulative)")
    ax.set_title(
        f"{report['connections']:,} connections over {len(report['settings']['pops'])} PoPs"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="anycast traffic with route flaps against a local multi-PoP cluster",
        description="Start a local cluster of N PoPs (or use --endpoints FILE), drive "
        "synthetic anycast traffic with route flaps through one forwarder per PoP, and "
        "report how many connections break with the table and under plain anycast.",
    )
    p.add_argument("--pops", type=int, default=3)
    p.add_argument("--nodes-per-pop", type=int, default=1)
    p.add_argument("--duration", type=float, default=45.0, help="real seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--time-scale",
        type=float,
        default=10.0,
        help="simulated seconds per real second; divides flow lifetimes, flaps, TTLs and "
        "replicate_after_s alike",
    )
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--flow-rate", type=float, default=12.0, help="new connections per sim s")
    p.add_argument("--flap-interval", type=float, default=20.0, help="sim s between flaps")
    p.add_argument("--flap-fraction", type=float, default=0.05, help="prefixes moved per flap")
    p.add_argument(
        "--replicate-after", type=float, default=5.0, help="sim s (nodes' replicate_after_s)"
    )
    p.add_argument(
        "--sticky", action="store_true", help="sticky clients (docs/protocol.md#decision-table)"
    )
    p.add_argument("--no-affinity", action="store_true", help="forwarders ignore affinity")
    p.add_argument("--endpoints", help="use a running cluster (`dht cluster --endpoints-file`)")
    add_certs_flags(p, "the cluster's certificates (made there when the simulation starts one)")
    p.add_argument(
        "--insecure", action="store_true", help="no TLS (a cluster without it; docs/security.md)"
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="PNG of broken connections over time, both ways")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    if args.time_scale <= 0 or args.duration <= 0:
        raise ConfigError("--time-scale and --duration must be positive")
    if args.pops < 2:
        raise ConfigError("--pops must be >= 2 (flaps move clients between PoPs)")
    traffic = replace(
        TrafficConfig(),
        pops=args.pops,
        clients=args.clients,
        duration_s=args.duration * args.time_scale,
        flow_rate_per_s=args.flow_rate,
        flap_interval_s=args.flap_interval,
        flap_fraction=args.flap_fraction,
    )
    return SimSettings(
        duration_s=args.duration,
        time_scale=args.time_scale,
        seed=args.seed,
        traffic=traffic,
        replicate_after_s=args.replicate_after,
        sticky_clients=args.sticky,
        use_affinity=not args.no_affinity,
    )


def load_endpoints(path: str) -> list[Endpoint]:
    try:
        with open(path) as f:
            nodes = json.load(f)["nodes"]
        return [Endpoint(n["pop"], n["grpc"], n.get("admin", "")) for n in nodes]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--endpoints {path}: {e}") from None


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_json(report: Mapping[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


async def run_simulate(args: argparse.Namespace) -> int:
    from dht.tools.cluster import LocalCluster, plan

    s = settings_from_args(args)
    traffic = Traffic.generate(s.traffic, s.seed)
    say(
        f"traffic: {len(traffic.flows):,} connections from {len(traffic.addresses)} clients, "
        f"{len(traffic.flaps)} route changes, over {s.traffic.duration_s:.0f} simulated s"
    )
    if args.endpoints:
        endpoints = load_endpoints(args.endpoints)
        say(
            f"using the cluster in {args.endpoints} ({len(endpoints)} nodes); its nodes keep "
            "their own replicate_after_s (the time scale applies to the forwarders only)"
        )
        certs = None if args.insecure else certs_dir(args)
        if certs is not None and not (certs / "ca.pem").exists():
            certs = None  # a cluster without TLS (`dht cluster --insecure`)
        report = await Simulation(s, endpoints, traffic, certs).run(not args.quiet)
    else:
        # Errors only: the nodes' warnings (a PoP smaller than the replication factor
        # runs with fewer copies, by design here) would interleave with the report.
        extra = [
            "--log-level",
            "error",
            "--replicate-after-s",
            f"{s.real(s.replicate_after_s):g}",
        ]
        certs = None if args.insecure else certs_dir(args)
        cluster = LocalCluster(plan(args.pops, args.nodes_per_pop), extra, tls_dir=certs)
        t0 = time.monotonic()
        async with cluster:
            say(
                f"started {len(cluster.nodes)} node processes ({args.pops} PoPs x "
                f"{args.nodes_per_pop}) in {time.monotonic() - t0:.1f} s"
            )
            endpoints = [Endpoint(n.spec.pop, n.spec.grpc, n.spec.admin) for n in cluster.nodes]
            report = await Simulation(s, endpoints, traffic, certs).run(not args.quiet)
    if sys.stderr.isatty() and not args.quiet:
        print(file=sys.stderr)
    print(format_report(report), flush=True)
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}", flush=True)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", flush=True)
    return 0
