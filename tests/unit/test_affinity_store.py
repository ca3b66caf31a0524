"""The affinity store's capacity (docs/operations.md#configuration): new prefixes refused
per key past the soft limit, copies from replicas and PoPs refused past the hard ceiling,
counted."""

from __future__ import annotations

import numpy as np

from dht.core.record import Status
from dht.core.wire import ENTRY_DTYPE, KIND_AFFINITY
from dht.store.affinity import AffinityStore

NOW = 1_700_000_000_000


def prefixes(n: int, start: int = 0) -> np.ndarray:
    out = np.zeros((n, 16), dtype=np.uint8)
    out[:, 0] = 10
    out[:, 2] = (np.arange(start, start + n) // 256).astype(np.uint8)
    out[:, 3] = (np.arange(start, start + n) % 256).astype(np.uint8)
    return out


def copies(p: np.ndarray, pop: int, stamp: int) -> np.ndarray:
    e = np.zeros(len(p), dtype=ENTRY_DTYPE)
    e["key"]["kind"] = KIND_AFFINITY
    e["key"]["caddr"] = p
    e["rec"]["owner_pop"] = pop
    e["rec"]["birth_pop"] = pop
    e["rec"]["birth_hlc"] = stamp
    e["rec"]["expiry_ms"] = NOW + 60_000
    return e


def test_set_refuses_new_prefixes_past_the_limit_and_updates_held_ones() -> None:
    store = AffinityStore(max_records=3, hard_max_records=4)
    res = store.set(prefixes(5), 2, 10, NOW + 60_000)
    assert [Status(s) for s in res["status"]] == [Status.OK] * 3 + [Status.REFUSED_FULL] * 2
    assert int(res["owner_pop"][4]) == 0
    assert len(store) == 3
    res = store.set(prefixes(1), 3, 20, NOW + 60_000)
    assert [Status(s) for s in res["status"]] == [Status.OK]
    assert int(store.get(prefixes(1), NOW)["owner_pop"][0]) == 3
    assert store.refusals == {"full": 2, "hard": 0}


def test_merge_refuses_new_prefixes_past_the_hard_ceiling() -> None:
    store = AffinityStore(max_records=3, hard_max_records=4)
    store.set(prefixes(3), 2, 10, NOW + 60_000)
    assert store.merge_entries(copies(prefixes(4, start=10), 3, 20), NOW, 1000) == 1
    assert len(store) == 4
    assert store.refusals == {"full": 0, "hard": 3}
    # A held prefix is still merged at the ceiling.
    assert store.merge_entries(copies(prefixes(1), 3, 30), NOW, 1000) == 1
    assert int(store.get(prefixes(1), NOW)["owner_pop"][0]) == 3
    # Expiry makes room again.
    assert store.purge_expired(NOW + 120_000, 100) == 4
    assert store.merge_entries(copies(prefixes(2, start=50), 3, 40), NOW, 1000) == 2
