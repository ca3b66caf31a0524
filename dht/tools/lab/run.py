"""``dht lab``: one run of a schedule through real namespaces, once without and once with
the forwarders (docs/lab.md). The topology and its cleanup are in ``netns``, the
schedule in ``plan``, the traffic in ``client`` (run inside the client's namespace), the
report in ``report``.

A phase: build the namespaces; with the forwarders, start one ``dht node`` per PoP on its
backbone address (``NetnsCluster``, plaintext: the backbone is the lab's own bridge) and
one ``dht forwarder`` per PoP; start an echo server per PoP; run the client; read the
agents' ``/metrics``; stop everything and remove the namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dht.core.errors import ConfigError, DhtError
from dht.tools.cluster import LocalCluster, NodeProcess, NodeSpec
from dht.tools.lab import netns
from dht.tools.lab.plan import (
    ECHO_PORT,
    METRICS_PORT,
    NODE_ADMIN_PORT,
    NODE_GRPC_PORT,
    NODE_PEER_PORT,
    POP_BACKBONE_IF,
    SERVICE_V4,
    SERVICE_V6,
    AddressPlan,
    Schedule,
    address_plan,
    make_schedule,
)
from dht.tools.lab.report import build_report, format_report, phase_summary, plot

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class NetnsCluster(LocalCluster):
    """A ``LocalCluster`` whose nodes each run inside their PoP's namespace."""

    def __init__(self, specs: Sequence[NodeSpec], extra: Sequence[str], ns_of: Mapping[str, str]):
        super().__init__(specs, extra, start_timeout_s=READY_TIMEOUT_S)
        self.ns_of = dict(ns_of)

    async def _exec(self, spec: NodeSpec, args: list[str]) -> NodeProcess:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns_of[spec.pop], sys.executable, "-m", "dht", *args,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return NodeProcess(spec, proc, args)


def node_specs(plan: AddressPlan) -> list[NodeSpec]:
    return [
        NodeSpec(
            p.name, f"{p.name}-1", p.backbone_v4, NODE_GRPC_PORT, NODE_ADMIN_PORT, NODE_PEER_PORT
        )
        for p in plan.pops
    ]


def forwarder_args(plan: AddressPlan, pop: str) -> list[str]:
    """The ``dht forwarder`` command line of one PoP (the agent's CLI contract)."""
    me = plan.pop(pop)
    hops = []
    for p in plan.pops:
        if p.name != pop:
            hops += ["--next-hop", f"{p.name}={p.backbone_v4}"]
            hops += ["--next-hop", f"{p.name}={p.backbone_v6}"]
    return [
        "forwarder", "--pop", pop, "--nodes", f"{me.backbone_v4}:{NODE_GRPC_PORT}",
        "--service", SERVICE_V4, "--service", SERVICE_V6, *hops,
        "--backbone-if", POP_BACKBONE_IF, "--metrics-port", str(METRICS_PORT), "--insecure",
    ]  # fmt: skip


class Phase:
    """One run of the schedule: ``run()`` returns the client's result and the agents'
    ``/metrics`` (``None`` without the forwarders). Everything it starts is stopped, and
    its namespaces removed, before ``run()`` returns or raises."""

    def __init__(
        self,
        s: Schedule,
        forwarders: bool,
        established_ttl_s: float | None,
        reply_timeout_s: float,
        progress: Callable[[Mapping[str, Any]], None],
        logs: Path | None,
        forwarder_extra: Sequence[str] = (),
    ) -> None:
        self.forwarder_extra = list(forwarder_extra)
        self.s = s
        self.forwarders = forwarders
        self.established_ttl_s = established_ttl_s
        self.reply_timeout_s = reply_timeout_s
        self.progress = progress
        self.logs = logs
        self.plan = address_plan(s.pops, s.routes)
        self.names = netns.Names(netns.new_prefix(), tuple(p.name for p in self.plan.pops))
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []
        self.work = Path(tempfile.gettempdir())  # the run's own directory, from run()
        self.log_paths: dict[str, Path] = {}
        self._drains: set[asyncio.Task[None]] = set()

    async def run(self) -> tuple[dict[str, Any], dict[str, str] | None]:
        state = netns.LabState.create(self.names.prefix)
        work = self.work = Path(tempfile.mkdtemp(prefix=f"{self.names.prefix}-"))
        state.add_dir(work)
        cluster: NetnsCluster | None = None
        try:
            await asyncio.to_thread(netns.build, self.plan, self.names, state, self.s.initial)
            if self.forwarders:
                cluster = NetnsCluster(
                    node_specs(self.plan), self._node_flags(work), self.names_by_pop()
                )
                await cluster.start()
                await asyncio.gather(*(self._start_forwarder(p.name) for p in self.plan.pops))
            await asyncio.gather(*(self._start_echo(p.name) for p in self.plan.pops))
            result = await self._client(work)
            agents = await self._scrape() if self.forwarders else None
            return result, agents
        finally:
            await self._stop()
            if cluster is not None:
                await cluster.stop(STOP_TIMEOUT_S)
            for t in self._drains:
                t.cancel()
            await asyncio.gather(*self._drains, return_exceptions=True)
            await asyncio.to_thread(netns.remove, state)

    def names_by_pop(self) -> dict[str, str]:
        return {p.name: self.names.pop(p.name) for p in self.plan.pops}

    def _node_flags(self, work: Path) -> list[str]:
        flags = ["--insecure", "--log-level", "error"]
        if self.established_ttl_s is not None:
            conf = work / "node.toml"
            conf.write_text(f"[ttl]\nestablished_tcp_s = {self.established_ttl_s:g}\n")
            flags += ["--config", str(conf)]
        return flags

    def _log(self, name: str) -> Any:
        """The stderr file of a process: in ``--logs`` (kept) or the run's directory."""
        where = self.logs or self.work
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"{self.names.prefix}-{name}.log"
        self.log_paths[name] = path
        return open(path, "wb")

    def _log_tail(self, name: str, lines: int = 5) -> str:
        path = self.log_paths.get(name)
        try:
            text = path.read_text(errors="replace") if path else ""
        except OSError:
            return ""
        tail = text.strip().splitlines()[-lines:]
        return (":\n  " + "\n  ".join(tail)) if tail else ""

    async def _spawn(self, name: str, pop_ns: str, *args: str) -> asyncio.subprocess.Process:
        log = self._log(name)
        try:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", pop_ns, sys.executable, *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    async def _wait_ready(self, name: str, proc: asyncio.subprocess.Process, log: str = "") -> None:
        """Wait for the ``READY`` line, then drain stdout so the process never blocks."""
        assert proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), max(0.01, left))
            except TimeoutError:
                raise DhtError(
                    f"{name} not READY after {READY_TIMEOUT_S:g} s{self._log_tail(log)}"
                ) from None
            if not line:
                code = await proc.wait()
                raise DhtError(
                    f"{name} exited with status {code} before READY{self._log_tail(log)}"
                )
            if line.strip() == b"READY":
                break
        task = asyncio.create_task(self._drain(proc.stdout))
        self._drains.add(task)

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def _start_forwarder(self, pop: str) -> None:
        proc = await self._spawn(
            f"forwarder-{pop}",
            self.names.pop(pop),
            "-m",
            "dht",
            *forwarder_args(self.plan, pop),
            *self.forwarder_extra,
        )
        await self._wait_ready(f"forwarder {pop}", proc, f"forwarder-{pop}")

    async def _start_echo(self, pop: str) -> None:
        proc = await self._spawn(
            f"echo-{pop}", self.names.pop(pop), "-m", "dht.tools.lab.echo",
            "--pop", pop, "--port", str(ECHO_PORT),
        )  # fmt: skip
        await self._wait_ready(f"echo {pop}", proc, f"echo-{pop}")

    async def _client(self, work: Path) -> dict[str, Any]:
        conf = work / "client.json"
        conf.write_text(
            json.dumps(
                {
                    "schedule": self.s.to_json(),
                    "router_ns": self.names.router,
                    "reply_timeout_s": self.reply_timeout_s,
                }
            )
        )
        proc = await self._spawn("client", self.names.client, "-m", "dht.tools.lab.client",
                                 str(conf))  # fmt: skip
        assert proc.stdout is not None
        result: dict[str, Any] | None = None
        limit = self.s.duration_s + self.reply_timeout_s + 30
        deadline = time.monotonic() + limit
        while True:
            try:
                line = await asyncio.wait_for(
                    proc.stdout.readline(), max(0.01, deadline - time.monotonic())
                )
            except TimeoutError:
                raise DhtError(f"the lab client did not finish within {limit:g} s") from None
            if not line:
                break
            msg = json.loads(line)
            if "progress" in msg:
                self.progress(msg["progress"])
            elif "result" in msg:
                result = msg["result"]
        code = await proc.wait()
        if result is None:
            raise DhtError(
                f"the lab client exited with status {code} and no result{self._log_tail('client')}"
            )
        return result

    async def _scrape(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in self.plan.pops:
            code = (
                "import sys, urllib.request\n"
                "for h in ('127.0.0.1', sys.argv[1]):\n"
                "    try:\n"
                f"        u = 'http://%s:{METRICS_PORT}/metrics' % h\n"
                "        sys.stdout.write(urllib.request.urlopen(u, timeout=3).read().decode())\n"
                "        break\n"
                "    except OSError:\n"
                "        pass\n"
            )
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.names.pop(p.name), sys.executable, "-c", code,
                p.backbone_v4, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            text, _ = await proc.communicate()
            out[p.name] = text.decode(errors="replace")
        return out

    async def _stop(self) -> None:
        """SIGTERM what this phase started (forwarders first: they tear down), then
        SIGKILL whatever has not ended after ``STOP_TIMEOUT_S``."""
        for _, proc in reversed(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for _, p in self.procs]
        if waits:
            await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            for _, proc in self.procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*waits, return_exceptions=True)


# --------------------------------------------------------------------------- CLI


def add_lab_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lab",
        help="a real anycast lab in network namespaces (root): route changes vs TCP",
        description="Build client, router, N PoPs and a backbone in network namespaces, "
        "run a dht node, a forwarder and an echo server per PoP, open long-lived TCP "
        "connections (IPv4 and IPv6) and move the client's routes on a schedule from a "
        "seed; once without and once with the forwarders; report the broken connections "
        "and set-up times (docs/lab.md). Root only.",
    )
    p.add_argument("--pops", type=int, default=3)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--flaps", type=int, default=30, help="route changes")
    p.add_argument("--routes", type=int, default=4, help="client source addresses routed apart")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--duration", type=float, help="seconds a run (default: 1 + 0.5 per route change + 4)"
    )
    p.add_argument(
        "--established-ttl",
        type=float,
        help="seconds: the nodes' TTL of established records (shorter than the run: the "
        "agents must keep pinned flows alive)",
    )
    p.add_argument("--send-interval", type=float, default=0.1, help="seconds between sends")
    p.add_argument("--reply-timeout", type=float, default=3.0, help="seconds: a lost reply")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--both", action="store_true", help="without, then with (the default)")
    which.add_argument("--no-forwarders", action="store_true", help="plain anycast only")
    which.add_argument("--forwarders-only", action="store_true", help="with the forwarders only")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="PNG of broken connections over time, both runs")
    p.add_argument("--logs", help="keep the agents', echo servers' and client's stderr here")
    p.add_argument(
        "--forwarder-args",
        default="",
        help="extra flags for every `dht forwarder`, one string after = "
        '(say --forwarder-args="--log-level debug")',
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every namespace (and process in it) a lab run recorded, then exit",
    )


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    if args.send_interval <= 0 or args.reply_timeout <= 0:
        raise ConfigError("--send-interval and --reply-timeout must be positive")
    if args.established_ttl is not None and args.established_ttl < 1:
        raise ConfigError("--established-ttl must be >= 1 s")
    return make_schedule(
        seed=args.seed,
        pops=args.pops,
        connections=args.connections,
        flaps=args.flaps,
        routes=args.routes,
        duration_s=args.duration,
        send_interval_s=args.send_interval,
    )


def _progress_printer(
    label: str, s: Schedule, enabled: bool
) -> Callable[[Mapping[str, Any]], None]:
    tty = sys.stderr.isatty()

    def show(p: Mapping[str, Any]) -> None:
        if not enabled:
            return
        line = (
            f"[{label}] {p['t']:5.1f}/{s.duration_s:g} s  open {p['open']:4}  "
            f"broken {p['broken']:4}  route changes {p['flaps']}/{len(s.flaps)}"
        )
        if tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif int(p["t"] * 2) % 10 == 0:  # every 5 s in a log
            print(line, file=sys.stderr, flush=True)

    return show


async def run_lab(args: argparse.Namespace) -> int:
    if args.cleanup:
        removed = await asyncio.to_thread(netns.remove_all)
        print(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    if os.geteuid() != 0:
        raise ConfigError("dht lab needs root (network namespaces)")
    s = schedule_from_args(args)
    say(
        f"schedule: {len(s.conns)} connections, {len(s.flaps)} route changes on {s.routes} "
        f"routes over {s.duration_s:g} s, {s.pops} PoPs, seed {s.seed}"
    )
    # SIGTERM ends the run like Ctrl-C: each phase stops what it started and removes its
    # namespaces on the way out (SIGKILL leaves them to `dht lab --cleanup`).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _run_phases(args, s)
    except asyncio.CancelledError:
        raise DhtError("stopped (SIGTERM); everything it made is removed") from None


async def _run_phases(args: argparse.Namespace, s: Schedule) -> int:
    modes = [False] if args.no_forwarders else [True] if args.forwarders_only else [False, True]
    logs = Path(args.logs) if args.logs else None
    summaries: dict[str, dict[str, Any]] = {}
    for on in modes:
        label = "with forwarders" if on else "without forwarders"
        phase = Phase(s, on, args.established_ttl, args.reply_timeout,
                      _progress_printer(label, s, not args.quiet), logs,
                      shlex.split(args.forwarder_args))  # fmt: skip
        t0 = time.monotonic()
        result, agents = await phase.run()
        if sys.stderr.isatty() and not args.quiet:
            print(file=sys.stderr)
        ph = phase_summary(s, result, agents)
        summaries["with" if on else "without"] = ph
        say(f"{label}: {ph['broken']} broken of {ph['connections']} "
            f"({time.monotonic() - t0:.1f} s)")  # fmt: skip
    report = build_report(s, summaries)
    print(format_report(report), flush=True)
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}", flush=True)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", flush=True)
    return 0
