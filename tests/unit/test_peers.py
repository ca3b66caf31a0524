"""Peer health, coordinator choice and hints (pure parts of replication)."""

from __future__ import annotations

import numpy as np

from dht.core.peers import PeerHealth, coordinators, read_quorum, replica_mask, shared_partitions
from dht.core.placement import Member, PartitionMap
from dht.core.wire import ENTRY_DTYPE
from dht.node.repair import Hints


def test_health_goes_down_on_refusal_or_timeout_and_up_on_answer() -> None:
    h = PeerHealth(last_ok_ms=1_000)
    assert not h.failure(1_500, failure_timeout_ms=2_000)  # slow once: still up
    assert h.up
    assert h.failure(3_000, failure_timeout_ms=2_000)  # silent for the whole timeout
    assert not h.up
    assert h.success(3_100)
    assert h.up
    assert h.failure(3_200, failure_timeout_ms=2_000, unreachable=True)  # refused: at once
    assert not h.up
    assert h.success(3_300)
    # A call that started before the last answer is stale news.
    assert not h.failure(3_400, failure_timeout_ms=2_000, unreachable=True, started_ms=3_250)
    assert h.up
    assert h.transitions == 4


def test_coordinator_is_the_first_replica_that_is_up() -> None:
    pm = PartitionMap.build([Member(f"n{i}", "x") for i in range(4)], replication_factor=3)
    up = np.ones(4, dtype=bool)
    assert np.array_equal(coordinators(pm, up), pm.primaries.astype(np.int16))
    up[0] = False
    coord = coordinators(pm, up)
    hit = pm.replicas[:, 0] == 0
    assert np.array_equal(coord[hit], pm.replicas[hit, 1].astype(np.int16))
    assert np.array_equal(coord[~hit], pm.primaries[~hit].astype(np.int16))
    up[:] = False
    assert set(coordinators(pm, up).tolist()) == {-1}


def test_shared_partitions_and_quorums() -> None:
    pm = PartitionMap.build([Member(f"n{i}", "x") for i in range(5)], replication_factor=2)
    shared = shared_partitions(pm, 0, 1)
    assert np.all(replica_mask(pm, 0)[shared] & replica_mask(pm, 1)[shared])
    assert read_quorum(3, 2) == 2
    assert read_quorum(3, 3) == 1
    assert read_quorum(1, 1) == 1


def test_hints_keep_the_newest_copy_per_key_and_respect_the_limit() -> None:
    hints = Hints(limit=2)
    e = np.zeros(3, dtype=ENTRY_DTYPE)
    e["key"]["kind"] = 1
    e["key"]["cport"] = [1, 2, 3]
    e["rec"]["expiry_ms"] = [10, 20, 30]
    hints.add("b", e)
    assert hints.count("b") == 2
    assert hints.dropped == 1
    newer = e[:1].copy()
    newer["rec"]["expiry_ms"] = 99
    hints.add("b", newer)
    assert hints.count("b") == 2
    taken = np.frombuffer(hints.take("b", 10), dtype=ENTRY_DTYPE)
    assert sorted(taken["rec"]["expiry_ms"].tolist()) == [20, 99]
    assert hints.count("b") == 0
