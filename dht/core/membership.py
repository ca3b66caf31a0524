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
incarnation. Tombstones are forgotten ``forget_ms`` after the member went (a bounded view);
by then every node has heard of the departure.

Gossip is input from the network and checked as such (docs/protocol.md#membership):

- a member is admitted only by an ALIVE state (its join); a SUSPECT, DEAD or LEFT rumour
  about a node this view does not hold is ignored (a tombstone is never created by hearsay);
- an incarnation above ``incarnation_bound`` (this node's start incarnation, i.e. its wall
  clock in ms at start, plus the time since, plus ``INCARNATION_MARGIN_MS``; never above
  ``MAX_INCARNATION``) is refused, so a forged rumour cannot drive the refutation past
  what the uint64 wire field holds;
- the view holds at most ``max_members`` states; a new member beyond it is ignored.

Refused states are counted by reason in ``refused``.

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

# Incarnations are wall-clock milliseconds at a start, plus one per refutation or leave.
# A state more than this far above this node's own clock is refused (a day: far above any
# clock skew a PoP can run with, far below anything that could overflow).
INCARNATION_MARGIN_MS = 24 * 3600 * 1000
# Hard cap whatever the clock says: 2^62 leaves 2^62 refutations before the wire's uint64.
MAX_INCARNATION = (1 << 62) - 1
# Defaults of the two bounds (dht.core.config.NodeConfig: max_members, member_forget_s).
MAX_MEMBERS = 1024
REFUSAL_REASONS = ("incarnation", "unknown", "full")


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
    peer_address: str = ""  # the peer plane (dht.core.placement.Member)

    @property
    def active(self) -> bool:
        return self.status in (MemberStatus.ALIVE, MemberStatus.SUSPECT)

    def member(self) -> Member:
        return Member(self.node_id, self.address, self.admin_address, self.peer_address)

    def order(self) -> tuple[int, int]:
        return (self.incarnation, self.status)


class Membership:
    """One node's view. Not thread-safe; time is an argument (monotonic ms)."""

    def __init__(
        self,
        me: MemberState,
        suspicion_ms: int,
        *,
        now_ms: int = 0,
        forget_ms: int = 0,
        max_members: int = MAX_MEMBERS,
    ) -> None:
        """``now_ms``: the monotonic time at start (with ``me.incarnation``, the wall
        clock then, it bounds incarnations); ``forget_ms``: how long DEAD and LEFT states
        are kept (0 = 10 x ``suspicion_ms``); ``max_members``: the size of the view."""
        self.me = me.node_id
        self.suspicion_ms = suspicion_ms
        self.forget_ms = forget_ms or 10 * suspicion_ms
        self.max_members = max_members
        self._start_inc = min(me.incarnation, MAX_INCARNATION)
        self._start_ms = now_ms
        self.members: dict[str, MemberState] = {me.node_id: me}
        self.suspect_since: dict[str, int] = {}
        self.gone_since: dict[str, int] = {}  # DEAD and LEFT members: since when
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)  # gossiped states ignored
        self.forgotten = 0
        self.suspicions = 0  # members this node started suspecting
        self.refutations = 0  # rumours about this node it refuted
        # Rumours that this node was declared dead in this process's life (one per
        # incarnation): the others acknowledged writes in a table without it.
        self.declared_dead = 0
        self._dead_inc = self._start_inc - 1
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

    def incarnation_bound(self, now_ms: int) -> int:
        """The highest incarnation this view accepts at ``now_ms``."""
        elapsed = max(0, now_ms - self._start_ms)
        return min(MAX_INCARNATION, self._start_inc + elapsed + INCARNATION_MARGIN_MS)

    def apply(self, states: Iterable[MemberState], now_ms: int) -> bool:
        """Merge a gossiped view. Returns True if the set of active members changed."""
        before = self._active_ids()
        bound = self.incarnation_bound(now_ms)
        for s in states:
            if not 0 <= s.incarnation <= bound:
                self.refused["incarnation"] += 1
                continue
            if s.node_id == self.me:
                self._about_me(s, bound)
                continue
            known = self.members.get(s.node_id)
            if known is None:
                if s.status != MemberStatus.ALIVE:
                    self.refused["unknown"] += 1  # hearsay about a node never admitted
                    continue
                if len(self.members) >= self.max_members:
                    self.refused["full"] += 1
                    continue
                self._set(s, now_ms)
            elif s.order() > known.order():
                self._set(s, now_ms)
        return self._active_ids() != before

    def _about_me(self, rumour: MemberState, bound: int) -> None:
        """Refute a rumour that this node is suspect or dead (SWIM's incarnation bump);
        the refutation stays within ``bound``, so every other node accepts it."""
        mine = self.self_state
        if mine.status == MemberStatus.LEFT:
            return
        if rumour.status == MemberStatus.DEAD and self._dead_inc < rumour.incarnation < bound:
            # Counted even when already refuted (a suspicion of the same incarnation).
            self._dead_inc = rumour.incarnation
            self.declared_dead += 1
        if rumour.status != MemberStatus.ALIVE and rumour.incarnation >= mine.incarnation:
            if rumour.incarnation >= bound:
                self.refused["incarnation"] += 1
                return
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
        if s.active:
            self.gone_since.pop(s.node_id, None)
        else:
            self.gone_since.setdefault(s.node_id, now_ms)

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
        of the unchanged table answer UNAVAILABLE instead. DEAD and LEFT states older
        than ``forget_ms`` are forgotten first (that changes no table)."""
        self._forget(now_ms)
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

    def _forget(self, now_ms: int) -> None:
        for node_id, since in list(self.gone_since.items()):
            if now_ms - since >= self.forget_ms and node_id != self.me:
                del self.gone_since[node_id]
                if node_id in self.members and not self.members[node_id].active:
                    del self.members[node_id]
                    self.forgotten += 1

    def leave(self) -> MemberState:
        """Announce a graceful leave (the next gossip carries it)."""
        mine = self.self_state
        self.members[self.me] = replace(
            mine, incarnation=min(mine.incarnation + 1, MAX_INCARNATION), status=MemberStatus.LEFT
        )
        return self.members[self.me]

    def add_seed(self, member: Member, now_ms: int) -> None:
        """A configured peer, assumed alive at incarnation 0 until it says otherwise."""
        if member.node_id not in self.members:
            self._set(
                MemberState(
                    member.node_id,
                    member.address,
                    member.admin_address,
                    0,
                    MemberStatus.ALIVE,
                    member.peer_address,
                ),
                now_ms,
            )

    def counts(self) -> dict[str, int]:
        out = {s.name.lower(): 0 for s in MemberStatus}
        for s in self.members.values():
            out[s.status.name.lower()] += 1
        return out

    def _active_ids(self) -> frozenset[tuple[str, str, str]]:
        return frozenset(
            (s.node_id, s.address, s.peer_address) for s in self.members.values() if s.active
        )
