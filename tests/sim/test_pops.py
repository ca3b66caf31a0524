"""Two PoPs on the in-memory network: claims of the same flows on both sides of a cut
link resolve, once it heals, to the earliest claim at both PoPs. Ported from
tests/system/test_pops.py (real processes behind proxies) with the policy of
tests/unit/test_shipping.py; tests/integration/test_pops.py keeps the gRPC cases."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dht.core.ops import BatchCall, Op
from dht.core.peers import replica_mask
from dht.core.record import Status
from dht.core.wire import KEY_DTYPE, KEY_SIZE, KeyArray, U64Array, key_hashes
from dht.tools.bench.keys import synthetic_keys

from .memnet import POPS, Network, SimNode


def _keys(raw: bytes) -> tuple[KeyArray, U64Array]:
    return np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw)


def _replicated(sim: SimNode, raw: bytes) -> npt.NDArray[np.bool_]:
    """Per key of ``raw``: does ``sim`` replicate its partition?"""
    table = sim.node.table
    mask: npt.NDArray[np.bool_] = replica_mask(table, sim.node.self_index)[
        table.partitions_of(key_hashes(raw))
    ]
    return mask


async def test_conflicting_claims_during_a_cut_resolve_to_the_earliest() -> None:
    async with Network(seed=7) as net:
        pops = await net.start_pops({"ams": 2, "fra": 2})
        ams, fra = pops["ams"], pops["fra"]
        before = synthetic_keys(100, seed=31)  # shipped everywhere before the cut
        x = synthetic_keys(50, seed=32, start=1000)  # claimed at ams first, then at fra
        y = synthetic_keys(50, seed=33, start=2000)  # claimed at fra first, then at ams
        released, kept = before[: 50 * KEY_SIZE], before[50 * KEY_SIZE :]

        async def confirm(at: SimNode, raw: bytes, pop: str) -> set[int]:
            res = await net.call(at.node_id, BatchCall(Op.CONFIRM, raw, pop=POPS[pop]))
            return set(res["status"].tolist())

        async def lookup(at: SimNode, raw: bytes) -> tuple[set[int], set[int]]:
            res = await net.call(at.node_id, BatchCall(Op.LOOKUP, raw))
            return set(res["status"].tolist()), set(res["owner_pop"].tolist())

        def everywhere(raw: bytes, status: Status, owner: str | None = None) -> bool:
            """Every node holds ``raw`` (its replicas of it) as ``status``, owned by
            ``owner``: read from the stores, without calls."""
            for sim in ams + fra:
                node = sim.node
                res = node.store.lookup(*_keys(raw), node.clock.wall_ms())
                mine = res[_replicated(sim, raw)]
                if set(mine["status"].tolist()) - {status}:
                    return False
                if owner is not None and set(mine["owner_pop"].tolist()) - {POPS[owner]}:
                    return False
            return True

        assert await confirm(ams[0], before, "ams") == {Status.CREATED}
        await net.until(lambda: everywhere(before, Status.OK, "ams"), what="shipped")

        net.isolate(s.node_id for s in ams)  # ams and fra no longer hear each other
        for first, second, raw in (("ams", "fra", x), ("fra", "ams", y)):
            assert await confirm(pops[first][0], raw, first) == {Status.CREATED}
            await net.run_for(0.05)
            # The other PoP's claim has not reached this side: it claims too.
            assert await confirm(pops[second][1], raw, second) == {Status.CREATED}
        released_at = await net.call(ams[1].node_id, BatchCall(Op.RELEASE, released, pop=1))
        assert set(released_at["status"].tolist()) == {Status.OK}
        await net.run_for(5)
        assert await lookup(fra[0], released) == ({Status.OK}, {POPS["ams"]}), "cut off"
        assert await lookup(ams[0], x) == ({Status.OK}, {POPS["ams"]})
        assert await lookup(fra[0], x) == ({Status.OK}, {POPS["fra"]})

        net.heal()
        healed = net.now_ms()

        def converged() -> bool:
            return (
                everywhere(x, Status.OK, "ams")
                and everywhere(y, Status.OK, "fra")
                and everywhere(released, Status.NOT_FOUND)
                and everywhere(kept, Status.OK, "ams")
            )

        await net.until(converged, timeout_s=60, what="every PoP agrees after the heal")
        took_ms = net.now_ms() - healed
        # It stays so: released flows do not come back, owners do not flip, over more
        # anti-entropy rounds (every 2 s in the test profile).
        for _ in range(5):
            await net.run_for(1)
            assert converged()
        for sim in (ams[0], fra[0]):
            assert await lookup(sim, x) == ({Status.OK}, {POPS["ams"]})
            assert await lookup(sim, y) == ({Status.OK}, {POPS["fra"]})
            assert (await lookup(sim, released))[0] == {Status.NOT_FOUND}
        assert sum(s.pops.conflicts for s in ams + fra) > 0
        assert took_ms < 30_000
        shipped = {e.outcome for e in net.trace if e.kind == "Ship"}
        assert {"ok", "timeout:cut"} <= shipped, shipped


async def test_stamps_beyond_the_clock_offset_are_rejected() -> None:
    """ams's clocks run 10 s fast (beyond max_clock_offset_ms): fra refuses the records
    it ships, whose births would win every conflict, and counts them."""
    async with Network(seed=8) as net:
        pops = await net.start_pops({"ams": 2, "fra": 2})
        for sim in pops["ams"]:
            net.set_clock_offset(sim.node_id, 10_000)
        raw = synthetic_keys(50, seed=14, start=9000)
        confirmed = await net.call(pops["ams"][0].node_id, BatchCall(Op.CONFIRM, raw, pop=1))
        assert set(confirmed["status"].tolist()) == {Status.CREATED}
        fra = pops["fra"]
        await net.until(lambda: sum(s.pops.rejected for s in fra) >= 50, what="rejections")
        assert sum(s.node.clock.rejected for s in fra) >= 50
        assert all(len(s.node.store) == 0 for s in fra)
        assert any(e.kind == "Ship" and e.outcome == "ok" for e in net.trace), "delivered"
