"""``dht demo``: the quick start's main job. Starts a local cluster of real node
processes, drives real work through the client library and prints what happened."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import statistics
import time
from collections import Counter
from typing import Any

from dht.client import Client
from dht.core.record import Status
from dht.core.wire import FlowKey
from dht.tools.cluster import LocalCluster, plan


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="start a local cluster and do real work with it",
        description="Start a local PoP of real node processes, claim, confirm, look up, "
        "race and release flows through the client library, and print what happened.",
    )
    p.add_argument("--nodes", type=int, default=3, help="nodes in the PoP")
    p.add_argument("--flows", type=int, default=20_000, help="flows to claim")
    p.add_argument("--seed", type=int, default=1)


def random_flows(rng: random.Random, n: int) -> list[FlowKey]:
    """Half IPv4, half IPv6 flows from documentation prefixes to a few services."""
    keys = []
    for i in range(n):
        port = rng.randint(1024, 65535)
        if i % 2:
            client: Any = ipaddress.IPv4Address(
                rng.randint(0xC6336400, 0xC63364FF)
            )  # 198.51.100/24
            service: Any = ipaddress.IPv4Address("192.0.2.1")
        else:
            # A random /64 inside 2001:db8::/32, so clients are spread over prefixes.
            client = ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(96))
            service = ipaddress.IPv6Address("2001:db8::1")
        keys.append(FlowKey(6 if i % 3 else 17, client, port, service, 443))
    return keys


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    # Two PoP names so that two PoPs can race for the same flows; this demo runs the
    # node set of the first one.
    cluster = LocalCluster(plan(1, args.nodes), ["--pops", "ams=1,fra=2", "--log-level", "error"])
    t0 = time.perf_counter()
    async with cluster:
        _say(f"started {args.nodes} node processes in {time.perf_counter() - t0:.1f} s:")
        for n in cluster.nodes:
            _say(
                f"  {n.spec.node_id}  grpc {n.spec.grpc}  admin http://{n.spec.admin}  pid {n.pid}"
            )
        async with Client([cluster.nodes[0].spec.grpc]) as client:
            await _work(client, rng, args.flows)
    _say("cluster stopped")
    return 0


async def _work(client: Client, rng: random.Random, n: int) -> None:
    table = client.table
    _say(
        f"partition table epoch {table.epoch}: {table.num_partitions} partitions, "
        "primaries per node "
        + ", ".join(
            f"{m.node_id}={c}"
            for m, c in zip(table.members, table.partition_counts(0), strict=True)
        )
    )
    flows = random_flows(rng, n)
    raw = b"".join(k.to_bytes() for k in flows)

    t = time.perf_counter()
    claimed = await client.flow_packed("Claim", raw, pop="ams")
    _say(
        f"claimed {n} flows for ams in {1000 * (time.perf_counter() - t):.0f} ms: "
        + _statuses(claimed["status"])
    )
    confirm_n = n // 2
    confirmed = await client.flow_packed("Confirm", raw[: confirm_n * 40], pop="ams")
    _say(f"confirmed {confirm_n} of them (handshake done): " + _statuses(confirmed["status"]))

    race = flows[-200:]
    fresh = [FlowKey(k.protocol, k.client, k.client_port, k.service, 8443) for k in race]
    # Both PoPs claim every chunk at once; who reaches the primary first alternates.
    chunks = [fresh[i : i + 20] for i in range(0, len(fresh), 20)]
    calls = []
    for i, c in enumerate(chunks):
        pair = [client.claim(c, pop="ams"), client.claim(c, pop="fra")]
        calls += pair if i % 2 == 0 else pair[::-1]
    res = await asyncio.gather(*calls)
    a = [r for i in range(len(chunks)) for r in res[2 * i + (i % 2)]]
    b = [r for i in range(len(chunks)) for r in res[2 * i + 1 - (i % 2)]]
    winners = Counter("ams" if r.owner_pop == 1 else "fra" for r in a)
    both = sum(1 for ra, rb in zip(a, b, strict=True) if ra.owner_pop == rb.owner_pop)
    created = sum(r.status == Status.CREATED for r in a + b)
    _say(
        f"race: ams and fra claimed the same {len(fresh)} new flows at once: {created} claims "
        f"created a record, owners {dict(winners)}; both sides see the same owner for "
        f"{both}/{len(fresh)}"
    )

    times = []
    for _ in range(5):
        t = time.perf_counter()
        looked = await client.flow_packed("Lookup", raw)
        times.append(time.perf_counter() - t)
    states = Counter(int(s) for s in looked["state"])
    _say(
        f"looked up all {n} flows 5 times: median {1000 * statistics.median(times):.1f} ms "
        f"({n / statistics.median(times):,.0f} keys/s); states: "
        f"embryonic={states[1]} established={states[2]}"
    )

    sample = rng.sample(range(n), 3)
    for i in sample:
        r = (await client.lookup([flows[i]]))[0]
        owner = table.members[int(table.primaries[r.partition])].node_id
        _say(
            f"  {flows[i]} -> {r.status.name.lower()}, owner pop id {r.owner_pop}, "
            f"{r.state.name.lower()}, generation {r.generation}, partition {r.partition} on {owner}"
        )

    released = await client.flow_packed("Release", raw[: 1000 * 40], pop="ams")
    after = await client.flow_packed("Lookup", raw[: 1000 * 40])
    _say(
        f"released 1000 flows: {_statuses(released['status'])}; "
        f"lookups now: {_statuses(after['status'])}"
    )
    again = await client.flow_packed("Claim", raw[:40], pop="fra")
    _say(
        f"a new claim over a released flow starts generation {int(again['generation'][0])} "
        f"({Status(int(again['status'][0])).name.lower()})"
    )


def _statuses(col: Any) -> str:
    c = Counter(Status(int(s)).name.lower() for s in col)
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
