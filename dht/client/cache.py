"""A forwarder's local cache of flow owners (pure: time is an argument).

Bounded (least recently used entries go first: a dropped entry only costs a look-up, it
is not the table), aware of record expiry, with short-lived negative entries. The stated
bound for an owner change reaching the cache: a positive entry is used for at most
``owner_ttl_s`` after it was read from the table (and never past the record's own
expiry), an embryonic claim for at most ``embryonic_ttl_s``, a negative one for
``negative_ttl_s``. The forwarder re-reads live flows before their entries lapse, so a
busy flow does not miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from dht.core.record import State, Status


@dataclass(frozen=True, slots=True)
class Answer:
    """What the table said about one flow (a decoded result row, the fields a forwarder
    uses)."""

    status: Status
    owner: int  # owning PoP, 0 = none
    state: State
    affinity: int  # the client's preferred PoP from the affinity fallback, 0 = none
    expiry_ms: int  # the record's absolute expiry (Unix ms), 0 = none
    # Another PoP's copy, found by a second chance (docs/protocol.md#second-chance).
    second_chance: bool = False


@dataclass(slots=True)
class Entry:
    answer: Answer
    valid_until: float  # monotonic seconds
    # Last time a packet used it (the background refresh re-reads live entries).
    used: float

    @property
    def owner(self) -> int:
        return self.answer.owner

    @property
    def negative(self) -> bool:
        return self.answer.owner == 0


@dataclass(frozen=True, slots=True)
class CacheLimits:
    # 100k entries of ~200 bytes: ~20 MB, tens of seconds of misses at a busy PoP.
    capacity: int = 100_000
    # An owner change (a conflict resolved, a release and a new claim) reaches the cache
    # within this bound.
    owner_ttl_s: float = 5.0
    # "Nobody owns it" is kept briefly: the record may be on its way from another PoP.
    negative_ttl_s: float = 0.5
    # An embryonic claim is kept at most this long: a completed copy from another PoP
    # beats it at any moment (a SYN-ACK lost, the retransmitted SYN claimed and completed
    # elsewhere). 1 s covers a handshake's round trip and ends when TCP first
    # retransmits a SYN; the flow's next miss asks the table (and the other PoPs) again.
    embryonic_ttl_s: float = 1.0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")
        if self.owner_ttl_s <= 0 or self.negative_ttl_s <= 0 or self.embryonic_ttl_s <= 0:
            raise ValueError("owner_ttl_s, negative_ttl_s and embryonic_ttl_s must be positive")


class FlowCache:
    """Packed 40-byte flow key -> Entry. Not thread-safe; one per forwarder."""

    def __init__(self, limits: CacheLimits | None = None) -> None:
        self.limits = limits or CacheLimits()
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Entry | None:
        """The entry if still valid at ``now`` (monotonic s); marks it used."""
        e = self._entries.get(key)
        if e is None:
            return None
        if e.valid_until <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        e.used = now
        return e

    def put(self, key: bytes, answer: Answer, now: float, wall_ms: int) -> Entry | None:
        """Store what the table answered; returns the entry, or None when the answer is
        not worth caching (the table was unavailable)."""
        if answer.status in (Status.UNAVAILABLE, Status.MOVED, Status.UNSPECIFIED):
            self._entries.pop(key, None)
            return None
        lim = self.limits
        if answer.owner:
            life = lim.owner_ttl_s
            if answer.state == State.EMBRYONIC:
                life = min(life, lim.embryonic_ttl_s)
            if answer.expiry_ms:
                # Never past the record's own expiry.
                life = min(life, (answer.expiry_ms - wall_ms) / 1000)
            if life <= 0:
                self._entries.pop(key, None)
                return None
        else:
            life = lim.negative_ttl_s
        old = self._entries.get(key)
        e = Entry(answer, now + life, old.used if old else now)
        self._entries[key] = e
        self._entries.move_to_end(key)
        while len(self._entries) > lim.capacity:
            self._entries.popitem(last=False)
            self.evicted += 1
        return e

    def invalidate(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def live(self, now: float, used_since: float, lapse_before: float) -> Iterator[bytes]:
        """Keys of positive entries used since ``used_since`` that lapse before
        ``lapse_before``: the live flows the background refresh re-reads."""
        for key, e in self._entries.items():
            if e.answer.owner and e.used >= used_since and now < e.valid_until <= lapse_before:
                yield key
