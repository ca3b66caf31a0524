"""The flow record store: layout, capacity, quota and expiry (docs/protocol.md#merge-rule,
#capacity-and-quota).

No sockets, no sleeps: time is a number handed to every call, and the HLC reads a fake
wall clock. The last test checks the store against a dict-of-Record model built from
the same pure decisions (dht.core.record) over random operation sequences.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht.core import digest, wire
from dht.core.config import StoreLimits
from dht.core.errors import ConfigError
from dht.core.ops import Op
from dht.core.record import (
    Acting,
    Change,
    HybridClock,
    Record,
    State,
    Status,
    TtlPolicy,
    decide_claim,
    decide_confirm,
    decide_lookup,
    decide_refresh,
    decide_release,
    hlc_pack,
    merge,
)
from dht.core.wire import EntryArray, KeyArray, ResultArray, U64Array
from dht.store.flows import FlowStore, MergeStats
from dht.store.merge import SMALL_MERGE
from dht.store.quota import PrefixQuota

T0 = 1_700_000_000_000
GRACE = 1_000  # the maximum clock offset: a copy is dead this long after its expiry
POLICY = TtlPolicy(
    embryonic_ms=10_000,
    established_tcp_ms=600_000,
    established_udp_ms=120_000,
    tombstone_extra_ms=GRACE,
)

A4 = "tcp/198.51.100.7:51000/192.0.2.1:443"
B4 = "udp/198.51.100.7:51001/192.0.2.1:53"
C4 = "tcp/198.51.100.8:51000/192.0.2.1:443"
A6 = "tcp/[2001:db8:0:1::7]:51000/[2001:db8::1]:443"
B6 = "udp/[2001:db8:0:1::8]:51000/[2001:db8::1]:443"  # same /64 as A6
C6 = "tcp/[2001:db8:0:2::7]:51000/[2001:db8::1]:443"


@dataclass
class Env:
    """A store with a fake wall clock the test moves."""

    limits: StoreLimits = field(default_factory=StoreLimits)
    now: int = T0

    def __post_init__(self) -> None:
        self.clock = HybridClock(1000, wall_ms=lambda: self.now)
        self.store = FlowStore(POLICY, self.limits, self.clock)

    def claim(self, *flows: str, pop: int = 1, server: int = 0, ttl: int | None = None):
        return self.store.claim(*keys(*flows), pop=pop, server=server, ttl_ms=ttl, now_ms=self.now)

    def confirm(self, *flows: str, pop: int = 1, server: int = 0, ttl: int | None = None):
        return self.store.confirm(
            *keys(*flows), pop=pop, server=server, ttl_ms=ttl, now_ms=self.now
        )

    def refresh(self, *flows: str, pop: int = 1, ttl: int | None = None):
        return self.store.refresh(*keys(*flows), pop=pop, ttl_ms=ttl, now_ms=self.now)

    def release(self, *flows: str, pop: int = 1):
        return self.store.release(*keys(*flows), pop=pop, now_ms=self.now)

    def lookup(self, *flows: str):
        return self.store.lookup(*keys(*flows), self.now)

    def get(self, flow: str) -> Record | None:
        return self.store.get(wire.parse_flow(flow).to_bytes())

    def merge(self, flows: list[str], recs: list[Record]) -> MergeStats:
        return self.store.merge_in(*keys(*flows), results(recs), self.now)

    def snapshot(self) -> list[bytes]:
        """Every stored copy, expired ones too, as sorted entry bytes."""
        raw = self.store.export_entries(None, 1, -(2**62)).tobytes()
        return sorted(raw[i : i + wire.ENTRY_SIZE] for i in range(0, len(raw), wire.ENTRY_SIZE))


def keys(*flows: str) -> tuple[KeyArray, U64Array]:
    raw = b"".join(wire.parse_flow(f).to_bytes() for f in flows)
    return wire.decode_keys(raw, max_keys=10**6), wire.key_hashes(raw)


def packed(raw: bytes) -> tuple[KeyArray, U64Array]:
    return wire.decode_keys(raw, max_keys=10**6), wire.key_hashes(raw)


def statuses(res: ResultArray) -> list[Status]:
    return [Status(int(s)) for s in res["status"]]


def results(recs: list[Record]) -> ResultArray:
    """Records as the RESULT_DTYPE rows merge_in takes."""
    out = wire.new_results(len(recs))
    for i, rec in enumerate(recs):
        wire.put_result(out, i, Status.OK, rec)
    return out


def shown(res: ResultArray, i: int = 0) -> Record:
    r = res[i]
    return Record(
        int(r["owner_pop"]),
        int(r["owner_server"]),
        State(int(r["state"])),
        int(r["birth_hlc"]),
        int(r["birth_pop"]),
        int(r["generation"]),
        int(r["expiry_ms"]),
    )


def random_keys(rng: np.random.Generator, n: int, v6_share: float = 0.3) -> bytes:
    """n distinct random flow keys, IPv4 and IPv6 mixed."""
    raw = np.zeros((n, wire.KEY_SIZE), dtype=np.uint8)
    raw[:, 0] = wire.KIND_FLOW
    raw[:, 1] = rng.choice([6, 17], n)
    raw[:, 2:18] = rng.integers(0, 256, (n, 16))
    raw[:, 20:36] = rng.integers(0, 256, (n, 16))
    raw[:, 2] = 0x20  # never IPv4-mapped by accident
    raw[:, 20] = 0x20
    v4 = rng.random(n) >= v6_share
    for start in (2, 20):
        raw[v4, start : start + 10] = 0
        raw[v4, start + 10 : start + 12] = 0xFF
    raw[:, 18:20] = rng.integers(1, 256, (n, 2))  # ports never 0
    raw[:, 36:38] = rng.integers(1, 256, (n, 2))
    return np.unique(raw, axis=0).tobytes()


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("flow", [A4, A6])
def test_claim_confirm_refresh_release_lifecycle(flow: str) -> None:
    env = Env()
    res = env.claim(flow, pop=3, server=7)
    assert statuses(res) == [Status.CREATED]
    rec = shown(res)
    assert rec == Record(3, 7, State.EMBRYONIC, hlc_pack(T0, 0), 3, 1, T0 + 10_000)
    assert env.get(flow) == rec
    assert shown(env.lookup(flow)) == rec
    assert statuses(env.lookup(flow)) == [Status.OK]

    env.now += 1_000
    res = env.confirm(flow, pop=3, server=7)
    assert statuses(res) == [Status.OK]
    assert shown(res).state == State.ESTABLISHED
    assert shown(res).birth_hlc == rec.birth_hlc  # birth never changes
    assert shown(res).expiry_ms == env.now + 600_000

    env.now += 5_000
    res = env.refresh(flow, pop=3, ttl=900_000)
    assert statuses(res) == [Status.OK]
    assert shown(res).expiry_ms == env.now + 900_000

    res = env.release(flow, pop=3)
    assert statuses(res) == [Status.OK]
    tomb = env.get(flow)
    assert tomb is not None and tomb.state == State.RELEASED
    assert tomb.expiry_ms == env.now + 900_000 + 1_000  # outlives the record + max offset
    assert statuses(env.lookup(flow)) == [Status.NOT_FOUND]
    assert statuses(env.release(flow, pop=3)) == [Status.OK]  # releasing again is fine
    assert statuses(env.refresh(flow, pop=3)) == [Status.NOT_FOUND]
    family = "ipv4" if flow == A4 else "ipv6"
    assert env.store.counts()[(family, "released")] == 1
    assert len(env.store) == 1


def test_udp_gets_udp_ttl_and_not_found_rows_are_empty() -> None:
    env = Env()
    res = env.confirm(B4, C6)
    assert shown(res, 0).expiry_ms == T0 + 120_000  # udp
    assert shown(res, 1).expiry_ms == T0 + 600_000  # tcp
    res = env.lookup(A4, B4, A6)
    assert statuses(res) == [Status.NOT_FOUND, Status.OK, Status.NOT_FOUND]
    for i in (0, 2):
        row = res[i].tolist()
        assert row[0] == Status.NOT_FOUND and not any(row[1:])


@pytest.mark.parametrize("flow", [A4, A6])
def test_expiry_checked_on_read(flow: str) -> None:
    env = Env()
    env.claim(flow)
    env.now = T0 + 10_000 - 1
    assert statuses(env.lookup(flow)) == [Status.OK]
    env.now = T0 + 10_000
    assert statuses(env.lookup(flow)) == [Status.NOT_FOUND]
    assert statuses(env.refresh(flow)) == [Status.NOT_FOUND]
    assert statuses(env.release(flow)) == [Status.NOT_FOUND]
    assert env.get(flow) is not None  # still stored until purged
    assert env.store.get(wire.parse_flow(flow).to_bytes(), now_ms=env.now) is None


def test_claim_is_create_once() -> None:
    env = Env()
    first = shown(env.claim(A4, A6, pop=1, server=4))
    before = env.snapshot()
    for op in (env.claim, env.confirm):
        res = op(A4, A6, pop=2)
        assert statuses(res) == [Status.OWNED_ELSEWHERE] * 2
        assert shown(res).owner_pop == 1 and shown(res).owner_server == 4
    assert statuses(env.refresh(A4, pop=2)) == [Status.OWNED_ELSEWHERE]
    assert statuses(env.release(A4, pop=2)) == [Status.OWNED_ELSEWHERE]
    assert env.snapshot() == before
    # The owner's own claim refreshes and keeps the birth.
    env.now += 3_000
    res = env.claim(A4, pop=1)
    assert statuses(res) == [Status.ALREADY_OWNED]
    assert shown(res).birth_hlc == first.birth_hlc
    assert shown(res).expiry_ms == env.now + 10_000


def test_mutate_takes_the_flow_ops_that_change_records() -> None:
    via_mutate, via_wrappers = Env(), Env()
    k, h = keys(A4, A6)
    wrappers = {
        Op.CLAIM: lambda s: s.claim(k, h, pop=1, server=3, ttl_ms=None, now_ms=T0),
        Op.CONFIRM: lambda s: s.confirm(k, h, pop=1, server=3, ttl_ms=None, now_ms=T0),
        Op.REFRESH: lambda s: s.refresh(k, h, pop=1, ttl_ms=5_000, now_ms=T0),
        Op.RELEASE: lambda s: s.release(k, h, pop=1, now_ms=T0),
    }
    for op, wrapper in wrappers.items():
        server = 3 if op.creates else 0
        ttl = 5_000 if op is Op.REFRESH else None
        got = via_mutate.store.mutate(op, k, h, pop=1, server=server, ttl_ms=ttl, now_ms=T0)
        assert got.tolist() == wrapper(via_wrappers.store).tolist(), op
    assert via_mutate.snapshot() == via_wrappers.snapshot()
    # Lookups and the affinity ops are not flow mutations.
    for op in set(Op) - set(wrappers):
        with pytest.raises(ValueError):
            via_mutate.store.mutate(op, k, h, pop=1, server=0, ttl_ms=None, now_ms=T0)
    assert via_mutate.snapshot() == via_wrappers.snapshot()


def test_generation_grows_over_release_and_expiry() -> None:
    env = Env()
    assert shown(env.claim(A6, pop=1)).generation == 1
    env.release(A6, pop=1)
    res = env.claim(A6, pop=2)
    assert statuses(res) == [Status.CREATED]
    assert (shown(res).generation, shown(res).owner_pop) == (2, 2)
    env.now += 10_000  # the embryo expires
    res = env.claim(A6, pop=3)
    assert statuses(res) == [Status.CREATED]
    assert (shown(res).generation, shown(res).owner_pop) == (3, 3)
    env.now += 10_000
    res = env.confirm(A6, pop=1)
    assert (statuses(res), shown(res).generation) == ([Status.CREATED], 4)
    assert len(env.store) == 1


def test_tombstone_hides_the_flow_and_is_purged_only_after_its_expiry() -> None:
    env = Env()
    env.confirm(A4, pop=1)
    env.release(A4, pop=1)
    tomb = env.get(A4)
    assert tomb is not None
    assert statuses(env.lookup(A4)) == [Status.NOT_FOUND]
    # Kept for the maximum clock offset past its expiry, then purged.
    assert env.store.purge_expired(tomb.expiry_ms + GRACE - 1) == 0
    assert env.get(A4) == tomb
    assert env.store.purge_expired(tomb.expiry_ms + GRACE) == 1
    assert env.get(A4) is None and len(env.store) == 0
    assert env.store.expirations == 1
    assert sum(env.store.counts().values()) == 0


def test_duplicate_keys_in_one_batch_apply_in_order() -> None:
    env = Env()
    res = env.claim(A4, A6, A4, B4, A6)
    assert statuses(res) == [
        Status.CREATED,
        Status.CREATED,
        Status.ALREADY_OWNED,
        Status.CREATED,
        Status.ALREADY_OWNED,
    ]
    assert shown(res, 0).birth_hlc == shown(res, 2).birth_hlc
    assert len(env.store) == 3
    res = env.confirm(C4, C4, A4)
    assert statuses(res) == [Status.CREATED, Status.OK, Status.OK]
    assert shown(res, 1).state == State.ESTABLISHED
    res = env.release(A4, A4)
    assert statuses(res) == [Status.OK, Status.OK]
    assert env.get(A4) is not None and env.get(A4).state == State.RELEASED
    # Claim over the tombstone, then the owner's claim again, in one batch.
    res = env.claim(A4, A4, pop=2)
    assert statuses(res) == [Status.CREATED, Status.ALREADY_OWNED]
    assert shown(res, 1).generation == 2
    assert env.store.counts()[("ipv4", "embryonic")] == 2  # A4 and B4
    # merge_in of two copies of one key: the merge of both wins.
    low = Record(5, 0, State.ESTABLISHED, 10, 5, 1, T0 + 50)
    high = Record(6, 0, State.ESTABLISHED, 20, 6, 2, T0 + 40)
    assert env.merge([C6, C6], [high, low]) == MergeStats(applied=1, refused=0)
    assert env.get(C6) == high


# --------------------------------------------------------------------------- layout


def test_growth_through_many_resizes_then_delete_and_reuse() -> None:
    env = Env()
    raw = random_keys(np.random.default_rng(7), 50_000)
    n = len(raw) // wire.KEY_SIZE
    step = 1000 * wire.KEY_SIZE
    for start in range(0, len(raw), step):
        k, h = packed(raw[start : start + step])
        res = env.store.claim(k, h, pop=1, server=2, ttl_ms=60_000, now_ms=env.now)
        assert (res["status"] == Status.CREATED).all()
    assert len(env.store) == n
    tables = env.store._tables
    assert all(len(t.index) >= 16 * 1024 for t in tables)  # grew from 1024 several times
    k, h = packed(raw)
    res = env.store.lookup(k, h, env.now)
    assert (res["status"] == Status.OK).all()
    assert (res["owner_server"] == 2).all()

    # Release every other key, let the tombstones run out, purge them all.
    k2, h2 = packed(b"".join(raw[i : i + 40] for i in range(0, len(raw), 80)))
    assert (env.store.release(k2, h2, pop=1, now_ms=env.now)["status"] == Status.OK).all()
    keep, keep_h = packed(b"".join(raw[i + 40 : i + 80] for i in range(0, len(raw) - 40, 80)))
    env.store.refresh(keep, keep_h, pop=1, ttl_ms=3_600_000, now_ms=env.now)
    env.now += 60_000 + 2 * GRACE  # the tombstones' expiry, then dead
    while env.store.purge_expired(env.now, budget=10_000):
        pass
    assert len(env.store) == len(keep)
    res = env.store.lookup(keep, keep_h, env.now)
    assert (res["status"] == Status.OK).all()
    res = env.store.lookup(k2, h2, env.now)
    assert (res["status"] == Status.NOT_FOUND).all()

    # New keys reuse the freed rows instead of growing the tables.
    high = [t.high for t in tables]
    fresh = random_keys(np.random.default_rng(8), 20_000)
    fk, fh = packed(fresh)
    res = env.store.confirm(fk, fh, pop=4, server=0, ttl_ms=None, now_ms=env.now)
    assert (res["status"] == Status.CREATED).all()
    assert [t.high for t in tables] == high
    assert (env.store.lookup(keep, keep_h, env.now)["status"] == Status.OK).all()
    assert (env.store.lookup(fk, fh, env.now)["owner_pop"] == 4).all()
    assert len(env.store) == len(keep) + len(fk)


def test_purge_honours_the_budget_and_rotates() -> None:
    env = Env()
    flows4 = [f"tcp/10.0.0.{i}:1000/192.0.2.1:443" for i in range(1, 11)]
    flows6 = [f"tcp/[2001:db8::{i}]:1000/[2001:db8::1]:443" for i in range(1, 11)]
    env.claim(*flows4[::2], *flows6[::2])  # embryos: expire at T0 + 10 s
    env.confirm(*flows4[1::2], *flows6[1::2])  # established: live on
    env.now += 10_000 + GRACE
    removed = []
    for _ in range(4):  # 20 rows, 5 per call: each row is seen exactly once
        got = env.store.purge_expired(env.now, budget=5)
        assert got <= 5
        removed.append(got)
    assert sum(removed) == 10
    assert env.store.expirations == 10
    assert env.store.purge_expired(env.now, budget=100) == 0
    assert len(env.store) == 10
    assert env.store.counts()[("ipv4", "established")] == 5
    assert env.store.counts()[("ipv6", "embryonic")] == 0


# --------------------------------------------------------------------------- capacity


def test_soft_limit_refuses_only_new_embryonic_claims() -> None:
    env = Env(StoreLimits(max_records=3, hard_max_records=5))
    assert statuses(env.claim(A4, B4, A6)) == [Status.CREATED] * 3
    res = env.claim(C4, C6)
    assert statuses(res) == [Status.REFUSED_FULL] * 2
    assert not any(res[0].tolist()[1:])  # a refusal shows no record
    assert env.store.refusals == {"full": 2, "quota": 0, "hard": 0, "embryonic_copy": 0}
    assert len(env.store) == 3
    assert statuses(env.claim(A4)) == [Status.ALREADY_OWNED]  # the owner's claim works
    assert statuses(env.refresh(B4)) == [Status.OK]
    assert statuses(env.claim(A4, pop=2)) == [Status.OWNED_ELSEWHERE]
    # Confirm is not refused by the soft limit, only at the hard ceiling.
    assert statuses(env.confirm(A4, C4, C6)) == [Status.OK, Status.CREATED, Status.CREATED]
    res = env.confirm(B6)
    assert statuses(res) == [Status.REFUSED_FULL]
    assert env.store.refusals["hard"] == 1
    assert len(env.store) == 5
    # A claim over an expired record is a new claim: refused while full.
    env.now += 10_000
    assert statuses(env.claim(B4)) == [Status.REFUSED_FULL]


def test_merge_in_applies_up_to_the_hard_ceiling() -> None:
    env = Env(StoreLimits(max_records=1, hard_max_records=3))
    est = Record(2, 0, State.ESTABLISHED, hlc_pack(T0, 0), 2, 1, T0 + 60_000)
    assert env.merge([A4, B4, A6, B6], [est] * 4) == MergeStats(applied=3, refused=1)
    assert len(env.store) == 3
    assert env.store.over_hard_limit
    assert env.store.refusals["hard"] == 1
    assert env.get(B6) is None
    # A copy of a key already held is still applied at the ceiling.
    newer = Record(3, 0, State.ESTABLISHED, hlc_pack(T0, 5), 3, 2, T0 + 60_000)
    assert env.merge([A4], [newer]) == MergeStats(applied=1, refused=0)
    assert env.get(A4) == newer
    # Live established records are never evicted: only expiry makes room.
    env.now += 60_000 + GRACE
    assert env.store.purge_expired(env.now) == 3
    assert not env.store.over_hard_limit


def test_embryonic_copies_refused_at_the_ceiling_keep_the_store_ready() -> None:
    """A claim flood fills the replicas with embryos: refused past the hard ceiling and
    counted, but not a reason for /readyz to say not ready (docs/protocol.md#capacity-and-quota)."""
    env = Env(StoreLimits(max_records=1, hard_max_records=2))
    emb = Record(2, 0, State.EMBRYONIC, hlc_pack(T0, 0), 2, 1, T0 + 10_000)
    got = env.merge([A4, B4, A6, B6, A6], [emb] * 5)
    assert got == MergeStats(applied=2, refused=3, refused_embryonic=3)
    assert len(env.store) == 2
    assert not env.store.over_hard_limit
    assert env.store.refusals["embryonic_copy"] == 3
    assert env.store.refusals["hard"] == 0
    # An established copy refused there is state lost: not ready.
    est = Record(2, 0, State.ESTABLISHED, hlc_pack(T0, 1), 2, 1, T0 + 60_000)
    assert env.merge([C4], [est]) == MergeStats(applied=0, refused=1)
    assert env.store.over_hard_limit
    assert env.store.refusals["hard"] == 1


def test_quota_per_ipv4_prefix_freed_by_confirm_release_and_purge() -> None:
    env = Env(StoreLimits(embryonic_quota_per_prefix=2))
    a, b, c, d = (f"tcp/198.51.100.7:{p}/192.0.2.1:443" for p in (1, 2, 3, 4))
    other = "tcp/198.51.100.8:1/192.0.2.1:443"
    assert statuses(env.claim(a, b, c, other)) == [
        Status.CREATED,
        Status.CREATED,
        Status.REFUSED_QUOTA,
        Status.CREATED,
    ]
    assert env.store.refusals["quota"] == 1
    env.confirm(a)  # no longer embryonic
    assert statuses(env.claim(c, d)) == [Status.CREATED, Status.REFUSED_QUOTA]
    env.release(b)
    assert statuses(env.claim(d)) == [Status.CREATED]
    assert statuses(env.claim(b)) == [Status.REFUSED_QUOTA]  # over its own tombstone
    env.now += 10_000  # the embryos c and d expire but still count until purged...
    assert statuses(env.claim(b)) == [Status.REFUSED_QUOTA]
    # ...except that a key re-claiming over its own expired embryo adds none.
    assert statuses(env.claim(c)) == [Status.CREATED]
    env.store.purge_expired(env.now + GRACE)  # d goes
    assert statuses(env.claim(b)) == [Status.CREATED]


def test_quota_prefix_lengths_are_configurable() -> None:
    env = Env(StoreLimits(embryonic_quota_per_prefix=1, prefix_v4=24))
    res = env.claim(
        "tcp/198.51.100.7:1/192.0.2.1:443",
        "tcp/198.51.100.9:1/192.0.2.1:443",  # same /24
        "tcp/198.51.101.7:1/192.0.2.1:443",
    )
    assert statuses(res) == [Status.CREATED, Status.REFUSED_QUOTA, Status.CREATED]


def test_quota_per_ipv6_64_is_shared_by_its_clients() -> None:
    env = Env(StoreLimits(embryonic_quota_per_prefix=1))
    assert statuses(env.claim(A6, B6, C6)) == [
        Status.CREATED,
        Status.REFUSED_QUOTA,  # B6's client shares A6's /64
        Status.CREATED,
    ]
    env.confirm(A6)
    assert statuses(env.claim(B6)) == [Status.CREATED]


def test_confirms_that_create_records_count_against_the_prefix_quota() -> None:
    """Without the count, confirms of flows never claimed filled the table from one prefix."""
    env = Env(StoreLimits(embryonic_quota_per_prefix=2))
    a, b, c, d = (f"tcp/198.51.100.7:{p}/192.0.2.1:443" for p in (1, 2, 3, 4))
    assert statuses(env.confirm(a, b, c)) == [Status.CREATED] * 2 + [Status.REFUSED_QUOTA]
    assert statuses(env.claim(d)) == [Status.REFUSED_QUOTA]  # confirm-creates and embryos add
    assert statuses(env.confirm(a)) == [Status.OK]  # confirming a live record adds nothing
    assert statuses(env.claim(C4)) == [Status.CREATED]  # another prefix
    assert env.store.refusals["quota"] == 2
    env.now += 10_000  # one embryonic TTL later the window has ended
    assert statuses(env.confirm(c, d)) == [Status.CREATED] * 2
    prefix = ipaddress.ip_address("198.51.100.7").packed  # the IPv4 table keeps 4 bytes
    assert env.store.quota.created(prefix, env.now) == 2
    env.now += 10_000
    env.store.purge_expired(env.now)
    assert env.store.quota.created(prefix, env.now) == 0  # ended windows are forgotten


def test_the_confirm_count_takes_fixed_memory_and_never_undercounts() -> None:
    """A dict entry per confirming client cost ~150 bytes per record created in a window
    (the memory benchmark: 220 instead of 63 bytes per record); the sketch is fixed."""
    quota = PrefixQuota(quota=100, window_ms=10_000)
    prefixes = [i.to_bytes(16, "big") for i in range(200_000)]
    for i, p in enumerate(prefixes):
        for _ in range(1 + i % 3):
            quota.count_created(p, 5_000)
    got = np.array([quota.created(p, 5_000) for p in prefixes])
    want = np.array([1 + i % 3 for i in range(len(prefixes))])
    # Never fewer; 400k counts in one window over-count a prefix by ~1.6 on average and
    # a few dozen at most: nothing next to the default quota of 1000.
    over = got - want
    assert over.min() == 0
    assert over.mean() < 3 and over.max() < 30
    assert quota._counts.nbytes == 2 * 131_072 * 4


def test_confirm_over_the_keys_own_expired_embryo_is_not_counted_twice() -> None:
    env = Env(StoreLimits(embryonic_quota_per_prefix=1))
    assert statuses(env.claim(A4)) == [Status.CREATED]
    env.now += 10_000  # the embryo expired: the confirm re-creates, in place of the embryo
    assert statuses(env.confirm(A4)) == [Status.CREATED]
    assert statuses(env.claim(B4)) == [Status.CREATED]  # the prefix has nothing counted


def test_the_quota_is_scaled_to_this_nodes_share_of_the_key_space() -> None:
    env = Env(StoreLimits(embryonic_quota_per_prefix=10))
    env.store.quota.set_shares(0.25, 0.25)  # this node holds a quarter of the partitions
    flows = [f"tcp/198.51.100.7:{p}/192.0.2.1:443" for p in range(1, 6)]
    assert statuses(env.claim(*flows)) == [Status.CREATED] * 3 + [Status.REFUSED_QUOTA] * 2
    env.store.quota.set_shares(1.0, 1.0)
    assert statuses(env.claim(*flows[3:])) == [Status.CREATED] * 2
    with pytest.raises(ValueError):
        env.store.quota.set_shares(0.5, 0.0)


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        StoreLimits(max_records=10, hard_max_records=5)
    with pytest.raises(ConfigError):
        StoreLimits(prefix_v4=33)


# --------------------------------------------------------------------------- merge


def test_merge_in_follows_the_merge_rules() -> None:
    env = Env()
    base = Record(1, 0, State.ESTABLISHED, 100, 1, 2, T0 + 1_000)
    assert env.merge([A4], [base]) == MergeStats(applied=1)
    older_gen = Record(2, 0, State.ESTABLISHED, 50, 2, 1, T0 + 9_000)
    assert env.merge([A4], [older_gen]) == MergeStats(applied=0)
    assert env.get(A4) == base  # lower generation loses
    later_birth = Record(2, 0, State.ESTABLISHED, 200, 2, 2, T0 + 9_000)
    env.merge([A4], [later_birth])
    assert env.get(A4) == base  # same generation: the earlier birth wins
    earlier_embryo = Record(3, 0, State.EMBRYONIC, 90, 3, 2, T0 + 500)
    env.merge([A4], [earlier_embryo])
    assert env.get(A4) == base  # same generation: a completed copy beats an embryonic one
    earlier_birth = Record(3, 0, State.ESTABLISHED, 90, 3, 2, T0 + 500)
    env.merge([A4], [earlier_birth])
    assert env.get(A4) == earlier_birth  # both completed: the earlier birth wins
    released = Record(3, 0, State.RELEASED, 90, 3, 2, T0 + 100)
    env.merge([A4], [released])
    assert env.get(A4) == Record(3, 0, State.RELEASED, 90, 3, 2, T0 + 500)  # max expiry
    newer_gen = Record(4, 1, State.EMBRYONIC, 10, 4, 3, T0 + 100)
    env.merge([A4], [newer_gen])
    assert env.get(A4) == newer_gen
    assert env.store.counts()[("ipv4", "embryonic")] == 1
    assert statuses(env.lookup(A4)) == [Status.OK]
    # The same claim's established copy beats its embryonic one whole.
    confirmed = Record(4, 1, State.ESTABLISHED, 10, 4, 3, T0 + 90)
    env.merge([A4], [confirmed])
    assert env.get(A4) == confirmed
    assert env.store.counts()[("ipv4", "embryonic")] == 0
    # Same claim, other owner copy (cannot happen, handled defensively): the lower owner.
    env.merge([A4], [Record(4, 0, State.ESTABLISHED, 10, 4, 3, T0 + 50)])
    assert env.get(A4) == Record(4, 0, State.ESTABLISHED, 10, 4, 3, T0 + 90)


def test_merge_in_skips_dead_copies_and_replaces_dead_ones() -> None:
    env = Env()
    env.now = T0 + 100_000
    dead_at = env.now - GRACE
    # An incoming copy expired for the maximum clock offset or more is never stored.
    dead = Record(2, 0, State.ESTABLISHED, 10, 2, 5, dead_at)
    assert env.merge([A4, A6], [dead, dead]) == MergeStats(applied=0, refused=0)
    assert env.get(A4) is None and len(env.store) == 0
    # One expired within the grace is stored and merges normally.
    recent = Record(2, 0, State.ESTABLISHED, 10, 2, 5, dead_at + 1)
    assert env.merge([A4, A6], [recent, recent]) == MergeStats(applied=2)
    assert env.get(A4) == recent
    assert statuses(env.lookup(A4)) == [Status.NOT_FOUND]  # expired all the same
    newer_claim = Record(1, 0, State.EMBRYONIC, 99, 1, 1, env.now + 10_000)
    assert env.merge([A4], [newer_claim]) == MergeStats(applied=0)
    assert env.get(A4) == recent  # generation 5 beats 1 while not dead
    # Once dead, the stored copy no longer counts: the live claim replaces it even
    # though its generation is lower (a merge would keep the dead one).
    env.now += 1
    assert env.merge([A4], [newer_claim]) == MergeStats(applied=1)
    assert env.get(A4) == newer_claim
    assert statuses(env.lookup(A4)) == [Status.OK]
    assert env.store.counts()[("ipv4", "embryonic")] == 1
    assert env.store.counts()[("ipv4", "established")] == 0
    # A dead incoming copy is skipped even where the stored copy is dead too.
    assert env.merge([A6], [dead]) == MergeStats(applied=0)
    assert env.get(A6) == recent
    # A dead copy is replaced in its row: no capacity needed.
    full = Env(StoreLimits(max_records=1, hard_max_records=1))
    full.merge([A4], [recent])
    full.now = env.now
    assert full.merge([A4, B4], [newer_claim] * 2) == MergeStats(
        applied=1, refused=1, refused_embryonic=int(newer_claim.state == State.EMBRYONIC)
    )
    assert full.get(A4) == newer_claim


def test_claims_over_expired_copies_within_and_past_the_grace() -> None:
    env = Env()
    env.claim(A4, A6, pop=1)
    env.now += 10_000  # expired, not yet dead
    assert env.store.purge_expired(env.now) == 0
    assert env.store.purge_expired(env.now + GRACE - 1) == 0
    res = env.claim(A4, pop=2)
    assert (statuses(res), shown(res).generation) == ([Status.CREATED], 2)
    env.now += GRACE  # A6 is dead, still stored until purged: generations go on
    res = env.confirm(A6, pop=2)
    assert (statuses(res), shown(res).generation, shown(res).owner_pop) == (
        [Status.CREATED],
        2,
        2,
    )
    assert env.store.counts()[("ipv6", "embryonic")] == 0
    assert env.store.counts()[("ipv6", "established")] == 1
    # Purged after the grace: a new claim starts over at generation 1.
    env.now += 600_000 + GRACE
    assert env.store.purge_expired(env.now) == 2
    res = env.claim(A6, pop=3)
    assert (statuses(res), shown(res).generation) == ([Status.CREATED], 1)


def test_copies_returns_raw_stored_copies() -> None:
    env = Env()
    env.claim(A4, pop=1)
    env.confirm(B4, A6, pop=2, server=3)
    env.release(A6, pop=2)
    env.now += 10_000  # A4's embryo expires
    res = env.store.copies(*keys(A4, C4, A6, B4, A4))
    assert statuses(res) == [Status.OK, Status.NOT_FOUND, Status.OK, Status.OK, Status.OK]
    assert [shown(res, i) for i in (0, 2, 3, 4)] == [env.get(f) for f in (A4, A6, B4, A4)]
    assert shown(res, 2).state == State.RELEASED
    assert not any(res[1].tolist()[1:])
    assert statuses(env.lookup(A4, A6)) == [Status.NOT_FOUND] * 2  # lookup: not live
    assert len(env.store.copies(*keys())) == 0


def _merge_reference(
    stored: dict[bytes, Record], batch: list[tuple[bytes, Record]], now: int, hard: int
) -> MergeStats:
    """merge_in's contract, one copy at a time (also the model's)."""
    applied = refused = refused_embryonic = 0
    for raw, rec in batch:
        if rec.expiry_ms <= now - GRACE:
            continue
        old = stored.get(raw)
        if old is None and len(stored) >= hard:
            refused += 1
            refused_embryonic += rec.state == State.EMBRYONIC
            continue
        new = rec if old is None or old.expiry_ms <= now - GRACE else merge(old, rec)
        applied += new != old
        stored[raw] = new
    return MergeStats(applied=applied, refused=refused, refused_embryonic=refused_embryonic)


def _random_record(rng: np.random.Generator, now: int) -> Record:
    return Record(
        int(rng.integers(1, 4)),
        int(rng.integers(0, 3)),
        State(int(rng.integers(1, 4))),
        hlc_pack(T0 + int(rng.integers(0, 3)), 0),
        int(rng.integers(1, 3)),
        int(rng.integers(1, 4)),
        now + int(rng.integers(-3 * GRACE, 3 * GRACE)),
    )


@pytest.mark.parametrize(
    ("seed", "most", "rounds", "pool_size"),
    # Batches of up to 400 copies (the vectorised pass), and of at most SMALL_MERGE
    # (copy by copy in pure Python, merge._merge_few) over a pool small enough that the
    # hard ceiling and repeated keys come up there too.
    [*((s, 400, 12, 300) for s in range(4)), *((s, SMALL_MERGE, 400, 40) for s in range(4))],
)
def test_vectorised_merge_in_matches_copy_by_copy(
    seed: int, most: int, rounds: int, pool_size: int
) -> None:
    rng = np.random.default_rng(seed)
    raw = random_keys(rng, pool_size)
    pool = [raw[i : i + 40] for i in range(0, len(raw), 40)]
    hard = pool_size * 5 // 6
    env = Env(StoreLimits(max_records=hard, hard_max_records=hard))
    model: dict[bytes, Record] = {}
    for _ in range(rounds):
        env.now += int(rng.integers(0, 2 * GRACE))
        # Few distinct keys per batch, so most batches repeat keys several times.
        picked = rng.choice(len(pool), int(rng.integers(1, most + 1)))
        picked = picked % int(rng.integers(1, len(pool) + 1))
        batch = [(pool[i], _random_record(rng, env.now)) for i in picked]
        k, h = packed(b"".join(r for r, _ in batch))
        got = env.store.merge_in(k, h, results([r for _, r in batch]), env.now)
        assert got == _merge_reference(model, batch, env.now, hard)
        res = env.store.copies(*packed(b"".join(pool)))
        stored = {pool[i]: shown(res, i) for i in range(len(pool)) if res[i]["status"] == Status.OK}
        assert stored == model
        assert env.store.counts() == _counts(model)
        assert _embryos(env.store) == _model_embryos(model)


# --------------------------------------------------------------------------- digests


def test_digests_agree_whatever_the_path_and_order() -> None:
    a = Env()
    a.claim(A4, B4, C4, pop=1)
    a.confirm(B4, A6, B6, pop=1, server=2)
    a.release(C4, pop=1)
    a.claim(C6, pop=1, ttl=1_000)
    a.now += 2_000  # C6's embryo has expired: left out of the digests
    # b receives a's copies as entries, in reverse order and twice over.
    entries = a.store.export_entries(None, 1, a.now)
    assert len(entries) == 5
    b = Env(now=a.now)
    assert b.store.merge_entries(entries[::-1].copy(), None, b.now) == MergeStats(applied=5)
    assert b.store.merge_entries(entries, None, b.now) == MergeStats(applied=0)
    for n in (1, 7, 4096):
        da, ca = a.store.partition_digests(n, a.now)
        db, cb = b.store.partition_digests(n, b.now)
        assert da.dtype == np.uint64 and ca.dtype == np.uint32
        assert (da == db).all() and (ca == cb).all()
        assert int(ca.sum()) == 5
    # The expired copy is stored on a only, and the digests do not see it.
    assert len(a.store) == 6 and len(b.store) == 5
    # The digest is the sum of digest.record_fingerprints over the copies.
    k = np.ascontiguousarray(entries["key"])
    h = wire.key_hashes(k.tobytes())
    fp = digest.record_fingerprints(h, np.ascontiguousarray(entries["rec"]))
    assert a.store.partition_digests(1, a.now)[0][0] == np.sum(fp, dtype=np.uint64)


def _fresh_digests(env: Env, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The digests a store that never cached any would give: a copy of env's store."""
    other = Env(now=env.now)
    other.store.merge_entries(env.store.export_entries(None, 1, 0), None, 0)
    return other.store.partition_digests(n, env.now)


def test_digests_are_kept_up_to_date_not_recomputed() -> None:
    env = Env()
    flows = [f"tcp/198.51.100.{i}:1000/192.0.2.1:443" for i in range(1, 200)]
    env.claim(*flows)
    cache = env.store._digests
    env.store.partition_digests(64, env.now)
    first = cache.recomputed
    assert first == 64
    # Nothing changed: nothing recomputed.
    env.store.partition_digests(64, env.now)
    assert cache.recomputed == first
    # One write, one release: their partitions only.
    env.confirm(flows[0])
    env.release(flows[1])
    got = env.store.partition_digests(64, env.now)
    assert cache.recomputed - first <= 2
    want = _fresh_digests(env, 64)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    # Expiry alone changes digests: every embryo but the confirmed one lapses.
    env.now += 10_000
    got = env.store.partition_digests(64, env.now)
    assert int(got[1].sum()) == 2  # the confirmed record and the tombstone
    want = _fresh_digests(env, 64)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    # Another partition count, a clock stepped back, a purge: the same as a fresh store.
    for n, back in ((7, 0), (7, 9_000), (64, 0)):
        env.now -= back
        got = env.store.partition_digests(n, env.now)
        want = _fresh_digests(env, n)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    env.store.purge_expired(env.now + 5_000)
    got = env.store.partition_digests(64, env.now)
    want = _fresh_digests(env, 64)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_digests_after_more_changes_than_are_kept() -> None:
    env = Env()
    env.store.partition_digests(16, env.now)
    for i in range(1, 5000):  # one write batch each: past the kept change log
        env.claim(f"tcp/198.51.{i // 250}.{i % 250}:1000/192.0.2.1:443")
    got = env.store.partition_digests(16, env.now)
    want = _fresh_digests(env, 16)
    assert int(got[1].sum()) == 4999
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


@pytest.mark.parametrize(
    "field_name",
    ["state", "expiry_ms", "generation", "owner_pop", "owner_server", "birth_hlc", "birth_pop"],
)
def test_digests_differ_when_one_field_differs(field_name: str) -> None:
    rec = Record(2, 1, State.ESTABLISHED, hlc_pack(T0, 0), 2, 3, T0 + 60_000)
    value = State.RELEASED if field_name == "state" else getattr(rec, field_name) + 1
    other = dataclasses.replace(rec, **{field_name: value})
    a, b = Env(), Env()
    a.merge([A4, A6, C6], [rec] * 3)
    b.merge([A4, A6, C6], [rec, other, rec])
    da, ca = a.store.partition_digests(8, T0)
    db, cb = b.store.partition_digests(8, T0)
    assert (ca == cb).all()
    p = int(wire.key_hashes(wire.parse_flow(A6).to_bytes())[0] % 8)
    assert da[p] != db[p]
    assert (np.delete(da, p) == np.delete(db, p)).all()


def test_digests_ignore_expired_copies_and_keep_unexpired_tombstones() -> None:
    env = Env()
    env.confirm(A4, A6)
    env.claim(B4)
    env.release(A6)
    empty_digest = np.zeros(16, dtype=np.uint64)
    d, c = env.store.partition_digests(16, env.now)
    assert int(c.sum()) == 3  # the tombstone is in
    d2, c2 = env.store.partition_digests(16, T0 + 10_000)  # B4's embryo expired
    assert int(c2.sum()) == 2
    p = int(wire.key_hashes(wire.parse_flow(B4).to_bytes())[0] % 16)
    assert d[p] != d2[p]
    d3, c3 = env.store.partition_digests(16, T0 + 10**9)
    assert (d3 == empty_digest).all() and int(c3.sum()) == 0
    # A replica that already purged the expired copy agrees.
    other = Env(now=T0 + 10_000 + GRACE)
    other.store.merge_entries(env.store.export_entries(None, 1, other.now), None, other.now)
    assert len(other.store) == 2
    for n, now in ((16, T0 + 10_000), (16, T0 + 10_000 + GRACE)):
        assert (
            env.store.partition_digests(n, now)[0] == other.store.partition_digests(n, now)[0]
        ).all()


# --------------------------------------------------------------------------- entries


def _entry_keys(entries: EntryArray) -> list[bytes]:
    raw = entries.tobytes()
    return [raw[i : i + 40] for i in range(0, len(raw), wire.ENTRY_SIZE)]


def test_export_entries_round_trips_keys_and_records() -> None:
    env = Env()
    flows = [A4, B4, C4, A6, B6, C6]
    env.claim(*flows, pop=3, server=9)
    env.release(B6, pop=3)
    entries = env.store.export_entries(None, 4096, env.now)
    assert entries.dtype == wire.ENTRY_DTYPE and len(entries) == 6
    assert (entries["rec"]["status"] == Status.OK).all()
    # Big-endian ports survive: the keys parse back to the flows.
    assert sorted(str(wire.FlowKey.from_bytes(k)) for k in _entry_keys(entries)) == sorted(flows)
    assert sorted(_entry_keys(entries)) == sorted(wire.parse_flow(f).to_bytes() for f in flows)
    for k, row in zip(_entry_keys(entries), entries, strict=True):
        rec = row["rec"].tolist()
        assert env.store.get(k) == Record(
            rec[2], rec[3], State(rec[1]), rec[8], rec[4], rec[5], rec[9]
        )
    # Into an empty store: the same copies, the same digests.
    other = Env()
    assert other.store.merge_entries(entries, None, env.now) == MergeStats(applied=6)
    assert other.snapshot() == env.snapshot()
    for store in (env.store, other.store):
        assert (
            store.partition_digests(64, env.now)[0] == env.store.partition_digests(64, env.now)[0]
        ).all()
    # Hashes may be passed in; the same result.
    third = Env()
    third.store.merge_entries(entries, wire.key_hashes(b"".join(_entry_keys(entries))), env.now)
    assert third.snapshot() == env.snapshot()
    empty = Env().store.export_entries(None, 16, T0)
    assert empty.dtype == wire.ENTRY_DTYPE and len(empty) == 0
    assert Env().store.merge_entries(empty, None, T0) == MergeStats()


def test_export_entries_filters_by_partition_and_expiry() -> None:
    env = Env()
    raw = random_keys(np.random.default_rng(3), 2_000)
    k, h = packed(raw)
    env.store.confirm(k, h, pop=1, server=0, ttl_ms=None, now_ms=env.now)
    n = 16
    wanted = np.array([0, 3, 15])
    entries = env.store.export_entries(wanted, n, env.now)
    eh = wire.key_hashes(b"".join(_entry_keys(entries)))
    assert set((eh % np.uint64(n)).tolist()) == {0, 3, 15}
    assert len(entries) == int(np.isin(h % np.uint64(n), wanted).sum())
    assert len(env.store.export_entries(np.array([], dtype=np.int64), n, env.now)) == 0
    with pytest.raises(ValueError):
        env.store.export_entries(np.array([16]), n, env.now)
    # Expired copies are not exported (udp ones expire first).
    later = T0 + 120_000
    live = env.store.export_entries(None, n, later)
    assert len(live) == int((k["proto"] == 6).sum())
    assert (live["key"]["proto"] == 6).all()


def test_merge_entries_skips_other_key_kinds() -> None:
    env = Env()
    env.confirm(A4, A6)
    entries = env.store.export_entries(None, 1, env.now)
    mixed = np.zeros(3, dtype=wire.ENTRY_DTYPE)
    mixed[[0, 2]] = entries
    affinity = np.frombuffer(wire.affinity_keys(np.zeros((1, 16), dtype=np.uint8)), wire.KEY_DTYPE)
    mixed["key"][1] = affinity[0]
    mixed["rec"][1] = entries["rec"][0]
    other = Env()
    hashes = wire.key_hashes(b"".join(_entry_keys(mixed)))
    assert other.store.merge_entries(mixed, hashes, env.now) == MergeStats(applied=2)
    assert other.snapshot() == env.snapshot()


# --------------------------------------------------------------------------- model


POOL = [A4, B4, C4, A6, B6, C6]
POOL_RAW = [wire.parse_flow(f).to_bytes() for f in POOL]
MODEL_LIMITS = StoreLimits(max_records=4, hard_max_records=5, embryonic_quota_per_prefix=1)


def _prefix(raw: bytes) -> tuple[bool, bytes]:
    client = wire.FlowKey.from_bytes(raw).client
    bits = MODEL_LIMITS.prefix_v4 if client.version == 4 else MODEL_LIMITS.prefix_v6
    net = ipaddress.ip_network(f"{client}/{bits}", strict=False)
    return client.version == 4, net.network_address.packed


class Model:
    """The store's contract over a plain dict, recounting everything from scratch."""

    def __init__(self, clock: HybridClock) -> None:
        self.clock = clock
        self.recs: dict[bytes, Record] = {}
        self.hard_refused = False
        # client prefix -> (window, n): records confirms created in a fixed window of an
        # embryonic TTL (now // embryonic_ms)
        self.confirmed: dict[tuple[bool, bytes], tuple[int, int]] = {}

    def recently_confirmed(self, raw: bytes, now: int) -> int:
        window, n = self.confirmed.get(_prefix(raw), (0, 0))
        return n if window == now // POLICY.embryonic_ms else 0

    def embryos(self, raw: bytes) -> int:
        mine = _prefix(raw)
        return sum(
            1 for k, r in self.recs.items() if r.state == State.EMBRYONIC and _prefix(k) == mine
        )

    def mutate(
        self, op: str, batch: list[bytes], pop: int, server: int, ttl: int | None, now: int
    ) -> ResultArray:
        out = wire.new_results(len(batch))
        for i, raw in enumerate(batch):
            old = self.recs.get(raw)
            act = Acting(pop, server, raw[1], now, ttl)
            d: Change
            if op in ("claim", "confirm"):
                birth = self.clock.now() if old is None or not old.live(now) else 0
                d = (decide_claim if op == "claim" else decide_confirm)(old, act, POLICY, birth)
            elif op == "refresh":
                d = decide_refresh(old, act, POLICY)
            elif op == "release":
                d = decide_release(old, act, POLICY)
            else:
                d = decide_lookup(old, now)
            if d.status == Status.CREATED:
                own = old is not None and old.state == State.EMBRYONIC
                if op == "claim" and len(self.recs) >= MODEL_LIMITS.max_records:
                    wire.put_result(out, i, Status.REFUSED_FULL, None)
                    continue
                counted = self.embryos(raw) - own + self.recently_confirmed(raw, now)
                if counted >= MODEL_LIMITS.embryonic_quota_per_prefix:
                    wire.put_result(out, i, Status.REFUSED_QUOTA, None)
                    continue
                if op == "confirm":
                    if old is None and len(self.recs) >= MODEL_LIMITS.hard_max_records:
                        self.hard_refused = True
                        wire.put_result(out, i, Status.REFUSED_FULL, None)
                        continue
                    if not own:
                        n = self.recently_confirmed(raw, now)
                        self.confirmed[_prefix(raw)] = (now // POLICY.embryonic_ms, n + 1)
            if d.store is not None:
                self.recs[raw] = d.store
            wire.put_result(out, i, d.status, d.shown)
        return out

    def merge_in(self, batch: list[bytes], recs: list[Record], now: int) -> MergeStats:
        stats = _merge_reference(
            self.recs, list(zip(batch, recs, strict=True)), now, MODEL_LIMITS.hard_max_records
        )
        # Refused embryonic copies keep the store ready (FlowStore.merge_copies): only
        # refused established or released copies count.
        self.hard_refused |= stats.refused > stats.refused_embryonic
        return stats

    def counts(self) -> dict[tuple[str, str], int]:
        return _counts(self.recs)


def _counts(recs: dict[bytes, Record]) -> dict[tuple[str, str], int]:
    out = {
        (fam, s.name.lower()): 0
        for fam in ("ipv4", "ipv6")
        for s in (State.EMBRYONIC, State.ESTABLISHED, State.RELEASED)
    }
    for raw, rec in recs.items():
        out[("ipv4" if _prefix(raw)[0] else "ipv6", rec.state.name.lower())] += 1
    return out


def _model_embryos(recs: dict[bytes, Record]) -> dict[tuple[bool, bytes], int]:
    out: dict[tuple[bool, bytes], int] = {}
    for raw, rec in recs.items():
        if rec.state == State.EMBRYONIC:
            out[_prefix(raw)] = out.get(_prefix(raw), 0) + 1
    return out


def _embryos(store: FlowStore) -> dict[tuple[bool, bytes], int]:
    return {(t.family == "ipv4", k): n for t in store._tables for k, n in t.embryos.items()}


model_records = st.builds(
    Record,
    owner_pop=st.integers(1, 3),
    owner_server=st.integers(0, 2),
    state=st.sampled_from([State.EMBRYONIC, State.ESTABLISHED, State.RELEASED]),
    birth_hlc=st.sampled_from([hlc_pack(T0 - 5, 0), hlc_pack(T0, 0), hlc_pack(T0 + 1, 0)]),
    birth_pop=st.integers(1, 3),
    generation=st.integers(1, 3),
    expiry_ms=st.integers(-3 * GRACE, 200_000),  # relative to the time of the merge
)
indices = st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=5)
steps = st.one_of(
    st.tuples(
        st.sampled_from(["claim", "confirm", "refresh", "release", "lookup"]),
        indices,
        st.integers(1, 2),  # pop
        st.integers(0, 2),  # server
        st.sampled_from([None, 5_000]),  # ttl
        st.sampled_from([0, 1, 3_000, 11_000, 130_000]),  # time advance
    ),
    st.tuples(st.just("merge"), indices, st.lists(model_records, min_size=5, max_size=5)),
    st.tuples(st.just("purge"), st.integers(0, 8)),
)


def _check(store: FlowStore, model: Model, now: int) -> None:
    res = store.copies(*packed(b"".join(POOL_RAW)))
    got = {raw: shown(res, i) for i, raw in enumerate(POOL_RAW) if res[i]["status"] == Status.OK}
    assert got == model.recs
    assert len(store) == len(model.recs)
    assert store.counts() == model.counts()
    assert _embryos(store) == _model_embryos(model.recs)
    assert store.over_hard_limit == (
        model.hard_refused and len(model.recs) >= MODEL_LIMITS.hard_max_records
    )
    # The digests are those of the model's unexpired copies.
    shown_keys = [raw for raw, rec in model.recs.items() if rec.expiry_ms > now]
    fp = digest.record_fingerprints(
        wire.key_hashes(b"".join(shown_keys)), results([model.recs[k] for k in shown_keys])
    )
    hashes = wire.key_hashes(b"".join(shown_keys))
    want = digest.partition_sums(hashes % np.uint64(3), fp, 3)
    got_digests = store.partition_digests(3, now)
    assert (got_digests[0] == want[0]).all() and (got_digests[1] == want[1]).all()


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(steps, max_size=25))
def test_store_matches_a_dict_model(ops: list[tuple[object, ...]]) -> None:
    now = [T0]

    def wall() -> int:
        return now[0]

    store = FlowStore(POLICY, MODEL_LIMITS, HybridClock(1000, wall_ms=wall))
    model = Model(HybridClock(1000, wall_ms=wall))
    for step in ops:
        if step[0] == "purge":
            budget = step[1]
            assert isinstance(budget, int)
            before = dict(model.recs)
            removed = store.purge_expired(now[0], budget=budget)
            assert removed <= budget
            left = set(_stored_keys(store))
            gone = [raw for raw in before if raw not in left]
            assert len(gone) == removed
            for raw in gone:
                assert model.recs.pop(raw).expiry_ms <= now[0] - GRACE
        elif step[0] == "merge":
            _, idx, recs = step
            batch = [POOL_RAW[i] for i in idx]
            incoming = [
                dataclasses.replace(r, expiry_ms=now[0] + r.expiry_ms)
                for r in list(recs)[: len(batch)]
            ]
            k, h = packed(b"".join(batch))
            got_stats = store.merge_in(k, h, results(incoming), now[0])
            assert got_stats == model.merge_in(batch, incoming, now[0])
        else:
            op, idx, pop, server, ttl, advance = step
            now[0] += advance
            batch = [POOL_RAW[i] for i in idx]
            k, h = packed(b"".join(batch))
            if op == "lookup":
                got = store.lookup(k, h, now[0])
            elif op == "refresh":
                got = store.refresh(k, h, pop=pop, ttl_ms=ttl, now_ms=now[0])
            elif op == "release":
                got = store.release(k, h, pop=pop, now_ms=now[0])
            else:
                mutate = store.claim if op == "claim" else store.confirm
                got = mutate(k, h, pop=pop, server=server, ttl_ms=ttl, now_ms=now[0])
            want = model.mutate(str(op), batch, pop, server, ttl, now[0])
            assert got.tolist() == want.tolist(), (op, got.tolist(), want.tolist())
        _check(store, model, now[0])


def _stored_keys(store: FlowStore) -> list[bytes]:
    res = store.copies(*packed(b"".join(POOL_RAW)))
    return [raw for i, raw in enumerate(POOL_RAW) if res[i]["status"] == Status.OK]


def test_restore_undoes_a_write_exactly() -> None:
    from dht.core.wire import KEY_DTYPE, key_hashes, parse_flow

    t = [1_000_000]
    store = FlowStore(
        TtlPolicy(),
        StoreLimits(embryonic_quota_per_prefix=10),
        HybridClock(500, wall_ms=lambda: t[0]),
    )
    a = parse_flow("tcp/198.51.100.7:1000/192.0.2.1:443").to_bytes()
    b = parse_flow("udp/[2001:db8::7]:1000/[2001:db8::1]:443").to_bytes()
    ka, kb = np.frombuffer(a, dtype=KEY_DTYPE), np.frombuffer(b, dtype=KEY_DTYPE)
    store.claim(ka, key_hashes(a), pop=1, server=0, ttl_ms=None, now_ms=t[0])
    keys = np.frombuffer(a + b, dtype=KEY_DTYPE)
    hashes = key_hashes(a + b)
    before = store.copies(keys, hashes)
    digests_before = store.partition_digests(64, t[0])
    counts_before = store.counts()
    store.confirm(keys, hashes, pop=1, server=0, ttl_ms=None, now_ms=t[0])
    assert store.counts() != counts_before
    store.restore(keys, hashes, before)
    after = store.copies(keys, hashes)
    assert after.tobytes() == before.tobytes()
    assert store.counts() == counts_before
    assert len(store) == 1
    for x, y in zip(store.partition_digests(64, t[0]), digests_before, strict=True):
        assert np.array_equal(x, y)
    # The quota count followed: the restored embryonic record still counts.
    assert (
        store.claim(kb, key_hashes(b), pop=1, server=0, ttl_ms=None, now_ms=t[0])["status"][0]
        == Status.CREATED
    )


def test_drop_partitions_keeps_only_what_is_kept() -> None:
    from dht.core.wire import KEY_DTYPE, key_hashes
    from dht.tools.bench import synthetic_keys

    t = [1_000_000]
    store = FlowStore(TtlPolicy(), StoreLimits(), HybridClock(500, wall_ms=lambda: t[0]))
    raw = synthetic_keys(2000, seed=1)
    keys, hashes = np.frombuffer(raw, dtype=KEY_DTYPE), key_hashes(raw)
    store.confirm(keys, hashes, pop=1, server=0, ttl_ms=None, now_ms=t[0])
    keep = np.zeros(16, dtype=bool)
    keep[:8] = True
    kept = keep[(hashes % np.uint64(16)).astype(np.intp)]
    assert store.drop_partitions(keep) == int((~kept).sum())
    assert len(store) == int(kept.sum())
    found = store.copies(keys, hashes)["status"] == Status.OK
    assert np.array_equal(found, kept)
    assert store.counts()[("ipv4", "established")] == int(kept.sum())


def test_a_small_lookup_answers_as_the_vectorised_one() -> None:
    """Up to SMALL_LOOKUP keys are looked up (and their copies read) one by one in pure
    Python: the same rows as the vectorised path for live, released, expired and missing
    keys of both families."""
    from dht.store.flows import SMALL_LOOKUP

    env = Env()
    env.claim(A4, B4, A6)
    env.confirm(A4)
    env.release(B4)
    env.claim(C6, ttl=1_000)
    env.now += 2_000  # C6's claim has expired
    flows = [A4, B4, C4, A6, B6, C6]
    together = env.lookup(*flows)  # vectorised (more than SMALL_LOOKUP keys)
    assert len(flows) > SMALL_LOOKUP
    copies = env.store.copies(*keys(*flows))  # stored copies, liveness aside
    for i, f in enumerate(flows):
        alone = env.lookup(f)
        assert alone.tobytes() == together[i : i + 1].tobytes(), f
        assert env.store.copies(*keys(f)).tobytes() == copies[i : i + 1].tobytes(), f
    assert statuses(copies) == [Status.OK, Status.OK, Status.NOT_FOUND, Status.OK,
                                Status.NOT_FOUND, Status.OK]  # fmt: skip
    assert statuses(together) == [Status.OK, Status.NOT_FOUND, Status.NOT_FOUND, Status.OK,
                                  Status.NOT_FOUND, Status.NOT_FOUND]  # fmt: skip
