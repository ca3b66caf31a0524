"""``dht simulate``: anycast traffic with route flaps against a real multi-PoP cluster
(docs/simulator.md). The command line lives here; the run, its verdicts and its report
in ``dht.tools.sim``, the traffic in ``dht.tools.traffic``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from dht.core.errors import ConfigError
from dht.tools.certs import add_certs_flags, certs_dir
from dht.tools.sim.report import format_report, plot
from dht.tools.sim.run import Simulation
from dht.tools.sim.settings import Endpoint, SimSettings
from dht.tools.traffic import Traffic, TrafficConfig

__all__ = [
    "Endpoint",
    "SimSettings",
    "Simulation",
    "add_simulate_parser",
    "format_report",
    "run_simulate",
]


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
        "--replicate-after",
        type=float,
        default=0.0,
        help="sim s: the nodes' replicate_after_s (0, the nodes' default: ship at once)",
    )
    p.add_argument(
        "--established-ttl",
        type=float,
        default=60.0,
        help="sim s: the TTL the forwarders ask for established records (short, so what "
        "is not kept alive lapses during the run)",
    )
    p.add_argument("--udp-share", type=float, default=0.2, help="share of flows that are UDP")
    p.add_argument(
        "--pinned-share",
        type=float,
        default=0.25,
        help="share of flows held in the data plane once established (kept by alive())",
    )
    p.add_argument(
        "--syn-loss", type=float, default=0.02, help="share of first SYN-ACKs lost (SYN sent again)"
    )
    p.add_argument(
        "--sticky", action="store_true", help="sticky clients (docs/protocol.md#decision-table)"
    )
    p.add_argument("--no-affinity", action="store_true", help="forwarders ignore affinity")
    p.add_argument(
        "--no-second-chance",
        action="store_true",
        help="look-ups do not ask the other PoPs (docs/protocol.md#second-chance)",
    )
    p.add_argument(
        "--second-chance-timeout",
        type=float,
        help="real s: the second-chance deadline of the nodes it starts (default: theirs, "
        "0.15); a machine too busy to answer within it breaks connections for it",
    )
    p.add_argument(
        "--no-keepalive",
        action="store_true",
        help="never call alive() for the pinned flows (their records lapse)",
    )
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
    if args.established_ttl <= 0 or args.replicate_after < 0:
        raise ConfigError("--established-ttl must be positive, --replicate-after >= 0")
    if args.second_chance_timeout is not None and not 0 < args.second_chance_timeout <= 5:
        raise ConfigError("--second-chance-timeout must be within (0, 5] seconds")
    for name in ("udp_share", "pinned_share", "syn_loss"):
        if not 0 <= getattr(args, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be within 0..1")
    traffic = replace(
        TrafficConfig(),
        pops=args.pops,
        clients=args.clients,
        duration_s=args.duration * args.time_scale,
        flow_rate_per_s=args.flow_rate,
        flap_interval_s=args.flap_interval,
        flap_fraction=args.flap_fraction,
        udp_share=args.udp_share,
        pinned_share=args.pinned_share,
        syn_loss=args.syn_loss,
    )
    return SimSettings(
        duration_s=args.duration,
        time_scale=args.time_scale,
        seed=args.seed,
        traffic=traffic,
        replicate_after_s=args.replicate_after,
        established_ttl_s=args.established_ttl,
        sticky_clients=args.sticky,
        use_affinity=not args.no_affinity,
        second_chance=not args.no_second_chance,
        second_chance_timeout_s=args.second_chance_timeout,
        keepalive=not args.no_keepalive,
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
        f"traffic: {len(traffic.flows):,} connections ({traffic.kinds().get('udp', 0):,} UDP) "
        f"from {len(traffic.addresses)} clients, {len(traffic.flaps)} route changes, over "
        f"{s.traffic.duration_s:.0f} simulated s"
    )
    if args.endpoints:
        endpoints = load_endpoints(args.endpoints)
        say(
            f"using the cluster in {args.endpoints} ({len(endpoints)} nodes); its nodes keep "
            "their own replicate_after_s and second-chance deadline (the time scale applies "
            "to the forwarders only)"
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
        if s.second_chance_timeout_s is not None:
            extra += ["--second-chance-timeout-s", f"{s.second_chance_timeout_s:g}"]
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
