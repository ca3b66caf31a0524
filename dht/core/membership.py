"""Dynamic membership of one PoP's node set: SWIM-style states and gossip (pure).

Each member is known as ``(incarnation, status)``. Only a member itself raises its
incarnation: when it starts (a fresh, higher number: the wall clock in ms), and to refute
a rumour that it is suspect or dead. Copies of the table are merged by the SWIM order:
a higher incarnation wins; at the same incarnation LEFT > DEAD > SUSPECT > ALIVE. So every
node converges on the same table, whatever order the rumours arrive in.

Failure detection (wired in dht.node.node): a member that misses a direct probe and the
indirect probes sent through ``indirect_probes`` others becomes SUSPECT; if it does not
refute within ``suspicion_ms`` it becomes DEAD and leaves the partition table, but only
while this node sees a majority of the active members alive (the minority side of a cut
keeps its table rather than shrink it to itself). A member
that shuts down gracefully announces LEFT. DEAD and LEFT states are kept (as tombstones
of membership) so an old rumour cannot bring a member back; a restart can, with its new
incarnation.

The partition table is built from the *active* members (ALIVE or SUSPECT): a suspect
member keeps its partitions, so a slow node does not cause data movement; only a
declared death does. The epoch is derived from that member set, so two nodes never use
one epoch for different tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import IntEnum

from dht.core.placement import Member


class MemberStatus(IntEnum):
    """Order = precedence at equal incarnation (mirrors dht.v1.MemberStatus)."""

    ALIVE = 1
    SUSPECT = 2
    DEAD = 3
    LEFT = 4


@dataclass(frozen=True, slots=True)
class MemberState:
    node_id: str
    address: str
    admin_address: str
    incarnation: int
    status: MemberStatus

    @property
    def active(self) -> bool:
        return self.status in (MemberStatus.ALIVE, MemberStatus.SUSPECT)

    def member(self) -> Member:
        return Member(self.node_id, self.address, self.admin_address)

    def order(self) -> tuple[int, int]:
        return (self.incarnation, self.status)


class Membership:
    """One node's view. Not thread-safe; time is an argument (monotonic ms)."""

    def __init__(self, me: MemberState, suspicion_ms: int) -> None:
        self.me = me.node_id
        self.suspicion_ms = suspicion_ms
        self.members: dict[str, MemberState] = {me.node_id: me}
        self.suspect_since: dict[str, int] = {}
        self.suspicions = 0  # members this node started suspecting
        self.refutations = 0  # rumours about this node it refuted
        self.declared_dead = 0

    @property
    def self_state(self) -> MemberState:
        return self.members[self.me]

    def active(self) -> list[Member]:
        """The members the partition table is built from."""
        return sorted(
            (s.member() for s in self.members.values() if s.active), key=lambda m: m.node_id
        )

    def view(self) -> list[MemberState]:
        return list(self.members.values())

    def apply(self, states: Iterable[MemberState], now_ms: int) -> bool:
        """Merge a gossiped view. Returns True if the set of active members changed."""
        before = self._active_ids()
        for s in states:
            if s.node_id == self.me:
                self._about_me(s)
                continue
            known = self.members.get(s.node_id)
            if known is None or s.order() > known.order():
                self._set(s, now_ms)
        return self._active_ids() != before

    def _about_me(self, rumour: MemberState) -> None:
        """Refute a rumour that this node is suspect or dead (SWIM's incarnation bump)."""
        mine = self.self_state
        if mine.status == MemberStatus.LEFT:
            return
        if rumour.status != MemberStatus.ALIVE and rumour.incarnation >= mine.incarnation:
            self.members[self.me] = replace(
                mine, incarnation=rumour.incarnation + 1, status=MemberStatus.ALIVE
            )
            self.refutations += 1

    def _set(self, s: MemberState, now_ms: int) -> None:
        self.members[s.node_id] = s
        if s.status == MemberStatus.SUSPECT:
            self.suspect_since.setdefault(s.node_id, now_ms)
        else:
            self.suspect_since.pop(s.node_id, None)

    def suspect(self, node_id: str, now_ms: int) -> bool:
        """A probe (direct and indirect) failed. True if this starts a suspicion."""
        s = self.members.get(node_id)
        if s is None or node_id == self.me or s.status != MemberStatus.ALIVE:
            return False
        self._set(replace(s, status=MemberStatus.SUSPECT), now_ms)
        self.suspicions += 1
        return True

    def tick(self, now_ms: int) -> bool:
        """Declare dead the suspects whose suspicion ran out. True if the active set
        changed.

        Only while this node sees a majority of the active members alive: a node cut off
        from most of its PoP (or whose peers are all paused) must not shrink the table to
        itself and go on acknowledging writes alone; it holds its view, and the quorums
        of the unchanged table answer UNAVAILABLE instead."""
        active = [s for s in self.members.values() if s.active]
        alive = sum(s.status == MemberStatus.ALIVE for s in active)
        if 2 * alive <= len(active):
            return False
        changed = False
        for node_id, since in list(self.suspect_since.items()):
            s = self.members[node_id]
            if s.status == MemberStatus.SUSPECT and now_ms - since >= self.suspicion_ms:
                self._set(replace(s, status=MemberStatus.DEAD), now_ms)
                self.declared_dead += 1
                changed = True
        return changed

    def leave(self) -> MemberState:
        """Announce a graceful leave (the next gossip carries it)."""
        mine = self.self_state
        self.members[self.me] = replace(
            mine, incarnation=mine.incarnation + 1, status=MemberStatus.LEFT
        )
        return self.members[self.me]

    def add_seed(self, member: Member, now_ms: int) -> None:
        """A configured peer, assumed alive at incarnation 0 until it says otherwise."""
        if member.node_id not in self.members:
            self._set(
                MemberState(
                    member.node_id, member.address, member.admin_address, 0, MemberStatus.ALIVE
                ),
                now_ms,
            )

    def counts(self) -> dict[str, int]:
        out = {s.name.lower(): 0 for s in MemberStatus}
        for s in self.members.values():
            out[s.status.name.lower()] += 1
        return out

    def _active_ids(self) -> frozenset[tuple[str, str]]:
        return frozenset((s.node_id, s.address) for s in self.members.values() if s.active)
