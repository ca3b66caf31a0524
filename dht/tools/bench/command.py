"""``dht bench``: the side-by-side benchmark against Redis (docs/benchmarks.md). Never part of the
test suite.

    dht bench                   # full run: 1M records, growth to 5M (~3-6 min on 2 cores)
    dht bench --quick           # under 5 minutes: fewer rounds, growth to 1M
    dht bench --json out.json --plot docs/bench-growth.png
    dht bench --only syn        # the connection path alone: SYN, second chance (~1.5 min)
    dht bench --only lifecycle  # whole connections at stepped rates, 3 PoPs (~1-4 min)

Starts this project's nodes (real processes, dht.tools.cluster.LocalCluster) and a real
redis-server on loopback (apt-get installs it if missing), runs each workload on both,
interleaved, and prints one table: medians, the ratio, the goal and whether it is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

WORKLOADS = ("bulk", "claims", "syn", "lifecycle", "memory", "routing", "growth")
# Only with --only (not in the default run): the cost of mutual TLS, ~20-30 s.
OPT_IN = ("tls",)
# Goals that are not a ratio to meet: none, or a figure reported side by side only.
NO_GOAL = ("-", "report")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark against Redis, side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a run that finishes in under 5 min")
    p.add_argument("--records", type=int, help="records for bulk lookup and memory (1M)")
    p.add_argument("--runs", type=int, help="interleaved rounds per workload")
    p.add_argument(
        "--only",
        nargs="+",
        choices=(*WORKLOADS, *OPT_IN),
        help="run only these (default: all but tls)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the results (with a 'ratios' object) here")
    p.add_argument("--plot", help="write the growth plot (PNG) here")


def settings(args: argparse.Namespace) -> Any:
    from dht.tools.bench.workloads import Settings

    if args.quick:
        s = Settings(
            records=1_000_000, runs=5, round_keys=100_000, claim_keys=20_000,
            miss_samples=20_000, grpc_miss_samples=2_000,
            growth_sizes=(10_000, 100_000, 1_000_000), syn_samples=100, seed=args.seed,
        )  # fmt: skip
    else:
        s = Settings(
            records=1_000_000, runs=9, round_keys=200_000, claim_keys=40_000,
            miss_samples=30_000, grpc_miss_samples=5_000,
            growth_sizes=(10_000, 100_000, 1_000_000, 5_000_000), seed=args.seed,
        )  # fmt: skip
    changes = {k: v for k, v in (("records", args.records), ("runs", args.runs)) if v}
    if changes:
        from dataclasses import replace

        s = replace(s, **changes)
    return s


def lifecycle_settings(args: argparse.Namespace) -> Any:
    """The lifecycle's steps (docs/benchmarks.md#the-connection-lifecycle)."""
    from dht.tools.bench.lifecycle import LifeSettings

    if args.quick:
        return LifeSettings(
            rates=(50, 100, 250, 500, 1000, 2000, 3000, 4000), step_s=2.5, seed=args.seed
        )
    return LifeSettings(
        rates=(50, 100, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000), step_s=5.0, seed=args.seed
    )


def versions() -> dict[str, str]:
    from dht.tools.bench.procs import ensure_redis_server, redis_server_version

    out = {"python": platform.python_version(), "machine": f"{platform.machine()}"}
    for pkg in ("dht", "grpcio", "protobuf", "numpy", "redis", "hiredis", "uhashring", "xxhash"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    out["redis-server"] = redis_server_version(ensure_redis_server())
    import os

    out["cpus"] = str(os.cpu_count())
    return out


def _log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v < 1000:
        return f"{v:,.1f}"
    if isinstance(v, int | float):
        return f"{v:,.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("workload", "dht", "redis", "unit", "ratio", "goal", "met")
    body = [
        (
            r["workload"], _fmt(r["dht"]), _fmt(r["redis"]), r["unit"], f"{r['ratio']:.2f}x",
            r["goal"], "-" if r["goal"] in NO_GOAL else ("yes" if r["met"] else "NO"),
        )
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in body:
        lines.append(
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        )
    return "\n".join(lines)


async def run_bench(args: argparse.Namespace) -> int:
    from dht.tools.bench import growth as g
    from dht.tools.bench import workloads as w

    s = settings(args)
    only = set(args.only or WORKLOADS)
    started = time.perf_counter()
    ver = versions()
    _log("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    rows: list[dict[str, Any]] = []
    if "routing" in only:
        rows += await asyncio.to_thread(w.routing, s, _log)
    if "bulk" in only:
        rows += await w.bulk_lookup(s, _log)
    if "memory" in only:
        if "bulk" not in only:
            rows.append(await w.memory(s, "ipv4", _log))
        rows.append(await w.memory(s, "ipv6", _log))
    if "claims" in only:
        rows += await w.claims_and_misses(s, _log)
    if "syn" in only:
        from dht.tools.bench.syn import connection_path

        rows += await connection_path(s, _log)
    life_steps: list[dict[str, Any]] = []
    if "lifecycle" in only:
        from dht.tools.bench.lifecycle import lifecycle

        got, life_steps = await lifecycle(lifecycle_settings(args), _log)
        rows += got
    if "tls" in only:
        from dht.tools.bench.tls import tls_cost

        rows += await tls_cost(s, _log)
    growth_rows: list[dict[str, Any]] = []
    if "growth" in only:
        growth_rows = await g.growth(s, _log)
        if args.plot:
            await asyncio.to_thread(g.plot, growth_rows, args.plot)
    elapsed = time.perf_counter() - started
    print(table(rows))
    for line in notes(rows):
        print(line)
    if life_steps:
        from dht.tools.bench.lifecycle import step_table

        print()
        print(step_table(life_steps))
    if growth_rows:
        print()
        print(growth_table(growth_rows))
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    mode = "quick" if args.quick else "full"
    print(f"{mode} run, {s.runs} interleaved rounds per workload, {elapsed:.0f} s")
    if args.json:
        doc = {
            "mode": mode,
            "elapsed_s": round(elapsed, 1),
            "settings": {k: v for k, v in vars(s).items()},
            "versions": ver,
            "ratios": {r["key"]: r["ratio"] for r in rows if "key" in r},
            "workloads": rows,
            "growth": growth_rows,
            "lifecycle": life_steps,
        }
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(doc, indent=2) + "\n")
    return 0


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What rows add under the table (the connection path's wrong answers)."""
    return [str(r["note"]) for r in rows if r.get("note")]


def growth_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| records | batch lookup ns/key | bytes/record (IPv4) |", "|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['records']:,} | {r['lookup_ns_per_key']:,.0f} | {r['bytes_per_record']:.1f} |"
        )
    by = {r["records"]: r["lookup_ns_per_key"] for r in rows}
    if 1_000_000 in by and 5_000_000 in by:
        lines.append(
            f"\n5M vs 1M per-key cost: {by[5_000_000] / by[1_000_000]:.2f}x (goal <= 1.3x)"
        )
    return "\n".join(lines)
