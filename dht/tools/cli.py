"""The ``dht`` command. Signals, exit statuses and argument parsing live here only.

    dht node     run one node (flags and/or --config FILE)
    dht cluster  run a local cluster of node processes
    dht ctl      query and mutate records on a running node
    dht demo     start a local cluster, do real work with it, print what happened
    dht simulate anycast traffic with route flaps against a local multi-PoP cluster
    dht bench    benchmark batch lookups against a local cluster
    dht certs    make the cluster's CA and certificates (mutual TLS)

Exit status: 0 success, 1 runtime failure (unreachable node, ...), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from dht.core.errors import (
    ConfigError,
    DhtError,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    Unavailable,
)
from dht.tools.certs import add_certs_flags, certs_dir

log = logging.getLogger("dht")

FLOW_HELP = """\
FLOW grammar: PROTO/CLIENT/SERVICE, client endpoint first.
  PROTO     tcp | udp (any case)
  ENDPOINT  IPV4:PORT  or  [IPV6]:PORT   (PORT 1..65535; IPv6 in brackets)
  examples  tcp/198.51.100.7:51000/192.0.2.1:443
            udp/[2001:db8::7]:51000/[2001:db8::1]:443
An IPv4-mapped IPv6 address ([::ffff:192.0.2.1]) is the same key as the plain IPv4 one.
Both endpoints must be of the same family. Output uses the canonical form: lower-case
protocol, IPv4 dotted, IPv6 compressed lower-case in brackets. Give '-' to read FLOWs
from standard input, one per line (blank lines and lines starting with # are skipped).
"""


class UsageError(Exception):
    """Bad command-line input: exit status 2."""


def _comma_pairs(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: want NAME=ID[,NAME=ID...]")
        out[name.strip()] = int(value)
    return out


# --------------------------------------------------------------------------- dht node


def add_node_parser(sub: Any) -> None:
    p = sub.add_parser(
        "node",
        help="run one node",
        description="Run one DHT node. Flags override the --config file, which overrides "
        "the --profile defaults. With --announce the node prints one JSON line "
        '{"node_id","grpc","peer","admin","pid"} on stdout once it is ready (serving, and its '
        "partitions refilled from the other replicas).",
    )
    p.add_argument("--config", help="TOML configuration file (see dht/config.py for keys)")
    p.add_argument("--profile", choices=["local", "docker", "test"], help="default set (local)")
    p.add_argument("--node-id", help="unique id of this node inside its PoP")
    p.add_argument("--pop", help="this node's PoP name")
    p.add_argument("--pops", type=_comma_pairs, help="PoP names to wire ids, e.g. ams=1,fra=2")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--advertise-host", help="address peers and clients dial (default --host)")
    p.add_argument(
        "--grpc-port", type=int, help="public gRPC port, for forwarders (0 = pick a free one)"
    )
    p.add_argument(
        "--peer-port", type=int, help="peer-plane gRPC port, for other nodes (0 = a free one)"
    )
    p.add_argument("--admin-port", type=int, help="HTTP admin port (0 = free one, -1 = off)")
    p.add_argument(
        "--peers",
        nargs="+",
        metavar="ID=HOST:PORT[,ADMIN[,PEER]]",
        help="nodes of this PoP known in advance (more are learned by gossip)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        metavar="HOST:PORT",
        help="peer-plane addresses of running nodes of this PoP to join through",
    )
    p.add_argument(
        "--udp-lookup-port",
        type=int,
        help="UDP lookup listener (-1 off, 0 = the gRPC port's number; plaintext)",
    )
    p.add_argument(
        "--pop-peers",
        nargs="+",
        metavar="POP=HOST:PORT[,HOST:PORT...]",
        help="the other PoPs' nodes (peer-plane addresses): writes are shipped to them",
    )
    p.add_argument(
        "--dial-via",
        nargs="+",
        metavar="HOST:PORT=HOST:PORT",
        help="dial the second address instead of the first (a proxy in the path)",
    )
    p.add_argument(
        "--replicate-after-s",
        type=float,
        help="ship an established flow once it is this old (default 0: at once)",
    )
    p.add_argument(
        "--second-chance-timeout-s",
        type=float,
        help="how long a second-chance lookup waits for the other PoPs (default 0.15)",
    )
    p.add_argument("--replication-factor", type=int)
    p.add_argument("--num-partitions", type=int)
    p.add_argument("--max-records", type=int, help="soft limit: new claims refused beyond it")
    p.add_argument("--tls-cert", help="PEM certificate (enables TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--tls-ca", help="PEM CA: verify every caller's certificate (mutual TLS)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext on a non-loopback address (no TLS: anyone who reaches a port "
        "can change ownership; docs/security.md)",
    )
    p.add_argument("--admin-token-file", help="file holding the token for mutating admin calls")
    p.add_argument("--announce", action="store_true", help="print a JSON line once ready")
    p.add_argument(
        "--clock-offset-ms",
        type=int,
        default=0,
        help="run this node's wall clock this far ahead (or behind, < 0) of the machine's:"
        " fault tests of clocks apart by less than max_clock_offset_ms (dht chaos)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--event-loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="uvloop (the 'fast' extra) halves the UDP lookup's latency (docs/benchmarks.md)",
    )


def node_config(args: argparse.Namespace) -> Any:
    from dht.core.config import build_config, load_file

    values: dict[str, Any] = load_file(args.config) if args.config else {}
    flags = {
        "profile": args.profile,
        "node_id": args.node_id,
        "pop": args.pop,
        "pops": args.pops,
        "host": args.host,
        "advertise_host": args.advertise_host,
        "grpc_port": args.grpc_port,
        "peer_port": args.peer_port,
        "admin_port": args.admin_port,
        "udp_lookup_port": args.udp_lookup_port,
        "peers": args.peers,
        "seeds": args.seeds,
        "replication_factor": args.replication_factor,
        "num_partitions": args.num_partitions,
        "pop_peers": args.pop_peers,
        "dial_via": args.dial_via,
        "replicate_after_s": args.replicate_after_s,
        "second_chance_timeout_s": args.second_chance_timeout_s,
        "insecure": args.insecure or None,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.max_records is not None:
        limits = dict(values.get("limits", {}))
        limits["max_records"] = args.max_records
        limits.setdefault("hard_max_records", max(args.max_records, int(args.max_records * 1.2)))
        values["limits"] = limits
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        values["tls"] = {
            "cert_file": args.tls_cert,
            "key_file": args.tls_key,
            "ca_file": args.tls_ca,
        }
    if args.admin_token_file:
        with open(args.admin_token_file) as f:
            values["admin_token"] = f.read().strip()
    return build_config(values)


async def run_node(args: argparse.Namespace) -> int:
    from dht.edge.server import NodeServer

    cfg = node_config(args)
    offset = args.clock_offset_ms
    if abs(offset) > cfg.max_clock_offset_ms:
        raise ConfigError(
            f"--clock-offset-ms {offset}: beyond max_clock_offset_ms ({cfg.max_clock_offset_ms})"
        )
    srv = NodeServer(
        cfg, wall_ms=(lambda: time.time_ns() // 1_000_000 + offset) if offset else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await srv.start()
    if args.announce:
        # Announce readiness, not just listening: after the start-up refill (and the
        # resync from the other PoPs, bounded by pop_resync_timeout_s).
        await srv.node.first_sync.wait()
        await srv.pops.startup.wait()
        import os

        info = {
            "node_id": cfg.node_id,
            "grpc": srv.grpc_address,
            "peer": srv.peer_address,
            "admin": srv.admin_address,
            "pid": os.getpid(),
        }
        print(json.dumps(info), flush=True)
    try:
        await stop.wait()
        log.info("signal received: stopping node %s", cfg.node_id)
    finally:
        await srv.stop()
    return 0


# --------------------------------------------------------------------------- dht cluster


def add_cluster_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cluster",
        help="run a local cluster of node processes",
        description="Run a local cluster: N PoPs of M real `dht node` processes each. "
        "Prints the endpoints; once every node is ready writes --endpoints-file atomically "
        'as JSON {"nodes": [{"pop","node_id","grpc","admin","pid"}, ...]}; stops every node '
        "cleanly on Ctrl-C or SIGTERM. Every node knows the other PoPs' nodes "
        "(--pop-peers), so writes are shipped between the PoPs.",
    )
    p.add_argument("--pops", type=int, default=1)
    p.add_argument("--nodes-per-pop", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--base-port",
        type=int,
        help="first port; node i gets gRPC base+3i, admin base+3i+1, peer base+3i+2 "
        "(default: free ports)",
    )
    p.add_argument("--endpoints-file", help="write the endpoints JSON here once all are ready")
    add_certs_flags(p, "where the cluster makes (or reuses) its CA and certificates")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS: plaintext on every port (loopback only; docs/security.md)",
    )
    p.add_argument("node_args", nargs=argparse.REMAINDER, help="after --: extra `dht node` flags")


async def run_cluster(args: argparse.Namespace) -> int:
    from dht.tools.cluster import LocalCluster, plan

    extra = [a for a in args.node_args if a != "--"]
    certs = None if args.insecure else certs_dir(args)
    cluster = LocalCluster(
        plan(args.pops, args.nodes_per_pop, args.host, args.base_port), extra, tls_dir=certs
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await cluster.start()
    scheme = "http" if certs is None else "https"
    try:
        if certs is not None:
            print(f"mutual TLS: certificates in {certs} (dht ctl finds them there)", flush=True)
        for n in cluster.nodes:
            s = n.spec
            print(
                f"{s.pop:5} {s.node_id:10} grpc {s.grpc:21} peer {s.peer:21} "
                f"admin {scheme}://{s.admin}  pid {n.pid}",
                flush=True,
            )
        if args.endpoints_file:
            cluster.write_endpoints(args.endpoints_file)
            print(f"endpoints written to {args.endpoints_file}", flush=True)
        print("cluster ready; Ctrl-C stops it", flush=True)
        await stop.wait()
    finally:
        await cluster.stop()
    print("cluster stopped", flush=True)
    return 0


# --------------------------------------------------------------------------- dht ctl


def add_ctl_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="query and mutate records on a running node",
        description="Talk to a running node. Output: one JSON object per line per key.\n\n"
        + FLOW_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", required=True, help="HOST:PORT of any node of the PoP")
    p.add_argument("--timeout", type=float, default=5.0, help="per-call timeout, seconds")
    p.add_argument(
        "--tls-cert", help="PEM client certificate (default: the operator's in --certs-dir)"
    )
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    add_certs_flags(p, "where to find a local cluster's operator certificate")
    p.add_argument("--insecure", action="store_true", help="plaintext (a cluster without TLS)")
    ops = p.add_subparsers(dest="op", required=True)
    for op in ("claim", "confirm", "lookup", "refresh", "release"):
        o = ops.add_parser(
            op,
            help=f"{op} flows",
            description=FLOW_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        o.add_argument("flows", nargs="+", metavar="FLOW", help="flows, or - for standard input")
        if op != "lookup":
            o.add_argument("--pop", help="acting PoP name (default: the target node's PoP)")
        if op in ("claim", "confirm", "refresh"):
            o.add_argument(
                "--ttl", type=int, default=0, help="requested TTL, seconds (within server bounds)"
            )
        if op in ("claim", "confirm"):
            o.add_argument("--server", type=int, default=0, help="owning server id inside the PoP")
    aff = ops.add_parser("affinity", help="get or set client affinity (client prefix -> PoP)")
    aff_ops = aff.add_subparsers(dest="aff_op", required=True)
    g = aff_ops.add_parser("get")
    g.add_argument("clients", nargs="+", metavar="ADDR")
    s = aff_ops.add_parser("set")
    s.add_argument("clients", nargs="+", metavar="ADDR")
    s.add_argument("--pop", required=True, help="preferred PoP name")
    s.add_argument("--ttl", type=int, default=0)


def _read_flows(items: Sequence[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item == "-":
            out += [
                ln.strip() for ln in sys.stdin if ln.strip() and not ln.lstrip().startswith("#")
            ]
        else:
            out.append(item)
    return out


def client_tls(args: argparse.Namespace, pop: str = "") -> Any:
    """A tool's TLS settings: ``--tls-*`` flags; else, unless ``--insecure``, the
    operator's certificate (the forwarder's of ``pop``) in the certificate directory a
    local cluster made; else none (plaintext)."""
    from dht.core.config import TlsConfig
    from dht.core.identity import Role
    from dht.tools import certs

    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca)
    if args.insecure:
        return None
    role = Role.FORWARDER if pop else Role.OPERATOR
    return certs.client_tls(certs_dir(args), role, pop)


async def run_ctl(args: argparse.Namespace) -> int:
    from dht.client import Client
    from dht.core.wire import parse_address, parse_flow, result_to_dict

    tls = client_tls(args)
    if args.op == "affinity":
        addrs = [parse_address(a, "client") for a in args.clients]
    else:
        keys = [parse_flow(f) for f in _read_flows(args.flows)]
    client = Client([args.target], tls=tls, timeout_s=args.timeout)
    try:
        await client.refresh_table()
    except Unavailable as e:
        await client.close()
        if tls is not None and not args.tls_cert:
            # The certificates a local cluster made, against a node that may have none.
            raise Unavailable(
                f"{e}\n(calling with the operator certificate in {certs_dir(args)}; "
                "--insecure for a cluster without TLS)"
            ) from None
        raise
    async with client:
        names = {i: n for n, i in client.pops.items()}
        if args.op == "affinity":
            if args.aff_op == "get":
                res = await client.get_affinity(addrs)
            else:
                res = await client.set_affinity(addrs, args.pop, args.ttl)
            for addr, r in zip(addrs, res, strict=True):
                print(json.dumps({"client": str(addr), **result_to_dict(r, names)}))
            return 0
        pop = getattr(args, "pop", None)
        kwargs: dict[str, Any] = {}
        if args.op != "lookup":
            kwargs["pop"] = pop
        if args.op in ("claim", "confirm", "refresh"):
            kwargs["ttl_s"] = args.ttl
        if args.op in ("claim", "confirm"):
            kwargs["server"] = args.server
        results = await getattr(client, args.op)(keys, **kwargs)
        for key, r in zip(keys, results, strict=True):
            print(json.dumps({"flow": str(key), **result_to_dict(r, names)}))
    # Every key was answered, but some only with "unavailable": the caller must retry.
    from dht.core.record import Status

    return 1 if any(r.status == Status.UNAVAILABLE for r in results) else 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dht",
        description="Distributed connection-ownership table for anycast networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_node_parser(sub)
    add_cluster_parser(sub)
    add_ctl_parser(sub)
    from dht.tools.bench import add_bench_parser
    from dht.tools.demo import add_demo_parser
    from dht.tools.simulate import add_simulate_parser

    add_demo_parser(sub)
    add_simulate_parser(sub)
    add_bench_parser(sub)
    from dht.tools.chaos.run import add_chaos_parser

    add_chaos_parser(sub)
    from dht.tools import certs

    certs.add_parser(sub)
    from dht.tools.lab.run import add_lab_parser

    add_lab_parser(sub)
    from dht.tools.forwarder.cli import add_forwarder_parser

    add_forwarder_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "warning")).upper(), logging.INFO)
        if args.command == "node"
        else logging.WARNING,
        # A node's lines name it: the nodes of a local cluster share one terminal.
        format="%(asctime)s "
        + (f"{args.node_id} " if args.command == "node" and args.node_id else "")
        + "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "certs":
        from dht.tools.certs import run_certs

        return run_certs(args)
    runners = {"node": run_node, "cluster": run_cluster, "ctl": run_ctl}
    from dht.tools.bench import run_bench
    from dht.tools.demo import run_demo
    from dht.tools.simulate import run_simulate

    runners["demo"] = run_demo
    runners["simulate"] = run_simulate
    runners["bench"] = run_bench
    from dht.tools.chaos.run import run_chaos

    runners["chaos"] = run_chaos
    from dht.tools.lab.run import run_lab

    runners["lab"] = run_lab
    from dht.tools.forwarder.cli import run_forwarder

    runners["forwarder"] = run_forwarder
    try:
        with contextlib.suppress(KeyboardInterrupt):
            if getattr(args, "event_loop", "asyncio") == "uvloop":
                import uvloop

                return uvloop.run(runners[args.command](args))
            return asyncio.run(runners[args.command](args))
        return 130
    except (InvalidArgument, ConfigError, UsageError) as e:
        print(f"dht {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (LimitExceeded, PermissionDenied, DhtError, OSError) as e:
        print(f"dht {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
