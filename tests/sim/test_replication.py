"""Replication inside one PoP, scripted on the in-memory network: fencing by terms, undo
of a write that missed its quorum, a pinned copy left standing, a superseded claim.
Ported from tests/integration/test_replication.py (which keeps the real-socket cases)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from dht.core.ops import BatchCall, Op
from dht.core.placement import PartitionMap
from dht.core.record import State, Status
from dht.core.wire import ENTRY_DTYPE, KEY_DTYPE, ResultArray, key_hashes
from dht.tools.bench.keys import synthetic_keys

from .memnet import Network, SimNode, held_by

# The messages of a coordinated write's life (not probes, not anti-entropy).
WRITE_KINDS = ("Promise", "Replicate", "Undo", "ReadCopies")


def same_partition(net: Network, n: int, seed: int) -> list[bytes]:
    """``n`` flow keys of one partition."""
    pool = synthetic_keys(2_000, seed=seed, start=seed * 1_000_000)
    parts = next(iter(net.by_id.values())).node.table.partitions_of(key_hashes(pool))
    return [pool[i * 40 : (i + 1) * 40] for i in np.flatnonzero(parts == parts[0])[:n]]


def claim(raw: bytes, pop: int, no_forward: bool = False) -> BatchCall:
    return BatchCall(Op.CLAIM, raw, pop=pop, no_forward=no_forward)


async def test_a_coordinator_paused_mid_write_is_fenced_by_a_take_over() -> None:
    """X applies claim A locally and is paused as it sends A to the replicas. Y takes
    the partition over (a higher term, promised by Y and Z) and gets claim B
    acknowledged. X resumes and sends A late: both replicas refuse it as fenced, so A is
    never acknowledged; X undoes it, takes over again and answers with B's owner.
    Create-once holds: exactly one CREATED, and every replica converges on B."""
    async with Network(seed=1) as net:
        nodes = await net.start_pop(3)
        raw = synthetic_keys(1, seed=40, start=30_000_000)
        _, (x, y, z) = net.replicas(raw)

        stalled = net.pause_when(x.node_id, "Replicate")
        claim_a = asyncio.ensure_future(net.call(x.node_id, claim(raw, pop=1)))
        await net.wait(stalled, what="X sends A")
        mine = held_by(x, raw)[0]
        assert mine["status"] == Status.OK and mine["owner_pop"] == 1, "A applied on X"

        b = (await net.call(y.node_id, claim(raw, pop=2, no_forward=True)))[0]
        assert b["status"] == Status.CREATED and b["owner_pop"] == 2
        resumed_ms = net.now_ms()
        net.resume(x.node_id)
        a = (await claim_a)[0]

        assert a["status"] == Status.OWNED_ELSEWHERE and a["owner_pop"] == 2, a
        assert a["birth_hlc"] == b["birth_hlc"]
        assert [a["status"], b["status"]].count(Status.CREATED) == 1, "create-once"
        assert x.node.replicator.stats.fenced_writes >= 1
        assert x.node.rollbacks == 1
        # X's late write went out on its resume, and both replicas refused it.
        late = [e for e in net.trace if e.src == x.node_id and e.kind == "Replicate"]
        assert {(e.dst, e.sent_ms >= resumed_ms, e.outcome) for e in late} == {
            (y.node_id, True, "ok:fenced"),
            (z.node_id, True, "ok:fenced"),
        }

        await net.until(
            lambda: {int(held_by(n, raw)["birth_hlc"][0]) for n in nodes} == {b["birth_hlc"]},
            what="every replica holds B",
        )
        seen = (await net.call(z.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert seen["owner_pop"] == 2 and seen["birth_hlc"] == b["birth_hlc"]


async def test_a_write_that_missed_its_quorum_is_taken_back_where_replicas_took_it() -> None:
    """W=3 and the link from the coordinator X to the third replica Z is cut: Y takes
    the claim, Z never answers, so it is answered UNAVAILABLE and undone on X *and* on
    Y, and no hint keeps it for Z. Another PoP's claim of the flow is then acknowledged
    and stays the owner (the failed claim's earlier birth cannot come back to beat it)."""
    async with Network(seed=2) as net:
        await net.start_pop(3, write_quorum=3)
        raw = synthetic_keys(1, seed=42, start=32_000_000)
        _, (x, y, z) = net.replicas(raw)

        net.cut(x.node_id, z.node_id, both=False)
        failed = (await net.call(x.node_id, claim(raw, pop=1, no_forward=True)))[0]
        assert failed["status"] == Status.UNAVAILABLE
        assert held_by(x, raw)["status"][0] == Status.NOT_FOUND, "undone on the coordinator"
        assert held_by(y, raw)["status"][0] == Status.NOT_FOUND, "undone on the replica"
        assert held_by(z, raw)["status"][0] == Status.NOT_FOUND, "never reached"
        assert x.node.replicator.stats.undone_remote == 1
        assert y.node.undone_for_others == 1
        assert x.node.repair.hints.count(z.node_id) == 0, "no hint of a failed write"
        outcomes = {(e.dst, e.kind, e.outcome) for e in net.trace if e.src == x.node_id}
        assert (z.node_id, "Replicate", "timeout:cut") in outcomes
        assert (y.node_id, "Undo", "ok") in outcomes

        net.heal()
        await net.until(net.settled, what="settled after the heal")
        won = (await net.call(y.node_id, claim(raw, pop=2)))[0]
        assert won["status"] == Status.CREATED and won["owner_pop"] == 2
        again = (await net.call(z.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert again["owner_pop"] == 2 and again["birth_hlc"] == won["birth_hlc"]


async def test_a_failed_write_a_take_over_saw_stands_and_is_pulled_back() -> None:
    """As above (W=3, X cut from Z), but while X waits for Z, Z takes the partition over
    (for a claim of its own) and pulls Y's copies, A among them: Y pins A. X's undo then
    leaves A standing at Y, and X pulls it back in: the claim stands on every replica,
    consistently, though its caller was told UNAVAILABLE. (With W=3, R=1: a quorum read
    asks no other replica, so here the take-over is what pulls the copy.)"""
    async with Network(seed=3) as net:
        await net.start_pop(3, write_quorum=3)
        warm, raw, other = same_partition(net, 3, seed=49)
        _, (x, y, z) = net.replicas(raw)
        # X takes the partition over first, while it still reaches Z.
        assert (await net.call(x.node_id, claim(warm, pop=1)))["status"][0] == Status.CREATED

        net.cut(x.node_id, z.node_id)
        started = net.now_ms()
        claim_a = asyncio.ensure_future(net.call(x.node_id, claim(raw, pop=1, no_forward=True)))
        await net.until(lambda: held_by(y, raw)["status"][0] == Status.OK, what="Y took A")
        claim_c = asyncio.ensure_future(net.call(z.node_id, claim(other, pop=2, no_forward=True)))
        await net.until(lambda: held_by(z, raw)["status"][0] == Status.OK, what="Z pulled A")
        failed = (await claim_a)[0]

        assert failed["status"] == Status.UNAVAILABLE
        for sim in (x, y, z):
            copy = held_by(sim, raw)[0]
            assert copy["status"] == Status.OK and copy["birth_hlc"] == failed["birth_hlc"], sim
        assert x.node.replicator.stats.undo_refused == 1
        assert y.node.undone_for_others == 0
        # X's messages for A: to Y and Z (Z's timed out), the undo Y refused, the pull.
        steps = [
            (e.dst, e.kind, e.outcome)
            for e in net.trace
            if e.src == x.node_id and e.kind in WRITE_KINDS and e.sent_ms >= started
        ]
        assert steps == [
            (y.node_id, "Replicate", "ok"),
            (z.node_id, "Replicate", "timeout:cut"),
            (y.node_id, "Undo", "ok:kept 1"),
            (y.node_id, "ReadCopies", "ok"),
        ], steps
        # Z's own claim cannot reach X either: no quorum with W=3.
        assert (await claim_c)["status"][0] == Status.UNAVAILABLE

        net.heal()
        again = (await net.call(x.node_id, claim(raw, pop=2, no_forward=True)))[0]
        assert again["status"] == Status.OWNED_ELSEWHERE and again["owner_pop"] == 1


async def test_a_claim_that_loses_to_a_claim_on_one_replica_is_not_acknowledged() -> None:
    """Replica Z holds a claim of flow B by fra that coordinator X has not seen (a write
    answered as failed that could not be taken back there, planted here). ams then
    claims B at X; Z answers first (X's link to Y is slow) and reports it superseded,
    so it is not acknowledged on Y's word: X pulls fra's claim in, retries once, and
    the caller gets the winning owner."""
    async with Network(seed=4) as net:
        await net.start_pop(3)
        raw_a, raw_b = same_partition(net, 2, seed=44)
        _, (x, y, z) = net.replicas(raw_a)

        # X takes the partition over (pulling the replicas' copies) for flow A.
        assert (await net.call(x.node_id, claim(raw_a, pop=1)))["status"][0] == Status.CREATED
        keys_b = np.frombuffer(raw_b, dtype=KEY_DTYPE)
        planted = z.node.store.claim(
            keys_b, key_hashes(raw_b), pop=2, server=0, ttl_ms=60_000, now_ms=z.node.clock.wall_ms()
        )[0]
        net.set_delay(x.node_id, y.node_id, 50)
        got = (await net.call(x.node_id, claim(raw_b, pop=1)))[0]

        assert got["status"] == Status.OWNED_ELSEWHERE, got
        assert got["owner_pop"] == 2 and got["birth_hlc"] == planted["birth_hlc"]
        assert x.node.replicator.stats.superseded_writes == 1
        held = held_by(x, raw_b)[0]
        assert held["owner_pop"] == 2 and held["birth_hlc"] == planted["birth_hlc"]
        # Z answered first (superseded), Y later; then X pulled Z's claim in and took
        # its write back at Y, the replica that took it.
        steps = [
            (e.dst, e.kind, e.outcome)
            for e in net.trace
            if e.src == x.node_id and e.kind in WRITE_KINDS
        ]
        assert steps[-4:] == [
            (z.node_id, "Replicate", "ok:superseded"),
            (y.node_id, "Replicate", "ok"),
            (z.node_id, "ReadCopies", "ok"),
            (y.node_id, "Undo", "ok"),
        ], steps


async def test_a_new_primary_reads_a_quorum_until_it_holds_a_term() -> None:
    """V coordinates a claim that V and B acknowledge; A, the third replica, misses it
    (the link V -> A is cut). V dies and is declared dead, and in the new table A is the
    partition's primary. A's own copy lacks the acknowledged claim and A never took the
    partition over (it holds no term), so it must not answer the look-up from its copy
    alone (NOT_FOUND for a live connection is a reset): it reads a quorum, and takes the
    partition over in the background (once the change has settled) so that later reads
    are local again."""
    async with Network(seed=5) as net:
        nodes = await net.start_pop(3)
        members = nodes[0].node.table.members
        cfg = nodes[0].node.config
        for i in range(500):
            raw = synthetic_keys(1, seed=60, start=60_000_000 + i)
            part, (v, b, a) = net.replicas(raw)
            after = PartitionMap.build(
                [m for m in members if m.node_id != v.node_id],
                cfg.num_partitions,
                2,
                cfg.vnodes,
            )
            if after.members[int(after.replicas[part][0])].node_id == a.node_id:
                break
        else:
            raise AssertionError("no key whose third replica becomes the primary")

        net.cut(v.node_id, a.node_id, both=False)
        acked = (await net.call(v.node_id, claim(raw, pop=1)))[0]
        assert acked["status"] == Status.CREATED
        assert held_by(b, raw)["status"][0] == Status.OK
        assert held_by(a, raw)["status"][0] == Status.NOT_FOUND, "A missed the write"

        await net.stop(v.node_id, leave=False)
        await net.until(
            lambda: (
                [m.node_id for m in a.node.table.members] == [a.node_id, b.node_id]
                or [m.node_id for m in a.node.table.members] == [b.node_id, a.node_id]
            ),
            what="V declared dead at A",
        )
        assert int(a.node.table.primaries[part]) == a.node.self_index
        assert held_by(a, raw)["status"][0] == Status.NOT_FOUND, "not repaired yet"
        assert a.node.terms.held[part] == 0, "A never took the partition over"

        seen = (await net.call(a.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert seen["status"] == Status.OK and seen["owner_pop"] == 1, seen
        assert seen["birth_hlc"] == acked["birth_hlc"]
        reads = [e for e in net.trace if e.src == a.node_id and e.kind == "ReadCopies"]
        assert any(e.dst == b.node_id for e in reads), "a quorum read, not A's copy alone"
        # Once the membership change has settled, a read takes the partition over in the
        # background (not during the change: nodes may disagree on who is primary).
        await net.until(
            lambda: len(a.node.view.tables()) == 1 and a.node.view.epochs_agree(),
            what="the change settles at A",
        )
        await net.call(a.node_id, BatchCall(Op.LOOKUP, raw))
        await net.until(lambda: a.node.terms.held[part] > 0, what="A takes the partition over")
        again = (await net.call(a.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert again["status"] == Status.OK and again["birth_hlc"] == acked["birth_hlc"]


async def test_a_replica_still_being_handed_a_partition_does_not_count_its_own_copy() -> None:
    """V coordinates a claim that V and A acknowledge; B, the third replica, misses it.
    V dies: in the new table D is the partition's primary, and D's hand-off of it cannot
    finish (the link between D and A is cut, and B alone does not cover it). D's copy of the
    partition is incomplete, so a quorum read at D must not count it: D answers
    UNAVAILABLE (the caller tries another replica), never NOT_FOUND from its own empty
    copy plus B's stale one."""
    async with Network(seed=7) as net:
        # No anti-entropy during the test: B stays without the claim.
        nodes = await net.start_pop(4, anti_entropy_interval_s=600.0)
        members = nodes[0].node.table.members
        cfg = nodes[0].node.config
        for i in range(2_000):
            raw = synthetic_keys(1, seed=61, start=61_000_000 + i)
            part, (v, a, b) = net.replicas(raw)
            after = PartitionMap.build(
                [m for m in members if m.node_id != v.node_id],
                cfg.num_partitions,
                3,
                cfg.vnodes,
            )
            d_id = after.members[int(after.replicas[part][0])].node_id
            if d_id not in (v.node_id, a.node_id, b.node_id):
                break
        else:
            raise AssertionError("no key whose new primary is a new replica")
        d = net.by_id[d_id]

        net.cut(v.node_id, b.node_id, both=False)
        acked = (await net.call(v.node_id, claim(raw, pop=1)))[0]
        assert acked["status"] == Status.CREATED
        assert held_by(a, raw)["status"][0] == Status.OK
        assert held_by(b, raw)["status"][0] == Status.NOT_FOUND, "B missed the write"

        net.cut(d.node_id, a.node_id)
        await net.stop(v.node_id, leave=False)
        await net.until(
            lambda: (
                v.node_id not in {m.node_id for m in d.node.table.members}
                and len(d.node.view.tables()) == 1
            ),
            what="V declared dead at D and the change settled there",
        )
        assert int(d.node.table.primaries[part]) == d.node.self_index
        assert not d.node.part_ready[part], "D's hand-off of the partition is not done"

        seen = (await net.call(d.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert seen["status"] != Status.NOT_FOUND, "an acknowledged claim answered NOT_FOUND"
        assert seen["status"] == Status.UNAVAILABLE, seen

        net.heal()
        await net.until(lambda: bool(d.node.part_ready[part]), what="D's hand-off ends")
        found = (await net.call(d.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert found["status"] == Status.OK and found["birth_hlc"] == acked["birth_hlc"]


async def test_a_write_one_replica_refuses_by_its_floor_is_acknowledged_by_the_others() -> None:
    """X holds a term for the partition; Z was restarted, so its floor (above every term
    handed out before it started) refuses X's write as fenced. Nobody took the partition
    over: X and Y hold the write, W = 2 of 3, so it is acknowledged. (X once took Z's
    refusal for a promise of its own, decided another node had taken the partition over
    and pulled its copy, and answered UNAVAILABLE with the claim on two replicas.) X's
    next write takes the partition over again, above the term Z told of."""
    async with Network(seed=7) as net:
        await net.start_pop(3)
        keys = same_partition(net, 2, seed=71)
        part, (x, y, z) = net.replicas(keys[0])

        first = (await net.call(x.node_id, claim(keys[0], pop=1)))[0]
        assert first["status"] == Status.CREATED
        term = int(x.node.terms.held[part])
        assert term > 0
        floor = term + 1_000  # what a restart of Z does to its promises
        z.node.terms.promised[part] = floor

        second = (await net.call(x.node_id, claim(keys[1], pop=1)))[0]
        assert second["status"] == Status.CREATED, second
        refused = [
            e
            for e in net.trace
            if e.src == x.node_id and e.dst == z.node_id and e.kind == "Replicate"
        ]
        assert refused[-1].outcome == "ok:fenced"
        assert held_by(y, keys[1])["status"][0] == Status.OK
        assert x.node.terms.promised[part] == term, "a refusal is not a promise"
        assert x.node.terms.held[part] == 0, "but it ends X's term"

        third = (await net.call(x.node_id, claim(keys[1], pop=2)))[0]
        assert third["status"] == Status.OWNED_ELSEWHERE and third["owner_pop"] == 1
        assert int(x.node.terms.held[part]) > floor, "taken over above Z's floor"


async def test_a_replicas_floor_ends_every_term_below_it_at_once() -> None:
    """X holds terms for five partitions; Z restarts, and its floor fences every term
    handed out before it. X's first write after that is refused by Z: X ends its terms
    below the floor in every partition Z replicates, not only in that write's, and the
    take-over its retry runs covers them all. So its writes to the other four partitions
    are not refused again (each was once: a refused write, its undo and a take-over per
    partition, a storm of them after every restart)."""
    async with Network(seed=9) as net:
        await net.start_pop(3)
        pool = synthetic_keys(2_000, seed=91, start=91_000_000)
        keys = [pool[i * 40 : (i + 1) * 40] for i in range(2_000)]
        _, (x, _, z) = net.replicas(keys[0])
        by_part: dict[int, list[bytes]] = {}
        for k in keys:
            p, reps = net.replicas(k)
            if reps[0] is x:
                by_part.setdefault(p, []).append(k)
        parts = [p for p, ks in by_part.items() if len(ks) >= 2][:5]
        assert len(parts) == 5
        for p in parts:
            res = await net.call(x.node_id, claim(by_part[p][0], pop=1))
            assert res[0]["status"] == Status.CREATED
        assert (x.node.terms.held[parts] > 0).all()
        floor = int(x.node.terms.held[parts].max()) + 1_000
        z.node.terms.floor = floor  # Z restarted: it forgot its promises
        z.node.terms.promised[:] = floor

        stats = x.node.replicator.stats
        fenced, seen = stats.fenced_writes, len(net.trace)
        for p in parts:
            res = await net.call(x.node_id, claim(by_part[p][1], pop=1))
            assert res[0]["status"] == Status.CREATED, res
        assert stats.fenced_writes - fenced == 1, "refused by the floor once, not per partition"
        assert (x.node.terms.held[parts] > floor).all()
        promises = [e for e in net.trace[seen:] if e.src == x.node_id and e.kind == "Promise"]
        assert len(promises) == 2, f"one take-over (a promise from Y and Z): {promises}"


async def test_keys_of_a_call_refused_whole_as_fenced_are_retried_too() -> None:
    """X coordinates a claim of two keys of two partitions, P (X holds its term) and Q
    (Y and Z promised a higher term for Q since). Each replica refuses a coordinated
    call whole when any of its partitions is fenced, so the key of P misses its quorum
    too though X's term for P still holds. X retries both (after taking Q over again),
    not only the key of Q: both claims are acknowledged."""
    async with Network(seed=8) as net:
        await net.start_pop(3)
        pool = synthetic_keys(400, seed=81, start=81_000_000)
        keys = [pool[i * 40 : (i + 1) * 40] for i in range(400)]
        p, (x, y, z) = net.replicas(keys[0])
        ps = [k for k in keys if net.replicas(k)[0] == p]
        q = next(pt for k in keys if (pt := net.replicas(k)[0]) != p and net.replicas(k)[1][0] is x)
        qs = [k for k in keys if net.replicas(k)[0] == q]

        for raw in (ps[0], qs[0]):  # X takes P and Q over
            assert (await net.call(x.node_id, claim(raw, pop=1)))[0]["status"] == Status.CREATED
        assert x.node.terms.held[p] > 0 and x.node.terms.held[q] > 0
        higher = int(x.node.terms.held[[p, q]].max()) + 1_000
        for r in (y, z):
            r.node.terms.promised[q] = higher  # another coordinator took Q over

        res = await net.call(x.node_id, claim(ps[1] + qs[1], pop=1))
        assert list(res["status"]) == [Status.CREATED, Status.CREATED], res
        assert x.node.replicator.stats.fenced_writes >= 1
        assert int(x.node.terms.held[q]) > higher, "Q taken over again, above the promise"


async def test_a_leaving_replica_takes_no_part_in_write_quorums() -> None:
    """L, a replica of the key, has begun to leave; X, the coordinator, has not heard of
    it yet, and its link to the third replica Y is cut. Counting L, X would acknowledge
    the claim on {X, L}: one copy once L is gone, and not where a take-over in the table
    without L looks. L refuses it, so it is answered UNAVAILABLE and undone; with the
    link healed the claim is acknowledged on X and Y."""
    async with Network(seed=9) as net:
        await net.start_pop(3)
        raw = synthetic_keys(1, seed=91, start=91_000_000)
        _, (x, leaver, y) = net.replicas(raw)
        leaver.node.state.leaving = True  # as Liveness.leave sets it, before any announce
        net.cut(x.node_id, y.node_id)
        failed = (await net.call(x.node_id, claim(raw, pop=1, no_forward=True)))[0]
        assert failed["status"] == Status.UNAVAILABLE, failed
        assert held_by(leaver, raw)["status"][0] == Status.NOT_FOUND
        assert held_by(x, raw)["status"][0] == Status.NOT_FOUND, "undone"
        refused = [e for e in net.trace if e.src == x.node_id and e.dst == leaver.node_id]
        assert any(e.kind == "Replicate" and e.outcome == "ok:stale" for e in refused)

        net.heal()
        await net.until(
            lambda: x.node.view.is_up(y.node.table.members[y.node.self_index]), what="X sees Y"
        )
        acked = (await net.call(x.node_id, claim(raw, pop=1, no_forward=True)))[0]
        assert acked["status"] == Status.CREATED
        assert held_by(y, raw)["status"][0] == Status.OK
        assert held_by(leaver, raw)["status"][0] == Status.NOT_FOUND


async def test_a_quorum_read_does_not_count_a_replica_still_being_handed_the_partition() -> None:
    """V coordinates a claim that V and A acknowledge; B, the third replica, misses it.
    V dies: in the new table B is the partition's primary and D a new replica whose
    hand-off of it cannot finish (the link between D and A is cut). A look-up at B reads a
    quorum: B's own copy (complete, without the claim) and D's (empty: incomplete) made
    two answers, and B answered NOT_FOUND for an acknowledged claim (the chaos run's
    finding, docs/protocol.md#quorums). D's answer no longer counts, so B waits for A's,
    slower but holding the claim."""
    async with Network(seed=8) as net:
        nodes = await net.start_pop(4, anti_entropy_interval_s=600.0)
        members = nodes[0].node.table.members
        cfg = nodes[0].node.config
        for i in range(2_000):
            raw = synthetic_keys(1, seed=62, start=62_000_000 + i)
            part, (v, a, b) = net.replicas(raw)
            after = PartitionMap.build(
                [m for m in members if m.node_id != v.node_id],
                cfg.num_partitions,
                3,
                cfg.vnodes,
            )
            if after.members[int(after.replicas[part][0])].node_id == b.node_id:
                break
        else:
            raise AssertionError("no key whose stale replica becomes the primary")
        d = next(n for n in nodes if n.node_id not in (v.node_id, a.node_id, b.node_id))

        net.cut(v.node_id, b.node_id, both=False)
        acked = (await net.call(v.node_id, claim(raw, pop=1)))[0]
        assert acked["status"] == Status.CREATED
        assert held_by(b, raw)["status"][0] == Status.NOT_FOUND, "B missed the write"

        net.cut(d.node_id, a.node_id)
        net.set_delay(b.node_id, a.node_id, 300)  # A answers B last
        await net.stop(v.node_id, leave=False)
        await net.until(
            lambda: (
                v.node_id not in {m.node_id for m in b.node.table.members}
                and len(b.node.view.tables()) == 1
            ),
            what="V declared dead at B and the change settled there",
        )
        assert int(b.node.table.primaries[part]) == b.node.self_index
        assert b.node.terms.held[part] == 0, "B holds no term: it reads a quorum"
        assert not d.node.part_ready[part], "D's hand-off of the partition is not done"

        seen = (await net.call(b.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert seen["status"] == Status.OK, "an acknowledged claim answered NOT_FOUND"
        assert seen["birth_hlc"] == acked["birth_hlc"]


async def test_a_leaving_coordinators_writes_in_flight_end_before_its_hand_off() -> None:
    """V coordinates a claim and starts leaving while it is in flight (A's and B's links
    are slow, within the RPC timeout). D, a replica of the key in the table without V,
    hears of the leave at once and pulls the partition: from V, which hides the write in
    flight, and from A and B before the write reaches them. From the leave on, V's own
    copy no longer counts (it leaves with V): the write is acknowledged once A and B
    took it, and V lets it end before it pushes its partitions (docs/protocol.md#leave),
    so D gets the claim from V's push as well."""
    async with Network(seed=10) as net:
        nodes = await net.start_pop(4, anti_entropy_interval_s=600.0)
        raw = synthetic_keys(1, seed=92, start=92_000_000)
        _, (v, a, b) = net.replicas(raw)
        d = next(n for n in nodes if n.node_id not in (v.node_id, a.node_id, b.node_id))
        net.set_delay(v.node_id, a.node_id, 300)
        net.set_delay(v.node_id, b.node_id, 600)
        write = asyncio.ensure_future(net.call(v.node_id, claim(raw, pop=1, no_forward=True)))
        await net.until(lambda: bool(v.node.inflight), what="the write in flight at V")
        await net.stop(v.node_id, leave=True)
        acked = (await write)[0]
        assert acked["status"] == Status.CREATED, acked
        for other in (a, b):
            assert held_by(other, raw)["birth_hlc"][0] == acked["birth_hlc"]
        got = held_by(d, raw)
        assert got["status"][0] == Status.OK, "the hand-off did not carry the write"
        assert got["birth_hlc"][0] == acked["birth_hlc"]


async def test_a_leaving_coordinator_counts_only_the_others_copies() -> None:
    """V coordinates a claim and starts leaving while it is in flight: V's link to A is
    slow, its link to B cut, so the write reaches A late and B never. D, a replica of
    the key in the table without V, hears of the leave at once and pulls the partition
    from V (which hides the write in flight), A and B, all before the write lands on A,
    and V's own push to D fails (their link is cut now, as when a node starved past its
    SIGTERM runs out of leave time). Had V counted its own copy, the claim would have
    been acknowledged on V and A alone, D would have counted its early pulls as
    complete, and a read quorum of B and D would have answered NOT_FOUND for it. V's
    copy leaves with V: from the leave on, V counts only the others' copies, so the
    claim is answered UNAVAILABLE (and undone at A), and its retry at B, the new
    coordinator, is acknowledged where every read quorum sees it
    (docs/protocol.md#leave)."""
    async with Network(seed=13) as net:
        # No anti-entropy during the test: B and D get the claim from nowhere else.
        nodes = await net.start_pop(4, anti_entropy_interval_s=600.0)
        warm, raw = same_partition(net, 2, seed=94)
        part, (v, a, b) = net.replicas(raw)
        d = next(n for n in nodes if n.node_id not in (v.node_id, a.node_id, b.node_id))
        # V takes the partition over while its links are fast.
        warmed = (await net.call(v.node_id, claim(warm, pop=1, no_forward=True)))[0]
        assert warmed["status"] == Status.CREATED

        def pulled(frm: SimNode, since_ms: int) -> bool:
            """D's hand-off got through to ``frm`` (compared digests, fetched if need be)."""
            return any(
                (e.src, e.dst, e.kind) == (d.node_id, frm.node_id, "PartitionDigests")
                and e.sent_ms >= since_ms
                for e in net.trace
            )

        net.set_delay(v.node_id, a.node_id, 500, both=False)
        net.cut(v.node_id, b.node_id, both=False)
        write = asyncio.ensure_future(net.call(v.node_id, claim(raw, pop=1, no_forward=True)))
        await net.until(lambda: bool(v.node.inflight), what="the write in flight at V")
        left_ms = net.now_ms()
        leaving = asyncio.ensure_future(net.stop(v.node_id, leave=True))
        await net.until(
            lambda: pulled(a, left_ms) and pulled(b, left_ms), what="D's first pulls from A and B"
        )
        assert v.node_id not in {m.node_id for m in d.node.table.members}
        assert len(d.node.view.tables()) == 2, "the change has not settled at D"
        assert held_by(a, raw)["status"][0] == Status.NOT_FOUND, "the write not at A yet"
        net.cut(v.node_id, d.node_id)  # V's push to D will fail

        failed = (await write)[0]
        assert failed["status"] == Status.UNAVAILABLE, "acknowledged on V's own copy and A's"
        await net.wait(leaving, what="V's leave")
        pushed = [
            e.outcome
            for e in net.trace
            if (e.src, e.dst, e.kind) == (v.node_id, d.node_id, "PartitionDigests")
            and e.sent_ms >= left_ms
        ]
        assert pushed == ["timeout:cut"], "V's hand-off did not reach D"
        await net.until(
            lambda: len(d.node.view.tables()) == 1 and bool(d.node.part_ready[part]),
            what="the change settled at D and its hand-off done",
        )

        # The client's retry, at B: acknowledged, and a read quorum of B and D shows it.
        acked = (await net.call(b.node_id, claim(raw, pop=1, no_forward=True)))[0]
        assert acked["status"] == Status.CREATED, acked
        net.set_delay(b.node_id, a.node_id, 300)  # A answers B last: B reads {B, D}
        seen = (await net.call(b.node_id, BatchCall(Op.LOOKUP, raw, no_forward=True)))[0]
        assert seen["status"] == Status.OK and seen["birth_hlc"] == acked["birth_hlc"], seen


async def test_a_node_declared_dead_resyncs_from_enough_replicas_before_it_counts() -> None:
    """V, the partition's primary, is paused until the others declare it dead. In the
    table without V, a claim is acknowledged while Y, one of V's fellow replicas, misses
    it (the link from the coordinator to Y is cut). V resumes and refutes; its link to X,
    the other fellow replica that holds the claim, is cut. V kept its data, but the claim
    was acknowledged in a table without it, so Y alone is not enough: V must not count
    its own copy nor answer NOT_FOUND (a reset) until X took part in its resync."""
    async with Network(seed=11) as net:
        raw, acked, v, x = await declared_dead_with_a_claim_it_missed(net, seed=62)
        nodes = list(net.by_id.values())
        cfg = v.node.config
        assert held_by(v, raw)["status"][0] == Status.NOT_FOUND, "V was paused"

        net.cut(v.node_id, x.node_id)
        net.resume(v.node_id)
        await net.until(
            lambda: (
                all(v.node_id in {m.node_id for m in n.node.table.members} for n in nodes)
                and v.node.view.epochs_agree()
            ),
            what="V refuted and is back in every table",
        )
        await net.run_for(3 * cfg.probe_interval_s)
        seen = (await net.call(v.node_id, BatchCall(Op.LOOKUP, raw, no_forward=True)))[0]
        assert seen["status"] != Status.NOT_FOUND, "an acknowledged claim answered NOT_FOUND"
        assert not v.node.in_sync, "V's resync waits for X"

        net.heal()
        await net.until(lambda: v.node.in_sync, what="V in sync once X answers")
        found = (await net.call(v.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert found["status"] == Status.OK and found["birth_hlc"] == acked["birth_hlc"]


async def declared_dead_with_a_claim_it_missed(
    net: Network, seed: int
) -> tuple[bytes, ResultArray, SimNode, SimNode]:
    """Four nodes; V, a key's primary, paused until the others declare it dead, and a
    claim of the key acknowledged in the table without V while Y, V's other fellow
    replica, missed it. Returns the key, the acknowledged answer, V and X (the fellow
    replica that holds the claim). V is still paused."""
    # No anti-entropy during the test: Y stays without the claim.
    nodes = await net.start_pop(4, anti_entropy_interval_s=600.0)
    members = nodes[0].node.table.members
    cfg = nodes[0].node.config
    for i in range(2_000):
        raw = synthetic_keys(1, seed=seed, start=seed * 1_000_000 + i)
        part, (v, x, y) = net.replicas(raw)
        without_v = PartitionMap.build(
            [m for m in members if m.node_id != v.node_id], cfg.num_partitions, 3, cfg.vnodes
        )
        coord = net.by_id[without_v.members[int(without_v.replicas[part][0])].node_id]
        if coord is not y:
            break
    else:
        raise AssertionError("no key whose coordinator without V is not Y")
    others = [n for n in nodes if n is not v]
    net.pause(v.node_id)
    await net.until(
        lambda: all(
            v.node_id not in {m.node_id for m in n.node.table.members}
            and len(n.node.view.tables()) == 1
            and n.node.in_sync
            for n in others
        ),
        what="V declared dead, the change settled and handed off",
    )
    net.cut(coord.node_id, y.node_id, both=False)
    acked = (await net.call(coord.node_id, claim(raw, pop=1)))[0]
    assert acked["status"] == Status.CREATED
    assert held_by(y, raw)["status"][0] == Status.NOT_FOUND, "Y missed the write"
    return raw, acked, v, x


async def test_a_node_paused_past_the_suspicion_timeout_distrusts_its_copy_at_once() -> None:
    """V was paused long enough to be declared dead, and a claim was acknowledged without
    it that Y, its fellow replica, missed. V hears that it was declared dead only from
    the next gossip; a take-over or quorum read it starts before counts its own copy,
    and with Y's promise or answer misses the claim (in a rolling test a confirm then
    created the flow anew). So the pause alone, as long as the suspicion timeout, makes V
    distrust its copy at once, before any gossip; and it trusts it again once X, which
    holds the claim, took part in its resync."""
    async with Network(seed=12) as net:
        raw, acked, v, x = await declared_dead_with_a_claim_it_missed(net, seed=63)
        part = int(v.node.table.partitions_of(key_hashes(raw))[0])
        rumours = v.node.membership.declared_dead
        assert v.node.state.part_ready[part]
        net.cut(v.node_id, x.node_id)
        net.resume(v.node_id)
        v.node.liveness.check_pause()  # what V's first call or tick does on resuming
        assert v.node.membership.declared_dead == rumours, "no gossip heard yet"
        assert not v.node.state.part_ready[part], "V's own copy still counts"
        seen = (await net.call(v.node_id, BatchCall(Op.LOOKUP, raw, no_forward=True)))[0]
        assert seen["status"] != Status.NOT_FOUND, "an acknowledged claim answered NOT_FOUND"
        net.heal()
        await net.until(lambda: v.node.in_sync, what="V in sync once X answers")
        found = (await net.call(v.node_id, BatchCall(Op.LOOKUP, raw)))[0]
        assert found["status"] == Status.OK and found["birth_hlc"] == acked["birth_hlc"]


async def test_a_take_over_does_not_count_a_copy_that_stopped_counting_meanwhile() -> None:
    """V takes a partition over counting its own copy, and while its promises are out it
    learns that the others had declared it dead (its copy may lack writes acknowledged
    without it; gossip can come after a take-over was planned, and promises can reach
    replicas after they re-admitted V). With X cut off, Y's promise alone is not a
    quorum once V's copy no longer counts: the take-over fails."""
    async with Network(seed=13) as net:
        await net.start_pop(3)
        raw = synthetic_keys(1, seed=64, start=64_000_000)
        part, (v, x, _) = net.replicas(raw)
        net.cut(v.node_id, x.node_id)
        transport = v.node.replicator.transport
        promise = transport.promise

        async def gossip_arrives(*args: Any, **kwargs: Any) -> Any:
            v.node.liveness.start_resync(declared=True)
            return await promise(*args, **kwargs)

        transport.promise = gossip_arrives  # type: ignore[method-assign]
        parts = np.array([part], dtype=np.intp)
        term = v.node.terms.next_term(parts, v.node.clock.now())
        ok = await v.node.replicator.acquire(parts, term)
        assert not ok.any(), "a copy that stopped counting was counted"


async def test_a_later_write_replaces_a_failed_claim_its_undo_missed() -> None:
    """Replica Z took coordinator X's claim A of a flow, and X's undo of it never came (Z
    was starved past the RPC timeout, say). X, under the same term, then writes claim
    A2 of the flow (a retry, decided without A): A2 loses the merge to A's earlier birth,
    but Z puts it in A's place rather than answer superseded after the quorum was
    reached and keep A, which anti-entropy would later spread over the acknowledged A2.
    Where a quorum read pulled A from Z meanwhile (someone may have decided on it), A
    stands and the later write is answered superseded."""
    async with Network(seed=8) as net:
        await net.start_pop(3)
        raw, pulled = same_partition(net, 2, seed=63)
        part, (x, _, z) = net.replicas(raw)
        term = np.full(1, int(z.node.terms.promised[part]) + 1, dtype=np.uint64)

        def write(key: bytes, birth: int) -> tuple[int, int]:
            entry = np.zeros(1, dtype=ENTRY_DTYPE)
            entry["key"] = np.frombuffer(key, dtype=KEY_DTYPE)
            rec = entry["rec"]
            rec["status"], rec["state"], rec["generation"] = Status.OK, State.EMBRYONIC, 1
            rec["owner_pop"] = rec["birth_pop"] = 1
            rec["birth_hlc"], rec["partition"] = birth, part
            rec["expiry_ms"] = z.node.clock.wall_ms() + 60_000
            res = z.node.replica.replicate(entry.tobytes(), 0, term, x.node_id)
            return len(res.superseded), int(held_by(z, key)["birth_hlc"][0])

        first, later = z.node.clock.now(), z.node.clock.now() + 10
        assert write(raw, first) == (0, first)
        assert write(raw, later) == (0, later), "the failed claim replaced, not superseded"
        assert z.node.replica.replaced_failed == 1

        assert write(pulled, first) == (0, first)
        z.node.replica.read_copies(pulled)  # a quorum read pulls it: it stands
        assert write(pulled, later) == (1, first)
        assert z.node.replica.replaced_failed == 1
