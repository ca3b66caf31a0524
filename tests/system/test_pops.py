"""Three PoPs of two real `dht node` processes each (docs/protocol.md#shipping-between-pops):
shipping lag, conflicting
claims during a cut (a proxy the test controls sits on every link between PoPs), a PoP
restarted from empty, refresh shipping, and a two-node PoP that loses a node.

Load is rate-limited and every wait is a polled condition with a deadline. The measured
numbers are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest

from dht.client import Client
from dht.core.record import State, Status
from dht.core.wire import KEY_DTYPE, KEY_SIZE, addr_from16
from dht.tools.bench import synthetic_keys
from dht.tools.chaos.proxy import Proxy
from dht.tools.cluster import NodeProcess, plan

from .conftest import TEST_NODE_ARGS, TrackedCluster, admin_url, connect, shutdown

pytestmark = pytest.mark.system

POPS = {"ams": 1, "fra": 2, "lon": 3}


class Pops:
    """A started 3 x 2 cluster; with ``proxied``, every node dials every other PoP's
    nodes through a Proxy of its own PoP (``proxies[(from_pop, to_node)]``)."""

    def __init__(self, cluster: TrackedCluster, proxies: dict[tuple[str, str], Proxy]) -> None:
        self.cluster = cluster
        self.proxies = proxies

    def nodes(self, pop: str) -> list[NodeProcess]:
        return [n for n in self.cluster.nodes if n.spec.pop == pop]

    def grpc(self, pop: str) -> list[str]:
        return [n.spec.grpc for n in self.nodes(pop)]

    def isolate(self, pop: str, cut: bool = True) -> None:
        """Cut (or heal) every link between ``pop`` and the other PoPs."""
        for (src, dst), proxy in self.proxies.items():
            if src == pop or dst.startswith(f"{pop}-"):
                if cut:
                    proxy.cut()
                else:
                    proxy.heal()


MakePops = Callable[..., Awaitable[Pops]]


@pytest.fixture
async def make_pops() -> AsyncIterator[MakePops]:
    made: list[Pops] = []

    async def make(proxied: bool = False, extra: Sequence[str] = ()) -> Pops:
        specs = plan(3, 2)
        proxies: dict[tuple[str, str], Proxy] = {}
        pop_args: dict[str, list[str]] = {}
        if proxied:
            for pop in POPS:
                via = []
                for s in specs:
                    if s.pop != pop:
                        p = await Proxy(s.peer).start()  # PoP links: the peer plane
                        proxies[(pop, s.node_id)] = p
                        via.append(f"{s.peer}={p.address}")
                pop_args[pop] = ["--dial-via", *via]
        cluster = TrackedCluster(specs, [*TEST_NODE_ARGS, *extra])
        cluster.pop_args = pop_args
        pops = Pops(cluster, proxies)
        made.append(pops)
        await cluster.start()
        return pops

    try:
        yield make
    finally:
        for pops in made:
            try:
                await shutdown(pops.cluster)
            finally:
                for p in pops.proxies.values():
                    await p.close()


async def lookup(c: Client, raw: bytes) -> npt.NDArray[np.void]:
    return await c.flow_packed("Lookup", raw)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> float:
    """Poll an async condition every 50 ms; the seconds it took. Fails at ``timeout_s``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def metrics(http: aiohttp.ClientSession, nodes: Sequence[NodeProcess]) -> list[str]:
    lines: list[str] = []
    for n in nodes:
        async with http.get(admin_url(n.spec.admin, "/metrics")) as r:
            assert r.status == 200
            lines += (await r.text()).splitlines()
    return lines


def metric_sum(lines: list[str], name: str, **labels: str) -> float:
    total = 0.0
    for ln in lines:
        if not ln.startswith(name + "{") and not ln.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in ln for k, v in labels.items()):
            total += float(ln.rsplit(" ", 1)[1])
    return total


def ms(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q)) * 1000


async def test_confirmed_at_one_pop_is_found_at_the_others_within_the_lag(
    make_pops: MakePops, http: aiohttp.ClientSession
) -> None:
    pops = await make_pops()
    rate, seconds, batch = 200, 5, 20  # confirmed flows per second, steadily
    raw = synthetic_keys(rate * seconds, seed=21)
    confirmed_at: dict[int, float] = {}
    seen: dict[str, dict[int, float]] = {"fra": {}, "lon": {}}
    done = asyncio.Event()
    async with (
        connect(pops.grpc("ams"), timeout_s=10) as a,
        connect(pops.grpc("fra"), timeout_s=10) as f,
        connect(pops.grpc("lon"), timeout_s=10) as lo,
    ):

        async def produce() -> None:
            start = time.monotonic()
            for i in range(0, rate * seconds, batch):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                res = await a.flow_packed(
                    "Confirm", raw[i * KEY_SIZE : (i + batch) * KEY_SIZE], pop="ams"
                )
                assert set(res["status"].tolist()) == {Status.CREATED}
                now = time.monotonic()
                for j in range(i, i + batch):
                    confirmed_at[j] = now
            done.set()

        async def watch(pop: str, c: Client) -> None:
            deadline = time.monotonic() + seconds + 20
            while len(seen[pop]) < rate * seconds:
                assert time.monotonic() < deadline, f"{pop} found only {len(seen[pop])}"
                idx = np.array([j for j in confirmed_at if j not in seen[pop]], dtype=np.intp)
                if idx.size:
                    keys = np.frombuffer(raw, dtype=KEY_DTYPE)[idx]
                    res = await lookup(c, keys.tobytes())
                    now = time.monotonic()
                    for j, status, owner in zip(
                        idx.tolist(), res["status"].tolist(), res["owner_pop"].tolist(), strict=True
                    ):
                        if status == Status.OK:
                            assert owner == POPS["ams"]
                            seen[pop][j] = now
                await asyncio.sleep(0.02)

        await asyncio.gather(produce(), watch("fra", f), watch("lon", lo))
    lines = await metrics(http, pops.nodes("ams"))
    report = [f"steady {rate} confirms/s for {seconds} s at ams (batches of {batch}):"]
    for pop in ("fra", "lon"):
        lags = [seen[pop][j] - confirmed_at[j] for j in seen[pop]]
        report.append(
            f"  found at {pop}: lag p50 {ms(lags, 0.5):.0f} ms, p99 {ms(lags, 0.99):.0f} ms "
            f"(client view: confirm acknowledged -> lookup at {pop} finds it, 20 ms polls)"
        )
        assert ms(lags, 0.99) < 5_000
        p50 = metric_sum(lines, "dht_pop_replication_lag_seconds", peer_pop=pop, quantile="0.5")
        p99 = metric_sum(lines, "dht_pop_replication_lag_seconds", peer_pop=pop, quantile="0.99")
        report.append(
            f"  /metrics at ams nodes, lag to {pop}: p50 {p50 * 500:.0f} ms, "
            f"p99 {p99 * 500:.0f} ms (mean of the 2 nodes)"
        )
    shipped = metric_sum(lines, "dht_pop_shipped_bytes_total")
    batches = metric_sum(lines, "dht_pop_shipped_batches_total")
    flows = rate * seconds
    report.append(
        f"  shipped {shipped / flows / 2:.0f} record bytes per flow per peer PoP "
        f"(flow record 72 B + the client's affinity record 72 B), in {batches:.0f} batches"
    )
    print("\n" + "\n".join(report))

    # fra and lon may apply a batch a moment before ams hears the acknowledgement.
    async def all_acked() -> bool:
        lines = await metrics(http, pops.nodes("ams"))
        return metric_sum(lines, "dht_pop_shipped_records_total", kind="established") >= 2 * flows

    await until(all_acked, "acknowledgements at ams", 10)
    lines = await metrics(http, pops.nodes("ams"))
    assert metric_sum(lines, "dht_pop_shipped_records_total", kind="established") == 2 * flows


async def test_conflicting_claims_during_a_cut_resolve_to_the_earliest(
    make_pops: MakePops, http: aiohttp.ClientSession
) -> None:
    pops = await make_pops(proxied=True)
    before = synthetic_keys(100, seed=31)  # shipped everywhere before the cut
    x = synthetic_keys(50, seed=32, start=1000)  # claimed at ams first, then at fra
    y = synthetic_keys(50, seed=33, start=2000)  # claimed at fra first, then at ams
    released, kept = before[: 50 * KEY_SIZE], before[50 * KEY_SIZE :]
    clients = {
        pop: connect(pops.grpc(pop), timeout_s=10) for pop in POPS
    }  # fmt: skip
    try:
        for c in clients.values():
            await c.refresh_table()
        a, f = clients["ams"], clients["fra"]
        await a.flow_packed("Confirm", before, pop="ams")

        async def everywhere(
            raw: bytes, status: Status, owner: int | None = None, at: Sequence[str] = tuple(POPS)
        ) -> bool:
            for c in (clients[pop] for pop in at):
                res = await lookup(c, raw)
                if (res["status"] != status).any():
                    return False
                if owner is not None and (res["owner_pop"] != owner).any():
                    return False
            return True

        await until(lambda: everywhere(before, Status.OK, POPS["ams"]), "shipped before the cut")

        pops.isolate("ams")
        for first, second, raw in (("ams", "fra", x), ("fra", "ams", y)):
            res = await clients[first].flow_packed("Confirm", raw, pop=first)
            assert set(res["status"].tolist()) == {Status.CREATED}
            res = await clients[second].flow_packed("Confirm", raw, pop=second)
            # The other PoP's claim has not reached this side: it claims too.
            assert set(res["status"].tolist()) == {Status.CREATED}, (second, res["status"])
        assert set((await a.flow_packed("Release", released, pop="ams"))["status"]) == {Status.OK}
        # lon still hears fra: it gets fra's claims of y (ams's are cut off), and fra and
        # lon still hold the released flows.
        await until(lambda: everywhere(y, Status.OK, POPS["fra"], at=["lon"]), "y at lon")
        assert set((await lookup(f, released))["status"].tolist()) == {Status.OK}

        pops.isolate("ams", cut=False)
        healed = time.monotonic()

        async def converged() -> bool:
            return (
                await everywhere(x, Status.OK, POPS["ams"])
                and await everywhere(y, Status.OK, POPS["fra"])
                and await everywhere(released, Status.NOT_FOUND)
                and await everywhere(kept, Status.OK, POPS["ams"])
            )

        took = await until(converged, "every PoP agrees after the heal", timeout_s=60)
        # Stays so: tombstoned flows do not come back, owners do not flip, over a few
        # more anti-entropy rounds (every 2 s in the test profile).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert await converged()
            await asyncio.sleep(0.5)
        lines = await metrics(http, pops.cluster.nodes)
        conflicts = metric_sum(lines, "dht_pop_conflicts_resolved_total")
        resends = metric_sum(lines, "dht_pop_resends_total")
        print(
            f"\nconverged {took:.2f} s after the heal (healed at +0, polled every 50 ms): "
            f"100 conflicting claims -> owner = earliest claim at every PoP, 50 tombstones "
            f"held; conflicts resolved {conflicts:.0f}, batches resent {resends:.0f}"
        )
        assert conflicts > 0
        assert time.monotonic() - healed < 70
    finally:
        for c in clients.values():
            await c.close()


async def test_a_pop_restarted_from_empty_catches_up(
    make_pops: MakePops, http: aiohttp.ClientSession
) -> None:
    pops = await make_pops()
    raw = synthetic_keys(3000, seed=41)
    async with connect(pops.grpc("ams"), timeout_s=10) as a:
        await a.flow_packed("Confirm", raw, pop="ams")
        tomb = raw[: 200 * KEY_SIZE]
        await a.flow_packed("Release", tomb, pop="ams")
        keys = np.frombuffer(raw, dtype=KEY_DTYPE)[200:400]
        clients = [addr_from16(bytes(k)) for k in keys["caddr"]]

    async def caught_up() -> bool:
        async with connect(pops.grpc("fra"), timeout_s=10) as f:
            got = await lookup(f, raw[200 * KEY_SIZE :])
            gone = await lookup(f, tomb)
            aff = await f.get_affinity(clients)
        return bool(
            (got["status"] == Status.OK).all()
            and (got["state"] == State.ESTABLISHED).all()
            and (gone["status"] == Status.NOT_FOUND).all()
            and all(r.owner_pop == POPS["ams"] for r in aff)
        )

    await until(caught_up, "fra has everything before the restart")
    victims = pops.nodes("fra")
    for n in victims:
        os.kill(n.pid, signal.SIGKILL)
    for n in victims:
        await n.proc.wait()
    started = time.monotonic()
    # Both at once: a node waits for its PoP's other replica before it is ready.
    await asyncio.gather(*(pops.cluster.restart(n) for n in victims))
    ready = time.monotonic() - started
    took = await until(caught_up, "the restarted PoP caught up", timeout_s=60)

    async def resynced() -> bool:  # both fra nodes, from ams and lon each
        return metric_sum(await metrics(http, victims), "dht_pop_resyncs_total") >= 4

    await until(resynced, "start-up resyncs of the restarted nodes")
    lines = await metrics(http, pops.nodes("fra"))
    print(
        f"\nfra restarted from empty: ready (announced) in {ready:.2f} s, all 2800 flows, "
        f"200 tombstones and the affinity back {took:.2f} s later; "
        f"resyncs {metric_sum(lines, 'dht_pop_resyncs_total'):.0f}, records pulled "
        f"{metric_sum(lines, 'dht_pop_anti_entropy_records_total', direction='pulled'):.0f}"
    )


async def test_refreshes_ship_far_fewer_records_than_refreshes(
    make_pops: MakePops, http: aiohttp.ClientSession
) -> None:
    pops = await make_pops()
    n, ttl_s, every_s, rounds = 200, 8, 0.25, 24
    raw = synthetic_keys(n, seed=51)
    async with (
        connect(pops.grpc("ams"), timeout_s=10) as a,
        connect(pops.grpc("fra"), timeout_s=10) as f,
    ):
        await a.flow_packed("Confirm", raw, pop="ams", ttl_s=ttl_s)

        async def at_fra() -> bool:
            return bool(((await lookup(f, raw))["status"] == Status.OK).all())

        await until(at_fra, "confirmed flows at fra")
        lapsed = 0
        start = time.monotonic()
        for i in range(rounds):
            await asyncio.sleep(max(0.0, start + i * every_s - time.monotonic()))
            res = await a.flow_packed("Refresh", raw, pop="ams", ttl_s=ttl_s)
            assert set(res["status"].tolist()) == {Status.OK}
            if i % 4 == 3:  # the remote copies stay live all along
                lapsed += int(((await lookup(f, raw))["status"] != Status.OK).sum())
        assert lapsed == 0
        assert await at_fra()
    lines = await metrics(http, pops.nodes("ams"))
    refreshes = n * rounds
    shipped = metric_sum(lines, "dht_pop_shipped_records_total", kind="refresh", peer_pop="fra")
    ratio = shipped / refreshes
    print(
        f"\n{refreshes} refreshes ({n} flows, TTL {ttl_s} s, every {every_s} s for "
        f"{rounds * every_s:.0f} s) shipped {shipped:.0f} refresh records to fra: "
        f"ratio {ratio:.3f} (1 in {1 / max(ratio, 1e-9):.0f}); remote copies never lapsed"
    )
    assert ratio < 0.25
    assert shipped > 0  # and the leases were extended before they ran out


async def test_a_two_node_pop_keeps_accepting_writes_when_a_node_dies(
    make_pops: MakePops,
) -> None:
    pops = await make_pops()
    victim = pops.nodes("ams")[1]
    os.kill(victim.pid, signal.SIGKILL)
    await victim.proc.wait()
    raw = synthetic_keys(500, seed=61)
    async with (
        connect(pops.grpc("ams"), timeout_s=10) as a,
        connect(pops.grpc("fra"), timeout_s=10) as f,
    ):

        async def confirmed() -> bool:
            res = await a.flow_packed("Confirm", raw, pop="ams")
            return bool(np.isin(res["status"], (Status.CREATED, Status.OK)).all())

        took = await until(confirmed, "writes accepted by the surviving ams node", 15)

        async def at_fra() -> bool:
            return bool(((await lookup(f, raw))["status"] == Status.OK).all())

        await until(at_fra, "shipped from the surviving node")
        found = await lookup(a, raw)
        assert set(found["status"].tolist()) == {Status.OK}
    print(f"\nams with one of its two nodes dead: 500 confirms accepted within {took:.2f} s")
