"""SWIM-style membership: merge order, refutation, suspicion, majority guard, leave."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from dht.core.membership import (
    INCARNATION_MARGIN_MS,
    MAX_INCARNATION,
    Membership,
    MemberState,
    MemberStatus,
)
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
    """Gossip repeats every probe: after a further round of the same news, two views
    agree whatever order it came in (a rumour about a node not yet admitted is ignored
    until its ALIVE state arrives, so one round is not enough)."""
    states = [state(n, i, s) for n, i, s in rumours]
    one, two = view(), view()
    one.apply(states, 0)
    shuffled = states * 2
    rnd.shuffle(shuffled)
    for s in shuffled:
        two.apply([s], 0)
    one.apply(states, 0)
    two.apply(states, 0)
    assert {k: v.order() for k, v in one.members.items()} == {
        k: v.order() for k, v in two.members.items()
    }


# ---- gossip is input from the network (docs/protocol.md#swim-states)


def test_rumours_about_nodes_never_admitted_are_ignored() -> None:
    ms = view()
    for status in (MemberStatus.SUSPECT, MemberStatus.DEAD, MemberStatus.LEFT):
        assert not ms.apply([state("x", 5, status)], 0)
    assert "x" not in ms.members
    assert ms.refused["unknown"] == 3
    assert ms.apply([state("x", 5, MemberStatus.ALIVE)], 0)  # a join admits it
    assert ms.apply([state("x", 5, MemberStatus.LEFT)], 0)  # now it is news
    assert ms.members["x"].status == MemberStatus.LEFT


def test_incarnations_above_the_bound_are_refused() -> None:
    me = state("a", 1_000_000, MemberStatus.ALIVE)
    ms = Membership(me, suspicion_ms=1_000, now_ms=500)
    ms.add_seed(Member("b", "b:1"), now_ms=500)
    bound = ms.incarnation_bound(500)
    assert bound == 1_000_000 + INCARNATION_MARGIN_MS
    assert ms.incarnation_bound(1_500) == bound + 1_000  # it moves with the clock
    for inc in (bound + 1, 1 << 62, (1 << 64) - 1):
        assert not ms.apply([state("b", inc, MemberStatus.LEFT)], 500)
        assert not ms.apply([state("c", inc, MemberStatus.ALIVE)], 500)
    assert ms.members["b"].status == MemberStatus.ALIVE and "c" not in ms.members
    assert ms.refused["incarnation"] == 6
    assert ms.apply([state("b", bound, MemberStatus.LEFT)], 500)  # at the bound: news


def test_a_forged_rumour_cannot_push_the_refutation_past_the_bound() -> None:
    """ "a LEFT at 2^64-1" is refused; at the bound it is not refuted either (the
    refutation would be above what the others accept); below it, it is refuted within
    the bound. The incarnation never leaves the uint64 range."""
    ms = view()
    bound = ms.incarnation_bound(0)
    ms.apply([state("a", (1 << 64) - 1, MemberStatus.LEFT)], 0)
    ms.apply([state("a", bound, MemberStatus.DEAD)], 0)
    assert ms.self_state.incarnation == 100 and ms.self_state.status == MemberStatus.ALIVE
    ms.apply([state("a", bound - 1, MemberStatus.DEAD)], 0)
    assert ms.self_state.incarnation == bound and ms.self_state.status == MemberStatus.ALIVE
    assert ms.refutations == 1 and ms.refused["incarnation"] == 2
    # The others accept the refutation.
    other = view(me="b", peers=("a",))
    assert other.apply([ms.self_state], 0) is False
    assert other.members["a"].incarnation == bound


def test_the_hard_cap_holds_whatever_the_clock() -> None:
    ms = Membership(state("a", MAX_INCARNATION, MemberStatus.ALIVE), suspicion_ms=1_000)
    assert ms.incarnation_bound(10**12) == MAX_INCARNATION
    ms.apply([state("a", MAX_INCARNATION, MemberStatus.DEAD)], 0)
    assert ms.self_state.incarnation == MAX_INCARNATION
    assert ms.leave().incarnation == MAX_INCARNATION < 1 << 64


def test_dead_and_left_members_are_forgotten_after_a_bounded_time() -> None:
    ms = view(peers=("b", "c", "d"))
    assert ms.forget_ms == 10_000  # 10 x suspicion_ms by default
    ms.apply([state("b", 1, MemberStatus.LEFT)], 1_000)
    ms.suspect("c", now_ms=1_000)
    assert ms.tick(2_000)  # c declared dead at 2_000
    ms.tick(10_999)
    assert set(ms.members) == {"a", "b", "c", "d"}
    ms.tick(11_000)  # b went 10 s ago
    assert set(ms.members) == {"a", "c", "d"} and ms.forgotten == 1
    ms.tick(12_000)
    assert set(ms.members) == {"a", "d"} and ms.forgotten == 2
    # Forgotten: an old rumour about it is hearsay again, a restart (ALIVE) re-admits it.
    ms.apply([state("b", 1, MemberStatus.LEFT)], 12_000)
    assert "b" not in ms.members
    ms.apply([state("b", 7, MemberStatus.ALIVE)], 12_000)
    assert ms.members["b"].status == MemberStatus.ALIVE


def test_the_view_is_bounded() -> None:
    ms = Membership(state("a", 100, MemberStatus.ALIVE), suspicion_ms=1_000, max_members=3)
    joins = [state(f"x{i}", 1, MemberStatus.ALIVE) for i in range(5)]
    assert ms.apply(joins, 0)
    assert set(ms.members) == {"a", "x0", "x1"}
    assert ms.refused["full"] == 3
    ms.apply([state("x1", 2, MemberStatus.ALIVE)], 0)  # a known member still updates
    assert ms.members["x1"].incarnation == 2


def test_gossip_with_addresses_that_are_no_host_port_is_dropped() -> None:
    """A member state from gossip is a place other nodes will dial: one whose public,
    admin or peer address is no HOST:PORT (or absurdly long) is dropped on arrival."""
    from dht._proto.dht.v1 import dht_pb2 as pb
    from dht.edge.convert import members_from_pb

    def state(address: str, admin: str = "", peer: str = "") -> pb.MemberState:
        return pb.MemberState(
            node_id="x", address=address, admin_address=admin, incarnation=1, status=1,
            peer_address=peer,
        )  # fmt: skip

    good = state("10.0.0.1:7000", "10.0.0.1:8000", "10.0.0.1:9000")
    bad = [
        state(""),
        state("10.0.0.1"),
        state("10.0.0.1:0"),
        state("10.0.0.1:70000"),
        state(":7000"),
        state("h" * 300 + ":7000"),
        state("10.0.0.1:7000", peer="nonsense"),
        state("10.0.0.1:7000", admin="10.0.0.1:x"),
    ]
    assert [s.peer_address for s in members_from_pb([good, *bad])] == ["10.0.0.1:9000"]


def test_a_death_in_this_life_is_counted_once_per_incarnation() -> None:
    """A rumour that this node was declared dead counts even when a suspicion of the
    same incarnation was refuted first (the node must resync as one declared dead), once
    per incarnation, and never for an incarnation from before this process started."""
    ms = view()
    ms.apply([state("a", 100, MemberStatus.SUSPECT)], 0)
    assert (ms.refutations, ms.declared_dead) == (1, 0)
    ms.apply([state("a", 100, MemberStatus.DEAD)], 0)  # already refuted, still a death
    assert (ms.refutations, ms.declared_dead) == (1, 1)
    ms.apply([state("a", 100, MemberStatus.DEAD)], 0)
    assert ms.declared_dead == 1
    ms.apply([state("a", 99, MemberStatus.DEAD)], 0)  # before this process started
    assert ms.declared_dead == 1
