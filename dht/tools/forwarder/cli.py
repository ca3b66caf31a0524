"""``dht forwarder``: arguments, signals, READY (docs/forwarder.md#the-command).

    dht forwarder --pop NAME --nodes HOST:PORT[,...] --service ADDR [--service ADDR6]
                  --next-hop POP=ADDR [...] --backbone-if IFNAME [--queue-num N]
                  [--metrics-port P] [--insecure | --certs-dir DIR] [--pin-timeout-s S]
    dht forwarder --cleanup

Prints ``METRICS HOST:PORT`` (with --metrics-port) and then ``READY`` on stdout once the
data plane is set up; logs go to stderr. SIGTERM/SIGINT: tear down and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from dht.core.errors import ConfigError, Unavailable
from dht.tools.forwarder.config import (
    AgentConfig,
    parse_next_hop,
    parse_nodes,
    parse_service,
)

if TYPE_CHECKING:
    from dht.client.forwarder import Forwarder, ForwarderConfig
    from dht.core.config import TlsConfig

log = logging.getLogger("dht.forwarder")

# The nodes may start at the same moment as the agent: it retries this long.
NODES_WAIT_S = 30.0


def add_forwarder_parser(sub: Any) -> None:
    p = sub.add_parser(
        "forwarder",
        help="run a PoP's packet forwarder agent (Linux, root; docs/forwarder.md)",
        description="A per-PoP forwarder: nftables map + fwmark tables in the kernel, "
        "NFQUEUE upcalls decided through the table (docs/forwarder.md).",
    )
    p.add_argument("--pop", help="this PoP's name")
    p.add_argument(
        "--nodes", action="append", default=[], help="this PoP's dht nodes, HOST:PORT[,...]"
    )
    p.add_argument(
        "--service", action="append", default=[], help="an anycast service address (repeat)"
    )
    p.add_argument(
        "--next-hop",
        action="append",
        default=[],
        metavar="POP=ADDR",
        help="another PoP's backbone address (repeat; once per family)",
    )
    p.add_argument("--backbone-if", help="the interface facing the other PoPs")
    p.add_argument("--queue-num", type=int, default=0, help="NFQUEUE number (default 0)")
    p.add_argument("--metrics-port", type=int, default=0, help="/metrics on 127.0.0.1 (0: none)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plaintext to the nodes")
    tls.add_argument(
        "--certs-dir",
        help="the cluster's certificates (default: $DHT_CERTS_DIR, else ~/.config/dht/certs)",
    )
    p.add_argument(
        "--pin-timeout-s", type=float, default=300.0,
        help="lifetime of a pin toward this PoP, re-armed while conntrack holds the flow",
    )  # fmt: skip
    p.add_argument(
        "--owner-ttl-s", type=float, default=5.0,
        help="the cache's owner-change bound; a pin toward another PoP lives at most this",
    )  # fmt: skip
    p.add_argument(
        "--refresh-ahead-s", type=float, default=60.0,
        help="refresh owned records expiring within this (docs/api.md#keep-alive)",
    )  # fmt: skip
    p.add_argument("--keepalive-s", type=float, default=2.5, help="keep-alive round interval")
    p.add_argument(
        "--cleanup", action="store_true", help="remove everything the agent may have added, exit"
    )
    p.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The validated configuration (ConfigError on bad input)."""
    missing = [
        flag
        for flag, value in (
            ("--pop", args.pop),
            ("--nodes", args.nodes),
            ("--service", args.service),
            ("--backbone-if", args.backbone_if),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    return AgentConfig(
        pop=args.pop,
        nodes=parse_nodes(args.nodes),
        services=tuple(parse_service(s) for s in args.service),
        next_hops=tuple(parse_next_hop(h) for h in args.next_hop),
        backbone_if=args.backbone_if,
        queue_num=args.queue_num,
        metrics_port=args.metrics_port,
        insecure=args.insecure,
        certs_dir=args.certs_dir,
        pin_timeout_s=args.pin_timeout_s,
        owner_ttl_s=args.owner_ttl_s,
        refresh_ahead_s=args.refresh_ahead_s,
        keepalive_interval_s=args.keepalive_s,
    )


async def run_forwarder(args: argparse.Namespace) -> int:
    logging.getLogger("dht").setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    from dht.tools.forwarder import system

    if args.cleanup:
        await asyncio.to_thread(system.cleanup)
        left = await asyncio.to_thread(system.leftovers)
        if left:
            print(f"dht forwarder: left behind: {left}", file=sys.stderr)
            return 1
        return 0
    config = config_from_args(args)
    return await serve(config)


async def serve(config: AgentConfig) -> int:
    import importlib.util

    if importlib.util.find_spec("netfilterqueue") is None:
        raise ConfigError(
            "needs the forwarder extra: pip install 'dht[forwarder]' "
            "(Debian: libnetfilter-queue-dev gcc python3-dev first; docs/forwarder.md#installing)"
        )
    from dht.client.cache import CacheLimits
    from dht.client.forwarder import ForwarderConfig
    from dht.tools.certs import client_tls, default_dir
    from dht.tools.forwarder.agent import Agent

    tls = None
    if not config.insecure:
        from pathlib import Path

        from dht.core.identity import Role

        directory = Path(config.certs_dir) if config.certs_dir else default_dir()
        tls = client_tls(directory, Role.FORWARDER, config.pop)
        if tls is None:
            raise ConfigError(
                f"no forwarder certificate for PoP {config.pop!r} in {directory} "
                "(dht certs, or --insecure)"
            )
    fw_config = ForwarderConfig(
        cache=CacheLimits(owner_ttl_s=config.owner_ttl_s),
        refresh_ahead_s=config.refresh_ahead_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fw = await _open(config, fw_config, tls, stop)
    if fw is None:
        return 0
    agent = Agent(config, fw)
    try:
        await agent.start()
        server = None
        if config.metrics_port:
            from prometheus_client import start_http_server

            server, _ = start_http_server(
                config.metrics_port, config.metrics_host, registry=agent.metrics.registry
            )
            print(f"METRICS {config.metrics_host}:{server.server_port}", flush=True)
        print("READY", flush=True)
        log.info("forwarder for PoP %s ready (id %d)", config.pop, fw.here)
        await stop.wait()
        log.info("stopping")
        if server is not None:
            server.shutdown()
            server.server_close()
    finally:
        await agent.stop()
        await fw.close()
    return 0


async def _open(
    config: AgentConfig, fw_config: ForwarderConfig, tls: TlsConfig | None, stop: asyncio.Event
) -> Forwarder | None:
    """A started Forwarder, retrying while the nodes do not answer (NODES_WAIT_S); None
    if asked to stop meanwhile."""
    from dht.client.forwarder import Forwarder

    loop = asyncio.get_running_loop()
    deadline = loop.time() + NODES_WAIT_S
    while True:
        try:
            return await Forwarder.open(list(config.nodes), config.pop, fw_config, tls=tls)
        except Unavailable as e:
            if loop.time() >= deadline:
                raise
            log.info("waiting for the nodes: %s", str(e).splitlines()[0])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if stop.is_set():
            return None
