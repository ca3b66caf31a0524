"""SWIM-style membership: merge order, refutation, suspicion, majority guard, leave."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from dht.core.membership import Membership, MemberState, MemberStatus
from dht.core.placement import Member


def state(node: str, inc: int, status: MemberStatus) -> MemberState:
    return MemberState(node, f"{node}:1", "", inc, status)


def view(me: str = "a", peers: tuple[str, ...] = ("b", "c")) -> Membership:
    ms = Membership(state(me, 100, MemberStatus.ALIVE), suspicion_ms=1_000)
    for p in peers:
        ms.add_seed(Member(p, f"{p}:1"), now_ms=0)
    return ms


def test_higher_incarnation_wins_and_status_breaks_ties() -> None:
    ms = view()
    assert not ms.apply([state("b", 0, MemberStatus.SUSPECT)], 0)  # still active
    assert ms.members["b"].status == MemberStatus.SUSPECT
    ms.apply([state("b", 0, MemberStatus.ALIVE)], 0)  # older news at the same incarnation
    assert ms.members["b"].status == MemberStatus.SUSPECT
    assert not ms.apply([state("b", 5, MemberStatus.ALIVE)], 0)  # b refuted
    assert ms.members["b"].status == MemberStatus.ALIVE
    assert ms.apply([state("b", 5, MemberStatus.DEAD)], 0)  # the active set shrank
    assert [m.node_id for m in ms.active()] == ["a", "c"]
    assert ms.apply([state("b", 6, MemberStatus.ALIVE)], 0)  # a restart re-admits it
    assert [m.node_id for m in ms.active()] == ["a", "b", "c"]


def test_rumours_about_me_are_refuted_with_a_higher_incarnation() -> None:
    ms = view()
    ms.apply([state("a", 100, MemberStatus.SUSPECT)], 0)
    assert ms.self_state.status == MemberStatus.ALIVE
    assert ms.self_state.incarnation == 101
    ms.apply([state("a", 101, MemberStatus.DEAD)], 0)
    assert ms.self_state.incarnation == 102
    assert ms.refutations == 2
    ms.apply([state("a", 50, MemberStatus.DEAD)], 0)  # stale: nothing to refute
    assert ms.self_state.incarnation == 102


def test_suspects_die_after_the_timeout_only_with_a_majority_alive() -> None:
    ms = view(peers=("b", "c", "d"))
    assert ms.suspect("b", now_ms=0)
    assert not ms.suspect("b", now_ms=10)  # already suspect
    assert not ms.tick(now_ms=999)
    assert ms.tick(now_ms=1_000)  # 3 of 4 alive: a majority, b is declared dead
    assert ms.members["b"].status == MemberStatus.DEAD
    # Now a, c, d active; c and d go silent: a alone is no majority and keeps its view.
    ms.suspect("c", now_ms=2_000)
    ms.suspect("d", now_ms=2_000)
    assert not ms.tick(now_ms=10_000)
    assert {m.node_id for m in ms.active()} == {"a", "c", "d"}


def test_leave_is_final_and_outranks_alive() -> None:
    ms = view()
    left = ms.leave()
    assert left.status == MemberStatus.LEFT
    assert left.incarnation == 101
    other = view(me="b", peers=("a", "c"))
    assert other.apply([left], 0)
    assert [m.node_id for m in other.active()] == ["b", "c"]
    other.apply([state("a", 100, MemberStatus.ALIVE)], 0)  # an older rumour
    assert other.members["a"].status == MemberStatus.LEFT


@given(
    st.lists(
        st.tuples(st.sampled_from("bcd"), st.integers(0, 4), st.sampled_from(list(MemberStatus))),
        max_size=20,
    ),
    st.randoms(),
)
def test_views_converge_whatever_the_order(rumours, rnd: random.Random) -> None:  # type: ignore[no-untyped-def]
    states = [state(n, i, s) for n, i, s in rumours]
    one, two = view(), view()
    one.apply(states, 0)
    shuffled = states * 2
    rnd.shuffle(shuffled)
    for s in shuffled:
        two.apply([s], 0)
    assert {k: v.order() for k, v in one.members.items()} == {
        k: v.order() for k, v in two.members.items()
    }
