"""``dht chaos``: a workload, a nemesis and the history checker against a local PoP.

    dht chaos --duration 120 --seed 7            # one run: progress lines, then a verdict
    dht chaos --check chaos-7.jsonl              # check a recorded history again

Starts one PoP of ``--nodes`` real node processes (the test timing profile, mutual TLS
like ``dht cluster`` unless ``--insecure``), then for ``--duration`` seconds runs:

* the workload (:class:`Workload`): an open loop of claims of fresh flows, confirms and
  releases of some of them, and look-ups of flows claimed so far, as a forwarder of the
  PoP, every key's every call recorded (dht.tools.chaos.history);
* the nemesis (dht.tools.chaos.nemesis): the faults of ``--faults`` on a schedule drawn
  from ``--seed``; with link faults, every link between two nodes runs through a proxy
  of this process (dht.tools.chaos.proxy).

Then it heals every fault, waits for the PoP to settle, looks every flow up once more, and
checks the history. Exit status 0 when the history holds to the model, 1 when it does not
(the violations are printed, and the history is written to ``--history``, by default
``chaos-SEED.jsonl``, so the run can be checked again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import signal
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from dht.client import Client
from dht.core.config import NodeConfig
from dht.core.errors import ConfigError
from dht.core.identity import Role
from dht.core.record import Status
from dht.core.wire import KEY_SIZE, FlowKey
from dht.tools.bench.keys import synthetic_keys
from dht.tools.certs import add_certs_flags, certs_dir, client_tls
from dht.tools.chaos.history import History, Operation, check, outcome_of
from dht.tools.chaos.nemesis import CLOCK_SHARE, KINDS, Fault, Nemesis, plan_clocks, plan_faults
from dht.tools.chaos.proxy import Proxy
from dht.tools.cluster import LocalCluster, NodeSpec, plan

TTL_S = 600  # every claim outlives the run: the checker needs no expiry
POP = "ams"


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Workload:
    """Open-loop calls at fixed rates; a slot whose call would exceed ``max_in_flight``
    is skipped (counted), so a slow PoP is not buried under a backlog."""

    client: Client
    history: History
    rng: random.Random
    claims_per_s: float = 50.0
    lookups_per_s: float = 100.0
    batch: int = 10
    max_in_flight: int = 32
    pool: bytes = b""
    claimed: list[bytes] = field(default_factory=list)  # attempted (any outcome)
    acked: list[bytes] = field(default_factory=list)
    confirmed: list[bytes] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    _next: int = 0
    _in_flight: int = 0
    _names: dict[bytes, str] = field(default_factory=dict)

    def name(self, key: bytes) -> str:
        got = self._names.get(key)
        if got is None:
            got = self._names[key] = str(FlowKey.from_bytes(key))
        return got

    async def call(self, kind: str, keys: list[bytes], who: str = "workload") -> list[Status]:
        method = {"claim": "Claim", "confirm": "Confirm", "release": "Release"}.get(kind, "Lookup")
        pop = 0 if kind == "lookup" else self.client.pops[POP]
        raw = b"".join(keys)
        t0 = time.monotonic()
        try:
            if kind == "lookup":
                res = await self.client.flow_packed(method, raw)
            else:
                ttl = TTL_S if kind in ("claim", "confirm") else 0
                res = await self.client.flow_packed(method, raw, pop=POP, ttl_s=ttl)
        except Exception as e:  # an answer nobody knows: recorded as such
            t1 = time.monotonic()
            out = "fail" if kind == "lookup" else "unknown"
            for k in keys:
                self.history.add(Operation(self.name(k), kind, who, pop, t0, t1, out, repr(e)))
            self.statuses[f"{kind}_exception"] += len(keys)
            return [Status.UNAVAILABLE] * len(keys)
        t1 = time.monotonic()
        statuses = []
        for k, r in zip(keys, res, strict=True):
            status = Status(int(r["status"]))
            statuses.append(status)
            self.statuses[f"{kind}_{status.name}"] += 1
            shows = int(r["owner_pop"]) != 0
            self.history.add(
                Operation(
                    self.name(k),
                    kind,
                    who,
                    pop,
                    t0,
                    t1,
                    outcome_of(kind, status),
                    status.name,
                    owner_pop=int(r["owner_pop"]) if shows else 0,
                    birth_hlc=int(r["birth_hlc"]) if shows else 0,
                    birth_pop=int(r["birth_pop"]) if shows else 0,
                    generation=int(r["generation"]) if shows else 0,
                    ttl_s=TTL_S if kind in ("claim", "confirm") else 0.0,
                )
            )
        return statuses

    async def _claims(self) -> None:
        size = self.batch * KEY_SIZE
        raw = self.pool[self._next * size : (self._next + 1) * size]
        self._next += 1
        if not raw:
            return
        keys = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
        self.claimed += keys
        got = await self.call("claim", keys)
        me = [k for k, s in zip(keys, got, strict=True) if s in (Status.CREATED,)]
        self.acked += me
        # Confirm half of them (a handshake completing), release some confirmed ones.
        if me and self.rng.random() < 0.5:
            await self.call("confirm", me)
            self.confirmed += me
        if self.confirmed and self.rng.random() < 0.2:
            pick = self.rng.sample(self.confirmed, min(len(self.confirmed), self.batch // 2))
            await self.call("release", pick)

    async def _lookups(self) -> None:
        if not self.claimed:
            return
        keys = self.rng.sample(self.claimed, min(len(self.claimed), self.batch))
        await self.call("lookup", keys)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()

        async def one(work: Any) -> None:
            try:
                await work()
            finally:
                self._in_flight -= 1

        def start(work: Any) -> None:
            if self._in_flight >= self.max_in_flight:
                self.skipped += 1
                return
            self._in_flight += 1
            t = asyncio.create_task(one(work))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        claim_every = self.batch / self.claims_per_s
        lookup_every = self.batch / self.lookups_per_s
        t0 = time.monotonic()
        next_claim, next_lookup = t0, t0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_claim:
                start(self._claims)
                next_claim += claim_every
            if now >= next_lookup:
                start(self._lookups)
                next_lookup += lookup_every
            wait = max(0.0, min(next_claim, next_lookup) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        if tasks:
            await asyncio.wait(tasks)

    def progress(self) -> str:
        s = self.statuses
        bad = sum(v for k, v in s.items() if "UNAVAILABLE" in k or "exception" in k)
        return (
            f"{len(self.history):,} ops, {len(self.acked):,} claims acknowledged, "
            f"{bad:,} unavailable, {self.skipped} slots skipped"
        )


async def prefill(w: Workload, n: int, seed: int, chunk: int = 2_000) -> None:
    """Claim ``n`` other flows up front (the data every membership change moves),
    recorded like the rest."""
    raw = synthetic_keys(n, seed=seed, start=10_000_000)
    keys = [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]
    for i in range(0, n, chunk):
        part = keys[i : i + chunk]
        w.claimed += part
        await w.call("claim", part, who="prefill")


async def final_reads(w: Workload, deadline_s: float = 30.0) -> int:
    """Look every claimed flow up once more (recorded), retrying the ones not answered
    until ``deadline_s``. Returns how many were never answered."""
    todo = list(dict.fromkeys(w.claimed))
    end = time.monotonic() + deadline_s
    while todo and time.monotonic() < end:
        left = []
        for i in range(0, len(todo), 500):
            part = todo[i : i + 500]
            got = await w.call("lookup", part, who="final")
            left += [k for k, s in zip(part, got, strict=True) if s == Status.UNAVAILABLE]
        todo = left
        if todo:
            await asyncio.sleep(0.5)
    return len(todo)


def admin_session(certs: Path | None) -> tuple[aiohttp.ClientSession, str]:
    connector = None
    scheme = "http"
    if certs is not None:
        tls = client_tls(certs, Role.OPERATOR)
        if tls is None:
            raise SystemExit(f"no operator certificate in {certs}")
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        connector, scheme = aiohttp.TCPConnector(ssl=ctx), "https"
    timeout = aiohttp.ClientTimeout(total=3)
    return aiohttp.ClientSession(timeout=timeout, connector=connector), scheme


def check_args(args: argparse.Namespace) -> None:
    """Usage errors as ConfigError (the CLI prints them and exits 2), not tracebacks."""
    if not args.duration > 0:
        raise ConfigError(f"--duration {args.duration}: want seconds > 0")
    if not (args.claims_per_s > 0 and args.lookups_per_s > 0):
        raise ConfigError("--claims-per-s and --lookups-per-s must be > 0")
    if args.nodes < 1 or args.prefill < 0:
        raise ConfigError("--nodes must be >= 1 and --prefill >= 0")


async def run_chaos(args: argparse.Namespace) -> int:
    if args.check:
        return report(check(History.read(args.check)), None, None)
    check_args(args)
    # SIGTERM ends the run like Ctrl-C: the faults are healed (hogs killed, paused nodes
    # resumed) and every node started is stopped.
    me = asyncio.current_task()
    if me is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        return await _run(args)
    except asyncio.CancelledError:
        say("interrupted: faults healed, nodes stopped; no verdict")
        return 130


async def start_links(specs: list[NodeSpec]) -> dict[tuple[int, int], Proxy]:
    """A proxy on every link between two nodes: ``links[(i, j)]`` is the one node i dials
    node j through (the nemesis delays and cuts them)."""
    links: dict[tuple[int, int], Proxy] = {}
    try:
        for i, j in itertools.permutations(range(len(specs)), 2):
            links[(i, j)] = await Proxy(specs[j].peer).start()
    except BaseException:
        await asyncio.gather(*(p.close() for p in links.values()))
        raise
    return links


def node_flags(
    specs: list[NodeSpec], links: dict[tuple[int, int], Proxy], clocks: list[int]
) -> dict[str, list[str]]:
    """Each node's own flags: its clock offset, and the proxies it dials its peers by."""
    out: dict[str, list[str]] = {}
    for i, spec in enumerate(specs):
        flags = ["--clock-offset-ms", str(clocks[i])] if clocks else []
        via = [f"{specs[j].peer}={p.address}" for (a, j), p in links.items() if a == i]
        out[spec.node_id] = [*flags, *(["--dial-via", *via] if via else [])]
    return out


async def _run(args: argparse.Namespace) -> int:
    kinds = tuple(k for k in args.faults.split(",") if k)
    faults = plan_faults(args.seed, args.duration, args.nodes, kinds)
    certs = None if args.insecure else certs_dir(args)
    extra = ["--profile", "test", "--log-level", "error"]
    specs = plan(1, args.nodes)
    bound = NodeConfig.max_clock_offset_ms
    clocks = plan_clocks(args.seed, args.nodes, bound) if "clock" in kinds else []
    links = await start_links(specs) if {"slow", "cut"} & set(kinds) else {}
    cluster = LocalCluster(
        specs, extra, tls_dir=certs, per_node_args=node_flags(specs, links, clocks)
    )
    history = History()
    say(f"chaos seed {args.seed}: {args.nodes} nodes, {args.duration:.0f}s, faults:")
    if clocks:
        shown = (f"{s.node_id} {c:+d}ms" for s, c in zip(specs, clocks, strict=True))
        say(f"  clocks: {', '.join(shown)}")
    for f in faults:
        say(f"  {f}")
    try:
        return await _run_with(args, cluster, certs, faults, links, clocks, history)
    finally:
        await asyncio.gather(*(p.close() for p in links.values()))


async def _run_with(
    args: argparse.Namespace,
    cluster: LocalCluster,
    certs: Path | None,
    faults: list[Fault],
    links: dict[tuple[int, int], Proxy],
    clocks: list[int],
    history: History,
) -> int:
    async with cluster:
        http, scheme = admin_session(certs)
        async with http:

            async def settled() -> bool:
                epochs, members = set(), set()
                for n in cluster.nodes:
                    try:
                        async with http.get(f"{scheme}://{n.spec.admin}/readyz") as r:
                            if r.status != 200:
                                return False
                        async with http.get(f"{scheme}://{n.spec.admin}/partitions") as r:
                            table = await r.json()
                    except (aiohttp.ClientError, TimeoutError):
                        return False
                    epochs.add(table["epoch"])
                    members.add(tuple(sorted(m["node_id"] for m in table["members"])))
                want = tuple(sorted(s.node_id for s in cluster.specs))
                return len(epochs) == 1 and members == {want}

            tls = None if certs is None else client_tls(certs, Role.FORWARDER, POP)
            async with Client([n.spec.grpc for n in cluster.nodes], tls=tls, timeout_s=3) as c:
                rng = random.Random(args.seed)
                w = Workload(
                    c,
                    history,
                    rng,
                    claims_per_s=args.claims_per_s,
                    lookups_per_s=args.lookups_per_s,
                    pool=synthetic_keys(int(args.claims_per_s * args.duration) + 1000, args.seed),
                )
                if args.prefill:
                    t = time.monotonic()
                    await prefill(w, args.prefill, args.seed)
                    say(f"prefilled {args.prefill:,} flows in {time.monotonic() - t:.1f}s")
                nemesis = Nemesis(
                    cluster,
                    faults,
                    settled,
                    say,
                    links=links,
                    clock_bound_ms=int(NodeConfig.max_clock_offset_ms * CLOCK_SHARE)
                    if clocks
                    else 0,
                    rng=random.Random(args.seed + 1),
                )
                stop = asyncio.Event()
                t0 = time.monotonic()
                load = asyncio.create_task(w.run(stop))
                chaos = asyncio.create_task(nemesis.run(t0))
                try:
                    while time.monotonic() - t0 < args.duration:
                        await asyncio.sleep(min(10.0, args.duration - (time.monotonic() - t0)))
                        say(f"+{time.monotonic() - t0:.0f}s {w.progress()}")
                finally:  # also when cancelled (SIGTERM, Ctrl-C): no hog or pause outlives us
                    stop.set()
                    chaos.cancel()
                    await asyncio.gather(load, chaos, return_exceptions=True)
                    await nemesis.heal()
                t = time.monotonic()
                ok = await nemesis.wait_settled()
                say(f"healed; settled {'in' if ok else 'NOT within'} {time.monotonic() - t:.1f}s")
                unanswered = await final_reads(w)
                say(f"final look-ups: {unanswered} flows never answered")
    path = Path(args.history or f"chaos-{args.seed}.jsonl")
    return report(check(history), history, path)


def report(violations: list[Any], history: History | None, path: Path | None) -> int:
    kinds = Counter(v.kind for v in violations)
    for v in violations[:20]:
        say(str(v))
    if len(violations) > 20:
        say(f"... {len(violations) - 20} more")
    ops = f" in {len(history):,} operations" if history is not None else ""
    verdict = "PASS" if not violations else "FAIL"
    say(f"verdict: {verdict}: {len(violations)} violations{ops} {dict(kinds) or ''}".rstrip())
    if violations and history is not None and path is not None:
        history.write(path)
        say(f"history written to {path} (check again: dht chaos --check {path})")
    return 1 if violations else 0


def add_chaos_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chaos",
        help="workload + nemesis + history checker against a local PoP",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--duration", type=float, default=120.0, help="seconds of faults and load")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument(
        "--faults", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}"
    )
    p.add_argument("--claims-per-s", type=float, default=50.0)
    p.add_argument("--lookups-per-s", type=float, default=100.0)
    p.add_argument("--prefill", type=int, default=0, help="flows claimed before the faults")
    p.add_argument("--history", help="where to write the history of a failed run")
    p.add_argument("--check", help="check this recorded history instead of running")
    add_certs_flags(p, "the cluster's certificates (made there if missing)")
    p.add_argument("--insecure", action="store_true", help="no TLS (docs/security.md)")
