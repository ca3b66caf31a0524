"""The shipping policy between PoPs, the link's bounded queue, and the sizing of small
PoPs (docs/protocol.md#shipping-between-pops). Pure: no sockets, time is an argument."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht.core import sizing
from dht.core.config import build_config
from dht.core.errors import ConfigError
from dht.core.record import State, Status, hlc_pack
from dht.core.wire import ENTRY_DTYPE, ENTRY_SIZE, KIND_AFFINITY, KIND_FLOW, RESULT_DTYPE
from dht.pops.shipping import (
    DelayLine,
    Kind,
    LagSamples,
    OutQueue,
    classify,
    exchanged_set,
    pop_digests,
    quantum_ms,
    refresh_due,
)

NOW = 1_800_000_000_000
BIRTH = hlc_pack(NOW - 60_000, 0)  # a claim made a minute ago


def entry(
    state: State,
    expiry_ms: int,
    birth_hlc: int = BIRTH,
    generation: int = 1,
    kind: int = KIND_FLOW,
    owner: int = 1,
    port: int = 1000,
) -> np.void:
    e = np.zeros(1, dtype=ENTRY_DTYPE)[0]
    e["key"]["kind"] = kind
    e["key"]["proto"] = 6 if kind == KIND_FLOW else 0
    e["key"]["cport"] = port if kind == KIND_FLOW else 0
    e["key"]["sport"] = 443 if kind == KIND_FLOW else 0
    e["rec"]["status"] = Status.OK
    e["rec"]["state"] = state
    e["rec"]["owner_pop"] = owner
    e["rec"]["birth_pop"] = owner
    e["rec"]["birth_hlc"] = birth_hlc
    e["rec"]["generation"] = generation
    e["rec"]["expiry_ms"] = expiry_ms
    return e


def kinds_of(
    pairs: list[tuple[np.void | None, np.void]], replicate_after_ms: int = 0
) -> list[Kind]:
    entries = np.array([a for _, a in pairs], dtype=ENTRY_DTYPE)
    before = np.zeros(len(pairs), dtype=RESULT_DTYPE)
    before["status"] = Status.NOT_FOUND
    for i, (b, _) in enumerate(pairs):
        if b is not None:
            before[i] = b["rec"]
    return [Kind(int(k)) for k in classify(entries, before, NOW, replicate_after_ms)]


LEASE = 600_000


def test_embryonic_is_never_shipped() -> None:
    emb = entry(State.EMBRYONIC, NOW + 10_000)
    assert kinds_of([(None, emb), (emb, entry(State.EMBRYONIC, NOW + 20_000))]) == [
        Kind.NONE,
        Kind.NONE,
    ]


def test_confirm_ships_established_once_old_enough() -> None:
    emb = entry(State.EMBRYONIC, NOW + 10_000)
    est = entry(State.ESTABLISHED, NOW + LEASE)
    assert kinds_of([(emb, est), (None, est)]) == [Kind.ESTABLISHED, Kind.ESTABLISHED]
    # Born a minute ago: with replicate_after 2 minutes it waits in the delay line.
    assert kinds_of([(emb, est)], replicate_after_ms=120_000) == [Kind.DELAY]
    assert kinds_of([(emb, est)], replicate_after_ms=60_000) == [Kind.ESTABLISHED]


def test_refresh_ships_only_when_the_remote_copy_would_lapse() -> None:
    old = entry(State.ESTABLISHED, NOW + LEASE - 1_000)
    # Refreshed one second later: same quantum (2**18 ms ~ 262 s): not shipped.
    q = int(quantum_ms(np.array([LEASE]))[0])
    assert q == 2**18
    base = (NOW + LEASE) // q * q  # a quantum boundary in the lease's range
    inside = entry(State.ESTABLISHED, base + 5_000)
    assert kinds_of([(entry(State.ESTABLISHED, base + 1_000), inside)]) == [Kind.NONE]
    crossing = entry(State.ESTABLISHED, base + 1_000)
    assert kinds_of([(entry(State.ESTABLISHED, base - 1_000), crossing)]) == [Kind.REFRESH]
    # A later generation or another birth is a new claim, shipped as such.
    assert kinds_of([(old, entry(State.ESTABLISHED, NOW + LEASE, generation=2))]) == [
        Kind.ESTABLISHED
    ]


def test_tombstones_ship_only_for_records_that_were_shipped() -> None:
    est = entry(State.ESTABLISHED, NOW + LEASE)
    tomb = entry(State.RELEASED, NOW + LEASE + 500)
    emb = entry(State.EMBRYONIC, NOW + 10_000)
    assert kinds_of([(est, tomb)]) == [Kind.TOMBSTONE]
    assert kinds_of([(emb, entry(State.RELEASED, NOW + 10_500))]) == [Kind.NONE]
    assert kinds_of([(tomb, tomb)]) == [Kind.NONE]  # released again: nothing new
    # Released while still younger than replicate_after: no PoP ever saw it.
    assert kinds_of([(est, tomb)], replicate_after_ms=120_000) == [Kind.NONE]


def test_affinity_ships_on_change() -> None:
    a1 = entry(State.NONE, NOW + 86_400_000, kind=KIND_AFFINITY, owner=1)
    a1_again = entry(State.NONE, NOW + 86_400_000 + 50, kind=KIND_AFFINITY, owner=1)
    a2 = entry(State.NONE, NOW + 86_400_000, kind=KIND_AFFINITY, owner=2)
    assert kinds_of([(None, a1), (a1, a1_again), (a1, a2)]) == [
        Kind.AFFINITY,
        Kind.NONE,
        Kind.AFFINITY,
    ]


@given(
    lease_s=st.integers(2, 86_400),
    interval_ms=st.integers(1, 60_000),
    steps=st.integers(1, 400),
    start=st.integers(0, 10**9),
)
def test_refreshes_never_let_the_remote_copy_lapse(
    lease_s: int, interval_ms: int, steps: int, start: int
) -> None:
    """Refresh every ``interval_ms`` with one lease; the remote copy holds the expiry of
    the last shipped refresh. While refreshes keep coming (interval < lease), it never
    lapses, and keeps at least a quarter of the lease in hand."""
    lease = lease_s * 1000
    if interval_ms >= lease:
        return
    now = NOW + start
    local = remote = now + lease
    shipped = 0
    for _ in range(steps):
        now += interval_ms
        new = now + lease
        if refresh_due(np.array([local]), np.array([new]), now)[0]:
            remote = new
            shipped += 1
        local = new
        assert remote - now >= lease // 4 - interval_ms, (lease, interval_ms, remote - now)
    # Far fewer ships than refreshes once the interval is small against the lease.
    if interval_ms * 16 <= lease:
        assert shipped <= steps // 4 + 1


def test_pop_digests_ignore_expiry_but_not_ownership() -> None:
    est = entry(State.ESTABLISHED, NOW + LEASE)
    later = entry(State.ESTABLISHED, NOW + LEASE + 60_000)
    other = entry(State.ESTABLISHED, NOW + LEASE, owner=2)
    emb = entry(State.EMBRYONIC, NOW + 10_000, port=2000)

    def digest(*es: np.void) -> int:
        arr = np.array(list(es), dtype=ENTRY_DTYPE)
        return int(pop_digests(arr, np.zeros(len(arr), dtype=np.intp), 1, NOW)[0][0])

    assert digest(est) == digest(later)
    assert digest(est) != digest(other)
    assert digest(est, emb) == digest(est)  # embryonic records are not compared
    tomb = entry(State.RELEASED, NOW + LEASE)
    assert exchanged_set(np.array([tomb, emb], dtype=ENTRY_DTYPE), NOW).tolist() == [True, False]


def test_out_queue_coalesces_bounds_and_resends() -> None:
    q = OutQueue(limit=3)
    rows = np.array([entry(State.ESTABLISHED, NOW + i, port=i + 1) for i in range(5)])
    kinds = np.full(5, Kind.ESTABLISHED, dtype=np.uint8)
    assert q.add(rows[:2].tobytes(), kinds[:2], 100) == 0
    assert q.add(rows[:1].tobytes(), kinds[:1], 200) == 0  # same key: replaced, not added
    assert len(q) == 2
    assert q.add(rows[2:].tobytes(), kinds[2:], 300) == 2  # room for one more only
    assert q.overflowed and q.dropped == 2
    batch = q.next_batch(2)
    assert batch is not None and len(batch) == 2 and batch.queued_ms.tolist() == [100, 100]
    assert q.next_batch(2) is batch  # unacknowledged: the same batch again
    assert len(q) == 3  # the batch in flight still counts against the buffer
    assert q.acked() is batch
    last = q.next_batch(10)
    assert last is not None and len(last.raw) == ENTRY_SIZE and last.seq == batch.seq + 1


def test_delay_line_and_lag_samples() -> None:
    d = DelayLine(limit=2)
    d.add([b"a", b"b", b"c"], [10, 20, 30])
    assert d.dropped == 1
    assert d.holds([b"a", b"b", b"c"]).tolist() == [True, True, False]
    assert d.due(15) == [b"a"] and d.due(15) == [] and d.due(25) == [b"b"]
    assert not d.holds([b"a", b"b"]).any() and not d.waiting
    lag = LagSamples(size=100)
    assert lag.quantile(0.5) is None
    lag.add(np.arange(1000, dtype=np.int64))
    p50, p99 = lag.quantile(0.5), lag.quantile(0.99)
    assert p50 is not None and p99 is not None and 400 < p50 < 600 < p99


def test_sizing_keeps_writes_going_in_small_pops() -> None:
    assert sizing.fit(3, None, pop_size=3, members=3) is None
    assert sizing.fit(3, None, pop_size=3, members=2) is None  # a PoP of 3 that lost one
    assert sizing.fit(3, 2, pop_size=2, members=2) is None  # configured W is kept
    two = sizing.fit(3, None, pop_size=2, members=2)
    assert two == sizing.Quorums(2, 1, 1, shrunk=True)
    assert sizing.fit(3, None, pop_size=1, members=1) == sizing.Quorums(1, 1, 1, shrunk=True)
    assert sizing.fit(5, None, pop_size=4, members=4) == sizing.Quorums(4, 2, 2, shrunk=True)


def test_pop_peer_configuration() -> None:
    cfg = build_config(
        {
            "node_id": "ams-1",
            "pop": "ams",
            "pops": {"ams": 1, "fra": 2, "lon": 3},
            "pop_peers": ["fra=127.0.0.1:7201,127.0.0.1:7202", "lon=127.0.0.1:7301"],
            "dial_via": ["127.0.0.1:7201=127.0.0.1:9201"],
            "replicate_after_s": 5,
        }
    )
    assert cfg.pop_peers == {
        "fra": ("127.0.0.1:7201", "127.0.0.1:7202"),
        "lon": ("127.0.0.1:7301",),
    }
    assert cfg.dial_via == {"127.0.0.1:7201": "127.0.0.1:9201"}
    table = build_config(
        {"node_id": "a", "pop": "ams", "pops": {"ams": 1, "fra": 2}, "pop_peers": {"fra": ["h:1"]}}
    )
    assert table.pop_peers == {"fra": ("h:1",)}
    base = {"node_id": "a", "pop": "ams", "pops": {"ams": 1, "fra": 2}}
    with pytest.raises(ConfigError, match="'zrh' is not in pops"):
        build_config({**base, "pop_peers": ["zrh=h:1"]})
    with pytest.raises(ConfigError, match="own PoP"):
        build_config({**base, "pop_peers": ["ams=h:1"]})
    with pytest.raises(ConfigError, match="want HOST:PORT=HOST:PORT"):
        build_config({**base, "dial_via": ["nonsense"]})
    with pytest.raises(ConfigError, match="replicate_after_s"):
        build_config({**base, "replicate_after_s": -1})
