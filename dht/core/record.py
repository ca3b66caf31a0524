"""The flow record, its merge rule and the create-once decisions (docs/protocol.md#merge-rule).

Everything here is pure: time comes in as an argument (Unix milliseconds), nothing does
I/O, so every rule is tested without sockets or sleeps. The store, replication and
cross-PoP shipping apply copies only through :func:`merge`, and mutate records only
through the ``decide_*`` functions below.

Merge is a join on a semilattice, which is what makes it commutative, associative and
idempotent (tests/unit/test_record.py checks all three with hypothesis):

1. higher ``generation`` wins;
2. same generation: a *completed* copy (established or released: a handshake finished
   somewhere) beats an embryonic one, whatever the births (a half-open claim a PoP
   abandoned must never beat the connection that did complete);
3. same generation, both completed or both embryonic, different birth: the earlier birth
   wins, ties by the lower PoP id ("earliest claim wins" for two PoPs that claimed while
   cut off);
4. same birth and same class (the same claim): released > established, the later expiry,
   and (defensively, it cannot differ for one claim) the lower owner.

The rank (generation, completed, earlier birth) is a total preorder and copies of equal
rank join, so the whole is a lexicographic product of semilattices. That is also why an
established copy beats the embryonic copy *of the same claim* whole, expiry included:
joining their expiries would break associativity (tests/unit/test_record.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from dht.core.errors import DhtError


class State(IntEnum):
    """Record state; the order is the merge order for copies of the same claim."""

    NONE = 0
    EMBRYONIC = 1
    ESTABLISHED = 2
    RELEASED = 3


class Status(IntEnum):
    """Per-key outcome of a call; mirrors ``dht.v1.KeyStatus``."""

    UNSPECIFIED = 0
    OK = 1
    CREATED = 2
    ALREADY_OWNED = 3
    OWNED_ELSEWHERE = 4
    NOT_FOUND = 5
    MOVED = 6
    REFUSED_FULL = 7
    REFUSED_QUOTA = 8
    UNAVAILABLE = 9


@dataclass(frozen=True, slots=True)
class Record:
    """One copy of a flow record. ``expiry_ms`` is absolute (Unix milliseconds)."""

    owner_pop: int
    owner_server: int
    state: State
    birth_hlc: int
    birth_pop: int
    generation: int
    expiry_ms: int

    def live(self, now_ms: int) -> bool:
        """True for a record a lookup may return: not released and not expired."""
        return self.state != State.RELEASED and self.expiry_ms > now_ms

    def birth(self) -> tuple[int, int]:
        return (self.birth_hlc, self.birth_pop)


def merge(a: Record, b: Record) -> Record:
    """Merge two copies of the same key's record. Pure, commutative, associative,
    idempotent; see the module docstring for the rules."""
    if a.generation != b.generation:
        return a if a.generation > b.generation else b
    a_done, b_done = a.state >= State.ESTABLISHED, b.state >= State.ESTABLISHED
    if a_done != b_done:
        return a if a_done else b
    if a.birth() != b.birth():
        return a if a.birth() < b.birth() else b
    if a == b:
        return a
    owner = min((a.owner_pop, a.owner_server), (b.owner_pop, b.owner_server))
    return Record(
        owner_pop=owner[0],
        owner_server=owner[1],
        state=max(a.state, b.state),
        birth_hlc=a.birth_hlc,
        birth_pop=a.birth_pop,
        generation=a.generation,
        expiry_ms=max(a.expiry_ms, b.expiry_ms),
    )


# --------------------------------------------------------------------------- clock


LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


def hlc_pack(physical_ms: int, logical: int) -> int:
    return (physical_ms << LOGICAL_BITS) | (logical & LOGICAL_MASK)


def hlc_physical_ms(stamp: int) -> int:
    return stamp >> LOGICAL_BITS


class ClockOffsetError(DhtError):
    """A remote HLC stamp is further ahead of our clock than the configured maximum."""


class HybridClock:
    """Hybrid logical clock (Kulkarni et al.): 48-bit milliseconds + 16-bit counter.

    ``now()`` is strictly increasing. ``observe()`` folds in a remote stamp and rejects
    (and counts) one more than ``max_offset_ms`` ahead of the local wall clock, so one bad
    clock cannot drag every node's clock forward. Births compare by stamp ("earliest claim
    wins"), which is why the offset between PoPs must stay bounded and watched.
    Not thread-safe; one per node, used from its event loop.
    """

    def __init__(self, max_offset_ms: int, wall_ms: Callable[[], int] | None = None) -> None:
        self.max_offset_ms = max_offset_ms
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0
        self.rejected = 0

    def now(self) -> int:
        wall = hlc_pack(self._wall_ms(), 0)
        self._last = wall if wall > self._last else self._last + 1
        return self._last

    def observe(self, remote: int) -> int:
        wall_ms = self._wall_ms()
        if hlc_physical_ms(remote) > wall_ms + self.max_offset_ms:
            self.rejected += 1
            raise ClockOffsetError(
                f"remote stamp {hlc_physical_ms(remote)} ms is more than "
                f"{self.max_offset_ms} ms ahead of the local clock {wall_ms} ms"
            )
        self._last = max(self._last, remote, hlc_pack(wall_ms, 0))
        return self._last

    def wall_ms(self) -> int:
        return self._wall_ms()


# --------------------------------------------------------------------------- TTL policy

TCP = 6
UDP = 17


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    """Server-side TTLs per state (docs/protocol.md#time-to-live). All milliseconds."""

    embryonic_ms: int = 10_000
    established_tcp_ms: int = 600_000
    established_udp_ms: int = 120_000
    min_ms: int = 1_000
    max_ms: int = 86_400_000
    # A tombstone outlives the record it ends by at least the maximum clock offset.
    tombstone_extra_ms: int = 1_000

    def ttl_ms(self, state: State, protocol: int, requested_ms: int | None) -> int:
        if requested_ms is not None:
            return requested_ms
        if state == State.EMBRYONIC:
            return self.embryonic_ms
        return self.established_udp_ms if protocol == UDP else self.established_tcp_ms


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Change:
    """The outcome of one operation on one key: the status to answer, the record to show
    the caller, and the record to store (None = leave the store unchanged)."""

    status: Status
    shown: Record | None
    store: Record | None


@dataclass(frozen=True, slots=True)
class Acting:
    """Who acts and how: the acting PoP, its optional server, the requested TTL, now."""

    pop: int
    server: int
    protocol: int
    now_ms: int
    requested_ttl_ms: int | None = None


def _new_claim(
    existing: Record | None, act: Acting, state: State, policy: TtlPolicy, birth_hlc: int
) -> Record:
    return Record(
        owner_pop=act.pop,
        owner_server=act.server,
        state=state,
        birth_hlc=birth_hlc,
        birth_pop=act.pop,
        generation=1 if existing is None else existing.generation + 1,
        expiry_ms=act.now_ms + policy.ttl_ms(state, act.protocol, act.requested_ttl_ms),
    )


def _extended(rec: Record, act: Acting, policy: TtlPolicy, state: State | None = None) -> Record:
    new_state = rec.state if state is None else state
    expiry = act.now_ms + policy.ttl_ms(new_state, act.protocol, act.requested_ttl_ms)
    return Record(
        owner_pop=rec.owner_pop,
        owner_server=rec.owner_server,
        state=new_state,
        birth_hlc=rec.birth_hlc,
        birth_pop=rec.birth_pop,
        generation=rec.generation,
        expiry_ms=max(rec.expiry_ms, expiry),
    )


def decide_claim(existing: Record | None, act: Acting, policy: TtlPolicy, birth_hlc: int) -> Change:
    """Create-once claim. A live record of another PoP is never changed; the owner's own
    claim refreshes; a missing, expired or released record is claimed at generation g+1.
    The caller checks capacity and quota only when the status would be CREATED."""
    if existing is not None and existing.live(act.now_ms):
        if existing.owner_pop != act.pop:
            return Change(Status.OWNED_ELSEWHERE, existing, None)
        refreshed = _extended(existing, act, policy)
        return Change(Status.ALREADY_OWNED, refreshed, refreshed)
    created = _new_claim(existing, act, State.EMBRYONIC, policy, birth_hlc)
    return Change(Status.CREATED, created, created)


def decide_confirm(
    existing: Record | None, act: Acting, policy: TtlPolicy, birth_hlc: int
) -> Change:
    """Embryonic -> established. Confirm on a missing or expired record creates it
    (established at once, still create-once)."""
    if existing is not None and existing.live(act.now_ms):
        if existing.owner_pop != act.pop:
            return Change(Status.OWNED_ELSEWHERE, existing, None)
        confirmed = _extended(existing, act, policy, State.ESTABLISHED)
        return Change(Status.OK, confirmed, confirmed)
    created = _new_claim(existing, act, State.ESTABLISHED, policy, birth_hlc)
    return Change(Status.CREATED, created, created)


def decide_refresh(existing: Record | None, act: Acting, policy: TtlPolicy) -> Change:
    """Extend a live record owned by the acting PoP; NOT_FOUND if there is none."""
    if existing is None or not existing.live(act.now_ms):
        return Change(Status.NOT_FOUND, None, None)
    if existing.owner_pop != act.pop:
        return Change(Status.OWNED_ELSEWHERE, existing, None)
    refreshed = _extended(existing, act, policy)
    return Change(Status.OK, refreshed, refreshed)


def decide_release(existing: Record | None, act: Acting, policy: TtlPolicy) -> Change:
    """End ownership with a tombstone that outlives every live copy of the record: kept
    until the record's own expiry plus the maximum clock offset. Only the owning PoP
    releases (a FIN seen elsewhere is tunnelled to the owner first,
    docs/protocol.md#decision-table).
    Releasing a tombstone again is OK and changes nothing."""
    if existing is None or existing.expiry_ms <= act.now_ms:
        return Change(Status.NOT_FOUND, None, None)
    if existing.state == State.RELEASED:
        return Change(Status.OK, existing, None)
    if existing.owner_pop != act.pop:
        return Change(Status.OWNED_ELSEWHERE, existing, None)
    tombstone = Record(
        owner_pop=existing.owner_pop,
        owner_server=existing.owner_server,
        state=State.RELEASED,
        birth_hlc=existing.birth_hlc,
        birth_pop=existing.birth_pop,
        generation=existing.generation,
        expiry_ms=max(existing.expiry_ms, act.now_ms) + policy.tombstone_extra_ms,
    )
    return Change(Status.OK, tombstone, tombstone)


def decide_lookup(existing: Record | None, now_ms: int) -> Change:
    if existing is None or not existing.live(now_ms):
        return Change(Status.NOT_FOUND, None, None)
    return Change(Status.OK, existing, None)
