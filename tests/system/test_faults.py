"""Fault tests for replication inside a PoP (docs/protocol.md#replication-in-a-pop), with real node
processes.

Each test starts a 3-node PoP (``--profile test``: probes every 0.2 s, failure timeout
2 s, anti-entropy every 1 s, pause threshold 1 s), drives a paced claim load through
``dht.client.client``, injects a fault with a signal (SIGKILL, SIGSTOP/SIGCONT) and checks the
promises of docs/protocol.md#replication-in-a-pop: an acknowledged claim is never lost, copies
converge,
a flow never has two owners, a restarted node is refilled before it says ready.

No sleep is used to wait for the system: every wait polls a condition with a deadline.
Numbers worth reading are printed on lines starting ``REPORT:`` (run pytest with -s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.client import Client
from dht.core.record import Status
from dht.core.wire import FORMAT_VERSION, KEY_SIZE, RESULT_DTYPE, FlowKey, ResultArray, key_hashes
from dht.tools.bench import synthetic_keys
from dht.tools.cluster import NodeProcess

from .conftest import (
    PROGRESS_SLACK,
    MakeCluster,
    TrackedCluster,
    admin_url,
    connect,
    node_channel,
    node_tls,
    operator_tls,
)

pytestmark = pytest.mark.system

TWO_POPS = ("--pops", "ams=1,fra=2")
TTL_S = 600  # claims outlive every test (the embryonic default is 10 s)
EMBRYONIC, ESTABLISHED = 1, 2  # dht.core.record.State values as they appear on the wire

# A claim acknowledged to a PoP: (owner_pop, birth_hlc, birth_pop) of the answer.
Ack = tuple[int, int, int]


def report(msg: str) -> None:
    print(f"REPORT: {msg}", flush=True)


def rows(raw: bytes) -> list[bytes]:
    return [raw[i : i + KEY_SIZE] for i in range(0, len(raw), KEY_SIZE)]


def flow_text(key: bytes) -> str:
    return str(FlowKey.from_bytes(key))


# --------------------------------------------------------------------------- waiting


async def poll(
    check: Callable[[], Awaitable[tuple[bool, Any]]],
    what: str,
    timeout_s: float,
    interval_s: float = 0.1,
) -> Any:
    """Call ``check`` until it says done; fail with its last word after the deadline
    (``timeout_s`` on a quiet machine, PROGRESS_SLACK times it beside a CPU hog)."""
    timeout_s *= PROGRESS_SLACK
    deadline = time.monotonic() + timeout_s
    while True:
        done, info = await check()
        if done:
            return info
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s; last: {info}")
        await asyncio.sleep(interval_s)


async def paced(
    stop: asyncio.Event,
    interval_s: float,
    round_fn: Callable[[int], Coroutine[Any, Any, None]],
    max_in_flight: int = 40,
) -> int:
    """Open-loop load: start ``round_fn(0)``, ``round_fn(1)``, ... one every
    ``interval_s`` until ``stop`` is set, each as its own task (a stalled round does not
    hold the next ones back; a late schedule is not caught up in a burst). At most
    ``max_in_flight`` rounds run at once; a slot beyond that is skipped. Waits for the
    rounds started and re-raises their errors. Returns the slots skipped."""
    started: list[asyncio.Task[None]] = []
    skipped = 0
    next_at = time.monotonic()
    while not stop.is_set():
        if sum(not t.done() for t in started) < max_in_flight:
            started.append(asyncio.create_task(round_fn(len(started))))
        else:
            skipped += 1
        now = time.monotonic()
        next_at = max(next_at + interval_s, now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), next_at - now)
    await asyncio.gather(*started)
    return skipped


# --------------------------------------------------------------------------- admin HTTP


async def admin_get(http: aiohttp.ClientSession, node: NodeProcess, path: str) -> tuple[int, Any]:
    async with http.get(admin_url(node.spec.admin, path)) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()


@dataclass
class Metrics:
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        )


async def metrics(http: aiohttp.ClientSession, node: NodeProcess) -> Metrics:
    status, text = await admin_get(http, node, "/metrics")
    assert status == 200, text
    return Metrics(
        [
            (s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]
    )


async def converged(http: aiohttp.ClientSession, cluster: TrackedCluster) -> tuple[bool, Any]:
    """Every node ready and in sync, and equal digests for every partition nodes share
    (3 nodes with 3 replicas: every node holds every partition)."""
    problems: list[str] = []
    parts: list[dict[str, dict[str, Any]]] = []
    for n in cluster.nodes:
        try:
            status, body = await admin_get(http, n, "/readyz")
            if status != 200:
                problems.append(f"{n.spec.node_id} not ready: {body}")
            status, body = await admin_get(http, n, "/digests")
            assert status == 200, body
            parts.append(body["partitions"])
        except (aiohttp.ClientError, TimeoutError) as e:
            problems.append(f"{n.spec.node_id}: {e!r}")
    if problems:
        return False, "; ".join(problems)
    assert all(p.keys() == parts[0].keys() for p in parts), "nodes hold different partitions"
    differ = [p for p in parts[0] if len({d[p]["digest"] for d in parts}) > 1]
    if differ:
        counts = {p: [d[p]["records"] for d in parts] for p in differ[:5]}
        return False, f"{len(differ)} partitions differ, e.g. records per node {counts}"
    return True, parts[0]


# --------------------------------------------------------------------------- direct gRPC


async def node_copies(node: NodeProcess, raw: bytes, chunk: int = 10_000) -> ResultArray:
    """The raw copy of each key held by this one node (NodeInternal.ReadCopies): what
    the node itself stores, not what routing answers."""
    out = []
    async with node_channel(node.spec.peer, node_tls(node.spec.pop, node.spec.node_id)) as channel:
        stub = pb_grpc.NodeInternalStub(channel)
        for off in range(0, len(raw), chunk * KEY_SIZE):
            req = pb.CopiesRequest(
                format_version=FORMAT_VERSION, keys=raw[off : off + chunk * KEY_SIZE]
            )
            resp = await stub.ReadCopies(req, timeout=10)
            out.append(resp.results)
    return np.frombuffer(b"".join(out), dtype=RESULT_DTYPE)


async def direct_call(
    node: NodeProcess, method: str, raw: bytes, pop: int, timeout_s: float
) -> ResultArray:
    """One FlowTable call to exactly this node (no client routing, no failover)."""
    async with node_channel(node.spec.grpc, operator_tls()) as channel:
        stub = pb_grpc.FlowTableStub(channel)
        req = pb.FlowBatchRequest(format_version=FORMAT_VERSION, keys=raw, pop=pop, ttl_s=TTL_S)
        resp = await getattr(stub, method)(req, timeout=timeout_s)
    return np.frombuffer(resp.results, dtype=RESULT_DTYPE)


# --------------------------------------------------------------------------- checking


def mismatches(keys: list[bytes], acks: list[Ack], got: ResultArray) -> tuple[int, list[str]]:
    """Keys whose answer is not OK with the acknowledged owner and birth."""
    if not keys:
        return 0, []
    exp = np.array(acks, dtype=np.uint64).reshape(-1, 3)
    bad = (
        (got["status"] != Status.OK)
        | (got["owner_pop"] != exp[:, 0])
        | (got["birth_hlc"] != exp[:, 1])
        | (got["birth_pop"] != exp[:, 2])
    )
    idx = np.flatnonzero(bad)
    examples = [
        f"{flow_text(keys[i])}: acknowledged owner {acks[i][0]} birth {acks[i][1]}/"
        f"{acks[i][2]}, got {Status(int(got['status'][i])).name} owner "
        f"{int(got['owner_pop'][i])} birth {int(got['birth_hlc'][i])}/{int(got['birth_pop'][i])}"
        for i in idx[:5]
    ]
    return int(idx.size), examples


async def lost_by_lookup(client: Client, acked: dict[bytes, Ack]) -> tuple[int, list[str]]:
    keys = list(acked)
    if not keys:
        return 0, []
    got = await client.flow_packed("Lookup", b"".join(keys))
    return mismatches(keys, [acked[k] for k in keys], got)


async def lost_on_nodes(
    nodes: Iterable[NodeProcess], acked: dict[bytes, Ack]
) -> dict[str, tuple[int, list[str]]]:
    keys = list(acked)
    raw = b"".join(keys)
    return {
        n.spec.node_id: mismatches(keys, [acked[k] for k in keys], await node_copies(n, raw))
        for n in nodes
    }


# --------------------------------------------------------------------------- 1. SIGKILL


@dataclass
class Round:
    started: float
    ended: float
    keys: int
    acked: int
    failed: int
    dead_primary: int  # keys whose primary is the node that gets killed
    dead_primary_acked: int


async def test_sigkill_one_of_three_under_claim_load(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    rate, batch = 200, 20  # flows per second, keys per call
    cluster = await make_cluster(3)
    targets = [n.spec.grpc for n in cluster.nodes]
    victim = cluster.nodes[1]
    dead = victim.spec.grpc
    pool = synthetic_keys(6_000, seed=11)
    acked: dict[bytes, Ack] = {}
    statuses: Counter[str] = Counter()
    rounds: list[Round] = []

    async with (
        connect(targets, timeout_s=3) as client,
        connect(targets, timeout_s=5) as reader,
    ):
        table = client.table
        dead_index = table.index_of(victim.spec.node_id)
        ams = client.pops["ams"]

        async def claim_round(i: int) -> None:
            raw = pool[i * batch * KEY_SIZE : min(i + 1, 5_000 // batch) * batch * KEY_SIZE]
            if not raw:
                return
            on_dead = table.primaries[table.partitions_of(key_hashes(raw))] == dead_index
            started = time.monotonic()
            res = await client.flow_packed("Claim", raw, pop="ams", ttl_s=TTL_S)
            ended = time.monotonic()
            # ALREADY_OWNED on a fresh key: our own claim was applied, its answer lost
            # (a retry at another replica found it). Acknowledged all the same.
            ok = (res["status"] == Status.CREATED) | (
                (res["status"] == Status.ALREADY_OWNED) & (res["owner_pop"] == ams)
            )
            for key, r, good in zip(rows(raw), res, ok, strict=True):
                statuses[Status(int(r["status"])).name] += 1
                if good:
                    acked[key] = (int(r["owner_pop"]), int(r["birth_hlc"]), int(r["birth_pop"]))
            failed = int(np.count_nonzero(res["status"] == Status.UNAVAILABLE))
            rounds.append(
                Round(
                    started,
                    ended,
                    len(res),
                    int(ok.sum()),
                    failed,
                    int(on_dead.sum()),
                    int((ok & on_dead).sum()),
                )
            )

        stop = asyncio.Event()
        load = asyncio.create_task(paced(stop, batch / rate, claim_round))
        outage_checks: list[int] = []
        try:
            await poll(lambda: _true_when(len(acked) >= 2 * rate, len(acked)), "warm-up claims", 20)
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.wait_for(victim.proc.wait(), 10)
            # While the node is dead, and the load goes on: every claim acknowledged
            # so far must be readable, again and again.
            while time.monotonic() < killed_at + 6:
                snapshot = dict(acked)
                lost, examples = await lost_by_lookup(reader, snapshot)
                assert lost == 0, f"{lost} acknowledged claims unreadable during outage: {examples}"
                outage_checks.append(len(snapshot))
                await asyncio.sleep(0.5)  # pacing of the checks, not a synchronisation
        finally:
            stop.set()
            skipped = await load
        stopped_at = time.monotonic()

        lost, examples = await lost_by_lookup(reader, acked)
        assert lost == 0, f"{lost} acknowledged claims lost after the outage: {examples}"

        # The failover, as the client saw it.
        dead_failures = [t - killed_at for t, a in client.failures if a == dead]
        assert dead_failures, "the client never noticed the dead node"
        assert min(dead_failures) >= 0, "failures on the victim before it was killed"
        after = [r for r in rounds if r.started >= killed_at]
        served = [r.ended - killed_at for r in after if r.dead_primary_acked == r.dead_primary > 0]
        assert served, "no claim on the dead node's partitions was acknowledged after the kill"
        failover_s = min(served)
        in_flight_or_after = [r for r in rounds if r.ended >= killed_at]
        stall_s = max(r.ended - r.started for r in in_flight_or_after)
        failed_keys = sum(r.failed for r in rounds)
        failed_after = [r.ended - killed_at for r in rounds if r.failed]
        report(
            f"sigkill: acked={len(acked)} failed(unavailable)={failed_keys} lost=0 "
            f"statuses={dict(statuses)} rounds={len(rounds)} skipped_slots={skipped} "
            f"outage_checks={len(outage_checks)} (up to {max(outage_checks)} flows each)"
        )
        report(
            f"sigkill: failover {failover_s:.3f} s (kill -> first round with the dead node's "
            f"keys all acknowledged); first failure on the dead node +{min(dead_failures):.3f} s, "
            f"last +{max(dead_failures):.3f} s ({len(dead_failures)} failed calls; load ran "
            f"{stopped_at - killed_at:.1f} s after the kill; the client retries a down node "
            f"every down_s={client.down_s} s); slowest round in flight at/after the kill "
            f"{stall_s:.3f} s; rounds with unavailable keys at "
            f"{[round(t, 2) for t in failed_after][:10]}"
        )
        assert failover_s < 10
        assert max(dead_failures) < 10
        assert min(dead_failures) < 10

        # Restart the killed node: it refills, says ready, and every copy agrees.
        started = time.monotonic()
        fresh = await cluster.restart(victim)
        await poll(lambda: _ready(http, fresh), "restarted node /readyz 200", 30)
        ready_s = time.monotonic() - started
        lost, examples = await lost_by_lookup(reader, acked)
        assert lost == 0, f"{lost} acknowledged claims lost after the restart: {examples}"
        await poll(lambda: converged(http, cluster), "digests equal on all nodes", 30)
        per_node = await lost_on_nodes(cluster.nodes, acked)
        assert all(n == 0 for n, _ in per_node.values()), per_node

        # The client takes the restarted node back: calls to it succeed again.
        base = len(client.failures)
        fresh_keys = rows(pool[5_000 * KEY_SIZE :])
        mine = [
            k
            for k in fresh_keys
            if table.primaries[table.partitions_of(key_hashes(k))][0] == dead_index
        ]

        async def back() -> tuple[bool, str]:
            before = len(client.failures)
            res = await client.flow_packed("Claim", mine.pop(), pop="ams", ttl_s=TTL_S)
            clean = len(client.failures) == before and res["status"][0] == Status.CREATED
            return clean, f"status {Status(int(res['status'][0])).name}"

        await poll(back, "client routes to the restarted node again", 15)
        rejoin_s = time.monotonic() - started
        report(
            f"sigkill: restarted node ready {ready_s:.2f} s after restart; client using it "
            f"again {rejoin_s:.2f} s after restart ({len(client.failures) - base} more failures)"
        )


async def _true_when(done: bool, info: Any) -> tuple[bool, Any]:
    return done, info


async def _ready(http: aiohttp.ClientSession, node: NodeProcess) -> tuple[bool, Any]:
    try:
        status, body = await admin_get(http, node, "/readyz")
    except (aiohttp.ClientError, TimeoutError) as e:
        return False, repr(e)
    return status == 200, body


# --------------------------------------------------------------------------- 2. SIGSTOP


@dataclass
class PopLedger:
    """What one PoP was told: the claim answer and the confirm answer, per flow."""

    claims: dict[bytes, tuple[int, int, int, int]] = field(default_factory=dict)
    confirms: dict[bytes, int] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)

    def acked(self, key: bytes, pop: int) -> Ack | None:
        c = self.claims.get(key)
        if c is None:
            return None
        status, owner, birth, birth_pop = c
        if status == Status.CREATED or (status == Status.ALREADY_OWNED and owner == pop):
            return (owner, birth, birth_pop)
        return None

    def record_claims(self, keys: list[bytes], res: ResultArray) -> None:
        for key, r in zip(keys, res, strict=True):
            self.statuses[f"claim_{Status(int(r['status'])).name}"] += 1
            self.claims[key] = (
                int(r["status"]),
                int(r["owner_pop"]),
                int(r["birth_hlc"]),
                int(r["birth_pop"]),
            )

    def record_confirms(self, keys: list[bytes], res: ResultArray) -> None:
        for key, r in zip(keys, res, strict=True):
            self.statuses[f"confirm_{Status(int(r['status'])).name}"] += 1
            self.confirms[key] = int(r["status"])

    async def claim_then_confirm(self, client: Client, pop: str, raw: bytes) -> None:
        """What a PoP does with new flows: claim them all, confirm the ones it won."""
        res = await client.flow_packed("Claim", raw, pop=pop, ttl_s=TTL_S)
        keys = rows(raw)
        self.record_claims(keys, res)
        won = [k for k in keys if self.acked(k, client.pops[pop])]
        if won:
            res = await client.flow_packed("Confirm", b"".join(won), pop=pop, ttl_s=TTL_S)
            self.record_confirms(won, res)


async def test_sigstop_beyond_failure_timeout_then_sigcont(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    batch = 20  # fresh flows per round; ams claims the first 15, fra the last 15
    cluster = await make_cluster(3, TWO_POPS)
    targets = [n.spec.grpc for n in cluster.nodes]
    victim = cluster.nodes[2]
    others = [n for n in cluster.nodes if n is not victim]
    pool = synthetic_keys(10_000, seed=22)
    ledgers = {"ams": PopLedger(), "fra": PopLedger()}
    used: list[bytes] = []

    async with (
        connect(targets, timeout_s=4) as ams_client,
        connect(targets, timeout_s=4) as fra_client,
        connect(targets, timeout_s=10) as reader,
    ):
        pops = ams_client.pops

        async def side(client: Client, pop: str, raw: bytes) -> None:
            await ledgers[pop].claim_then_confirm(client, pop, raw)

        async def race_round(i: int) -> None:
            raw = pool[i * batch * KEY_SIZE : (i + 1) * batch * KEY_SIZE]
            if not raw:
                return
            used.extend(rows(raw))
            n = len(raw) // KEY_SIZE
            cut = max(1, n // 4) * KEY_SIZE
            await asyncio.gather(
                side(ams_client, "ams", raw[: len(raw) - cut]),
                side(fra_client, "fra", raw[cut:]),
            )

        async def victim_seen_down() -> tuple[bool, Any]:
            views = [
                (await metrics(http, n)).value("dht_peer_up", peer=victim.spec.node_id)
                for n in others
            ]
            return all(v == 0 for v in views), views

        stop = asyncio.Event()
        load = asyncio.create_task(paced(stop, 0.1, race_round))
        paused_s = down_after_s = 0.0
        try:
            await poll(
                lambda: _true_when(len(ledgers["ams"].claims) >= 300, len(ledgers["ams"].claims)),
                "warm-up claims",
                20,
            )
            os.kill(victim.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                # Beyond the failure timeout: both peers route around the stopped node;
                # then keep writing a while longer (pacing, not synchronisation).
                await poll(victim_seen_down, "peers see the stopped node down", 15)
                down_after_s = time.monotonic() - stopped_at
                await asyncio.sleep(2.0)
            finally:
                os.kill(victim.pid, signal.SIGCONT)
                paused_s = time.monotonic() - stopped_at
            await poll(lambda: _ready(http, victim), "resumed node ready again", 30)
            # Keep the load on for a while after the resume (pacing).
            await asyncio.sleep(2.0)
        finally:
            stop.set()
            skipped = await load

        started = time.monotonic()
        await poll(lambda: converged(http, cluster), "digests equal on all nodes", 45)
        converge_s = time.monotonic() - started

        # Every node's own copy of every flow touched: identical on all three nodes.
        raw = b"".join(used)
        copies = [await node_copies(n, raw) for n in cluster.nodes]
        fields = ["status", "owner_pop", "birth_hlc", "birth_pop", "generation", "state"]
        for name in fields:
            differ = np.flatnonzero(
                (copies[0][name] != copies[1][name]) | (copies[0][name] != copies[2][name])
            )
            assert differ.size == 0, (
                f"{differ.size} flows whose copies differ in {name} between nodes, e.g. "
                f"{[flow_text(used[i]) for i in differ[:3]]}"
            )
        final = await reader.flow_packed("Lookup", raw)
        assert np.array_equal(final["owner_pop"], copies[0]["owner_pop"])

        lost: list[str] = []
        conflicts: list[str] = []
        moved_owner: list[str] = []
        unconfirmed: list[str] = []
        acked_total = both_created = 0
        for i, key in enumerate(used):
            got = final[i]
            got_ack: Ack = (int(got["owner_pop"]), int(got["birth_hlc"]), int(got["birth_pop"]))
            acks = {
                pop: a
                for pop, ledger in ledgers.items()
                if (a := ledger.acked(key, pops[pop])) is not None
            }
            acked_total += len(acks)
            if len(acks) == 2:
                # Both PoPs were told CREATED: the earlier birth must have won.
                both_created += 1
                want = min(acks.values(), key=lambda a: (a[1], a[2]))
                conflicts.append(f"{flow_text(key)}: acks {acks}, final {got_ack}")
            elif len(acks) == 1:
                (want,) = acks.values()
            else:
                want = None
            if want is not None and (got["status"] != Status.OK or got_ack != want):
                lost.append(
                    f"{flow_text(key)}: acknowledged {want}, final "
                    f"{Status(int(got['status'])).name} {got_ack}; ams "
                    f"{ledgers['ams'].claims.get(key)}, fra {ledgers['fra'].claims.get(key)}"
                )
            for pop, ledger in ledgers.items():
                c = ledger.claims.get(key)
                if c and c[0] == Status.OWNED_ELSEWHERE and c[1] != got_ack[0]:
                    moved_owner.append(f"{flow_text(key)}: {pop} was told owner {c[1]}, {got_ack}")
                if ledger.confirms.get(key) == Status.OK and not (
                    got["state"] == ESTABLISHED and got_ack[0] == pops[pop]
                ):
                    unconfirmed.append(f"{flow_text(key)}: {pop} confirmed, final {got}")

        m_victim = await metrics(http, victim)
        m_others = [await metrics(http, n) for n in others]
        hints = [m.value("dht_hints_delivered_total") for m in m_others]
        repaired = [m.value("dht_anti_entropy_repaired_records_total") for m in m_others]
        victim_repaired = m_victim.value("dht_anti_entropy_repaired_records_total")
        pauses = m_victim.value("dht_pauses_total")
        counts = {pop: dict(ledger.statuses) for pop, ledger in ledgers.items()}
        report(
            f"sigstop: paused {paused_s:.1f} s (peers saw it down after {down_after_s:.1f} s); "
            f"flows={len(used)} acked_claims={acked_total} lost={len(lost)} "
            f"both_created={both_created} owner_changed_after_owned_elsewhere="
            f"{len(moved_owner)} confirmed_not_established={len(unconfirmed)} "
            f"skipped_slots={skipped}; converged {converge_s:.1f} s after the load stopped"
        )
        report(f"sigstop: answers {counts}")
        report(
            f"sigstop: victim dht_pauses_total={pauses:.0f} "
            f"dht_resyncs_total={m_victim.value('dht_resyncs_total'):.0f} "
            f"ae_repaired_records={victim_repaired:.0f}; others hints_delivered={hints} "
            f"ae_repaired_records={repaired} quorum_failures="
            f"{[m.value('dht_quorum_failures_total') for m in m_others]}"
        )
        for line in conflicts[:5]:
            report(f"sigstop: conflict resolved (earliest birth wins): {line}")
        assert not lost, f"{len(lost)} acknowledged claims lost: {lost[:5]}"
        assert not moved_owner, f"owner changed after being reported: {moved_owner[:5]}"
        assert not unconfirmed, f"acknowledged confirms lost: {unconfirmed[:5]}"
        assert acked_total > 0
        assert pauses >= 1, "the stopped node did not detect its pause"
        assert sum(hints) + victim_repaired > 0, "nothing was handed off or repaired"


# --------------------------------------------------------------------------- 3. refill


async def test_restarted_node_refills_before_it_says_ready(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    n_records, batch = 50_000, 1_000
    cluster = await make_cluster(3)
    targets = [n.spec.grpc for n in cluster.nodes]
    raw = synthetic_keys(n_records, seed=33)
    step = batch * KEY_SIZE
    chunks = [raw[o : o + step] for o in range(0, len(raw), step)]

    async with connect(targets, timeout_s=10) as client:

        async def fill(chunk: bytes) -> None:
            res = await client.flow_packed("Claim", chunk, pop="ams", ttl_s=3600)
            assert np.all(res["status"] == Status.CREATED), Counter(res["status"].tolist())
            res = await client.flow_packed("Confirm", chunk, pop="ams", ttl_s=3600)
            assert np.all(res["status"] == Status.OK), Counter(res["status"].tolist())

        started = time.monotonic()
        for i in range(0, len(chunks), 4):
            await asyncio.gather(*(fill(c) for c in chunks[i : i + 4]))
        fill_s = time.monotonic() - started

    reference = await poll(lambda: converged(http, cluster), "digests equal after fill", 30)
    for n in cluster.nodes:
        assert (await metrics(http, n)).value("dht_records") == n_records

    victim = cluster.nodes[1]
    os.kill(victim.pid, signal.SIGKILL)
    await asyncio.wait_for(victim.proc.wait(), 10)

    # Watch the restarting node from the moment it is spawned. One /metrics scrape
    # holds both dht_ready and dht_records, read in one step by the node: so "ready"
    # is checked against "holds every record" atomically.
    samples: list[tuple[float, float, float]] = []  # (time, ready, records)
    watching = asyncio.Event()

    async def watch() -> None:
        while not watching.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                m = await metrics(http, victim)
                samples.append((time.monotonic(), m.value("dht_ready"), m.value("dht_records")))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watching.wait(), 0.02)  # pacing of the scrapes

    watcher = asyncio.create_task(watch())
    try:
        restarted = time.monotonic()
        fresh = await cluster.restart(victim)
        announced_s = time.monotonic() - restarted
        await poll(lambda: _ready(http, fresh), "restarted node /readyz 200", 10, 0.01)
        ready_s = time.monotonic() - restarted
        status, body = await admin_get(http, fresh, "/digests")
        m = await metrics(http, fresh)
        samples.append((time.monotonic(), m.value("dht_ready"), m.value("dht_records")))
    finally:
        watching.set()
        await watcher

    assert status == 200
    assert body["in_sync"]
    differ = [p for p, d in reference.items() if body["partitions"].get(p) != d]
    assert not differ, f"{len(differ)} partitions differ right after ready, e.g. {differ[:5]}"
    assert m.value("dht_records") == n_records
    early = [(round(t - restarted, 3), r) for t, ready, r in samples if ready and r != n_records]
    assert not early, f"ready before holding all {n_records} records: {early[:5]}"
    not_ready = [(round(t - restarted, 3), r) for t, ready, r in samples if not ready]
    first_ready = min((t for t, ready, _ in samples if ready), default=None)
    report(
        f"refill: {n_records} records filled in {fill_s:.1f} s; restart -> announce "
        f"{announced_s:.2f} s, -> /readyz 200 {ready_s:.2f} s; /metrics scrapes before "
        f"ready {len(not_ready)} (records seen {sorted({r for _, r in not_ready})[:6]}), "
        f"first ready scrape at "
        f"{'-' if first_ready is None else f'{first_ready - restarted:.2f} s'}"
    )


# --------------------------------------------------------------------------- 4. maybe-writes


async def test_unacknowledged_claim_never_overrides_an_acknowledged_one(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    """A claim the coordinator applied but could not replicate was answered UNAVAILABLE
    (not acknowledged). Its copy stays on that node. If another PoP then claims the same
    flow while that node is stopped, a write quorum of the other replicas acknowledges
    that claim. When the node comes back, its older unacknowledged copy must not take
    the flow from the acknowledged owner (docs/protocol.md#quorums: acknowledged means on W
    replicas;
    claims are create-once)."""
    cluster = await make_cluster(3, TWO_POPS)
    x, y, z = cluster.nodes
    async with connect([y.spec.grpc, z.spec.grpc], timeout_s=3) as client:
        table = client.table
        pops = client.pops
        x_index = table.index_of(x.spec.node_id)
        candidates = rows(synthetic_keys(500, seed=44))
        key = next(
            k
            for k in candidates
            if table.primaries[table.partitions_of(key_hashes(k))][0] == x_index
        )
        try:
            # 1. x is cut off from its replicas; fra's claim reaches only x.
            os.kill(y.pid, signal.SIGSTOP)
            os.kill(z.pid, signal.SIGSTOP)
            (fra,) = await direct_call(x, "Claim", key, pops["fra"], timeout_s=15)
            assert fra["status"] == Status.UNAVAILABLE, Status(int(fra["status"])).name
            # 2. Now x is the one stopped; y and z come back and see it down.
            os.kill(x.pid, signal.SIGSTOP)
            os.kill(y.pid, signal.SIGCONT)
            os.kill(z.pid, signal.SIGCONT)

            async def x_down_and_ready() -> tuple[bool, Any]:
                views = []
                for n in (y, z):
                    ready, _ = await _ready(http, n)
                    up = (await metrics(http, n)).value("dht_peer_up", peer=x.spec.node_id)
                    views.append((n.spec.node_id, ready, up))
                return all(r and up == 0 for _, r, up in views), views

            await poll(x_down_and_ready, "y and z ready, x down in their view", 20)
            # 3. ams claims the flow: a write quorum (y and z) acknowledges it.
            (ams,) = await client.claim([FlowKey.from_bytes(key)], pop="ams", ttl_s=TTL_S)
            assert ams.status == Status.CREATED, ams
        finally:
            for n in (x, y, z):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.pid, signal.SIGCONT)
        # 4. x is back; wait until every copy agrees.
        await poll(lambda: converged(http, cluster), "digests equal on all nodes", 30)
        (final,) = await client.lookup([FlowKey.from_bytes(key)])
        report(
            f"maybe-write: fra's unacknowledged claim birth {int(fra['birth_hlc'])} (status "
            f"UNAVAILABLE), ams's acknowledged claim birth {ams.birth_hlc} (CREATED); "
            f"final owner {final.owner_pop} birth {final.birth_hlc} "
            f"(ams={pops['ams']}, fra={pops['fra']})"
        )
        assert final.status == Status.OK
        assert (final.owner_pop, final.birth_hlc) == (pops["ams"], ams.birth_hlc), (
            f"the acknowledged claim of ams was lost to fra's unacknowledged one: {final}"
        )


# --------------------------------------------------------------------------- 5. refill gate


async def test_restarted_node_is_not_ready_until_a_replica_answered(
    make_cluster: MakeCluster, http: aiohttp.ClientSession
) -> None:
    """A restarted node whose replicas do not answer (stopped, not dead: connections
    hang rather than being refused) has refilled nothing, so it must not say ready
    (docs/protocol.md#resync-and-refill: /readyz means "holds all its partitions")."""
    n_records = 5_000
    cluster = await make_cluster(3)
    x, y, z = cluster.nodes
    raw = synthetic_keys(n_records, seed=55)
    async with connect([n.spec.grpc for n in cluster.nodes], timeout_s=10) as client:
        res = await client.flow_packed("Claim", raw, pop="ams", ttl_s=3600)
        assert np.all(res["status"] == Status.CREATED)
    await poll(lambda: converged(http, cluster), "digests equal after fill", 30)

    os.kill(x.pid, signal.SIGKILL)
    await asyncio.wait_for(x.proc.wait(), 10)
    os.kill(y.pid, signal.SIGSTOP)
    os.kill(z.pid, signal.SIGSTOP)
    resumed_at: float | None = None
    samples: list[tuple[float, float, float]] = []  # (since restart, ready, records)
    restarted = time.monotonic()
    restart = asyncio.create_task(cluster.restart(x))
    try:

        async def first_ready() -> tuple[bool, Any]:
            nonlocal resumed_at
            now = time.monotonic()
            if resumed_at is None and now - restarted > 6:
                # Long enough for every RPC timeout of the refill: let the replicas answer.
                os.kill(y.pid, signal.SIGCONT)
                os.kill(z.pid, signal.SIGCONT)
                resumed_at = now - restarted
            try:
                m = await metrics(http, x)
            except (aiohttp.ClientError, TimeoutError) as e:
                return False, repr(e)
            samples.append((now - restarted, m.value("dht_ready"), m.value("dht_records")))
            return m.value("dht_ready") == 1, samples[-1]

        at, _, records = await poll(first_ready, "restarted node ready", 40, 0.05)
    finally:
        for n in (y, z):
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.pid, signal.SIGCONT)
        await asyncio.wait_for(restart, 40)
    report(
        f"refill gate: replicas stopped for {resumed_at} s after the restart; restarted node "
        f"first ready at +{at:.2f} s holding {records:.0f} of {n_records} records"
    )
    assert records == n_records, (
        f"ready at +{at:.2f} s with {records:.0f} of {n_records} records while its replicas "
        f"were stopped (resumed at {resumed_at})"
    )
