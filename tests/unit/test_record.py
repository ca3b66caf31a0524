"""The merge rule and the create-once decisions (docs/protocol.md#merge-rule), as properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dht.core.record import (
    Acting,
    ClockOffsetError,
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
    hlc_physical_ms,
    merge,
)

POLICY = TtlPolicy()

# Small value ranges on purpose: collisions of generation and birth are what the rules
# are about.
records = st.builds(
    Record,
    owner_pop=st.integers(1, 3),
    owner_server=st.integers(0, 2),
    state=st.sampled_from([State.EMBRYONIC, State.ESTABLISHED, State.RELEASED]),
    birth_hlc=st.integers(1, 4),
    birth_pop=st.integers(1, 3),
    generation=st.integers(1, 3),
    expiry_ms=st.integers(0, 5),
)


@given(records, records)
def test_merge_commutative(a: Record, b: Record) -> None:
    assert merge(a, b) == merge(b, a)


@given(records, records, records)
def test_merge_associative(a: Record, b: Record, c: Record) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(records)
def test_merge_idempotent(a: Record) -> None:
    assert merge(a, a) == a


@given(st.lists(records, min_size=1, max_size=6), st.randoms())
def test_any_order_any_duplicates_same_result(copies: list[Record], rnd: object) -> None:
    import functools

    shuffled = copies * 2
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert functools.reduce(merge, shuffled) == functools.reduce(merge, copies)


@given(records, records)
def test_higher_generation_wins(a: Record, b: Record) -> None:
    if a.generation != b.generation:
        winner = a if a.generation > b.generation else b
        assert merge(a, b) == winner


def completed(r: Record) -> bool:
    return r.state in (State.ESTABLISHED, State.RELEASED)


@given(records, records)
def test_a_completed_copy_beats_an_embryonic_one_whatever_the_births(a: Record, b: Record) -> None:
    if a.generation == b.generation and completed(a) != completed(b):
        assert merge(a, b) == (a if completed(a) else b)


@given(records, records)
def test_earliest_birth_wins_within_generation_and_class(a: Record, b: Record) -> None:
    if a.generation == b.generation and completed(a) == completed(b) and a.birth() != b.birth():
        assert merge(a, b).birth() == min(a.birth(), b.birth())


def test_an_abandoned_half_open_claim_loses_to_the_connection_that_completed() -> None:
    # PoP 1 claimed first (its SYN-ACK was lost); the retransmitted SYN landed on PoP 2,
    # whose handshake completed. PoP 1's earlier birth must not win.
    abandoned = Record(1, 0, State.EMBRYONIC, birth_hlc=5, birth_pop=1, generation=1,
                       expiry_ms=50)  # fmt: skip
    live = Record(2, 0, State.ESTABLISHED, birth_hlc=9, birth_pop=2, generation=1,
                  expiry_ms=900)  # fmt: skip
    assert merge(abandoned, live) == live
    # ... and a confirm at PoP 1, decided on the merged copy, changes nothing.
    d = decide_confirm(merge(abandoned, live), act(1, now=10), POLICY, birth_hlc=11)
    assert d.status == Status.OWNED_ELSEWHERE
    assert d.store is None


def test_same_claim_released_beats_established_and_expiry_is_max() -> None:
    est = Record(1, 0, State.ESTABLISHED, 5, 1, 1, 100)
    rel = Record(1, 0, State.RELEASED, 5, 1, 1, 50)
    m = merge(est, rel)
    assert m.state == State.RELEASED
    assert m.expiry_ms == 100


def act(pop: int, now: int = 1_000, proto: int = 6, ttl: int | None = None) -> Acting:
    return Acting(pop=pop, server=0, protocol=proto, now_ms=now, requested_ttl_ms=ttl)


def test_claim_is_create_once() -> None:
    first = decide_claim(None, act(1), POLICY, birth_hlc=hlc_pack(1_000, 0))
    assert first.status == Status.CREATED
    assert first.store is not None
    assert first.store.generation == 1
    assert first.store.state == State.EMBRYONIC
    assert first.store.expiry_ms == 1_000 + POLICY.embryonic_ms
    other = decide_claim(first.store, act(2, now=2_000), POLICY, birth_hlc=hlc_pack(2_000, 0))
    assert other.status == Status.OWNED_ELSEWHERE
    assert other.store is None
    assert other.shown == first.store
    again = decide_claim(first.store, act(1, now=3_000), POLICY, birth_hlc=hlc_pack(3_000, 0))
    assert again.status == Status.ALREADY_OWNED
    assert again.store is not None
    assert again.store.birth() == first.store.birth()
    assert again.store.expiry_ms == 3_000 + POLICY.embryonic_ms


@given(records, st.integers(0, 10), st.integers(1, 3))
def test_claim_never_changes_a_live_record_of_another_pop(rec: Record, now: int, pop: int) -> None:
    d = decide_claim(rec, act(pop, now=now), POLICY, birth_hlc=99)
    if rec.live(now) and rec.owner_pop != pop:
        assert d.status == Status.OWNED_ELSEWHERE
        assert d.store is None
    if d.status == Status.CREATED:
        assert d.store is not None
        assert d.store.generation == rec.generation + 1
        # The new claim wins every merge with the copy it replaces.
        assert merge(d.store, rec) == d.store


def test_generation_increments_over_release_and_expiry() -> None:
    rec = decide_claim(None, act(1), POLICY, birth_hlc=1).store
    assert rec is not None
    tomb = decide_release(rec, act(1, now=2_000), POLICY).store
    assert tomb is not None
    assert tomb.state == State.RELEASED
    assert tomb.expiry_ms >= rec.expiry_ms + POLICY.tombstone_extra_ms
    assert decide_lookup(tomb, 2_001).status == Status.NOT_FOUND
    over = decide_claim(tomb, act(2, now=2_001), POLICY, birth_hlc=2).store
    assert over is not None
    assert over.generation == 2
    assert over.owner_pop == 2
    expired_at = over.expiry_ms
    again = decide_claim(over, act(3, now=expired_at), POLICY, birth_hlc=3).store
    assert again is not None
    assert again.generation == 3


def test_confirm_refresh_release_rules() -> None:
    created = decide_confirm(None, act(1, proto=17), POLICY, birth_hlc=1)
    assert created.status == Status.CREATED
    assert created.store is not None
    assert created.store.state == State.ESTABLISHED
    assert created.store.expiry_ms == 1_000 + POLICY.established_udp_ms
    assert decide_refresh(None, act(1), POLICY).status == Status.NOT_FOUND
    assert decide_refresh(created.store, act(2), POLICY).status == Status.OWNED_ELSEWHERE
    assert decide_release(created.store, act(2), POLICY).status == Status.OWNED_ELSEWHERE
    ref = decide_refresh(created.store, act(1, now=5_000, ttl=60_000), POLICY)
    assert ref.status == Status.OK
    assert ref.store is not None
    assert ref.store.expiry_ms == max(created.store.expiry_ms, 65_000)
    rel = decide_release(created.store, act(1), POLICY)
    assert rel.status == Status.OK
    assert decide_release(rel.store, act(1), POLICY).store is None  # idempotent


def test_hlc_monotonic_and_rejects_far_future() -> None:
    wall = [10_000]
    clock = HybridClock(max_offset_ms=500, wall_ms=lambda: wall[0])
    a = clock.now()
    b = clock.now()
    assert b > a
    assert hlc_physical_ms(a) == 10_000
    clock.observe(hlc_pack(10_400, 7))
    assert clock.now() > hlc_pack(10_400, 7)
    try:
        clock.observe(hlc_pack(10_600, 0))
    except ClockOffsetError:
        pass
    else:
        raise AssertionError("a stamp beyond the maximum offset must be rejected")
    assert clock.rejected == 1
    wall[0] = 9_000  # the wall clock steps back: stamps still increase
    assert clock.now() > b
