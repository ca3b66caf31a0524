"""Verdicts and pins (docs/forwarder.md#verdicts-and-pins). Pure: times are arguments,
and the map's updates come out as ``nft`` text for one batch.

A *pin* is an element of the flow map: flow 5-tuple -> mark, with its own timeout.
- Toward another PoP J (``PINNED | J``): at most the cache's owner-change bound
  (``owner_ttl_s``) and never past the record's expiry; then the next packet goes up
  again and is decided afresh, so an owner change reaches the kernel as fast as it
  reaches the cache.
- Toward this PoP (``PINNED``): a connection held here. ``pin_timeout_s``, re-armed by
  the keep-alive round while conntrack still holds the flow, removed when conntrack
  destroys it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from dht.client.decision import Action, Packet
from dht.client.forwarder import Outcome
from dht.core.record import TCP
from dht.tools.forwarder.rules import OWNER_MASK, PINNED, TABLE

# nft element timeouts are whole milliseconds; below this a pin is not worth a map update.
MIN_PIN_S = 1.0
# A pin is remembered this long past its timeout: the kernel's timer started a moment
# after ours, and an update must know an element's current mark (nft refuses to ``add``
# a key with another mark, and to ``delete`` a missing one).
GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Pin:
    mark: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the agent does with an upcalled packet: accept it with ``mark`` (0: leave the
    mark alone, the packet is served here), and put ``pin`` in the map (None: no change)."""

    mark: int
    pin: Pin | None


def remote_pin_s(outcome: Outcome, owner_ttl_s: float, now_ms: int) -> float:
    """A pin toward another PoP: the cache's owner-change bound, and never past the
    record's expiry (when the answer gives one)."""
    t = owner_ttl_s
    a = outcome.answer
    if a is not None and a.expiry_ms > 0:
        t = min(t, (a.expiry_ms - now_ms) / 1000.0)
    return t


def verdict_for(
    outcome: Outcome, kind: Packet, *, pin_timeout_s: float, owner_ttl_s: float, now_ms: int
) -> Verdict:
    """Outcome -> mark and pin.

    - TUNNEL to J: mark ``PINNED | J`` (the fwmark rule routes it to J); pinned for
      ``remote_pin_s`` unless the packet is a FIN/RST (the pin, if any, stays as it is).
    - SERVE: mark ``PINNED`` (served here); a packet past the handshake (DATA, UDP) pins
      the flow here for ``pin_timeout_s``; a SYN does not (the handshake is not complete,
      the ACK decides), nor does a FIN/RST (the connection is ending; conntrack's DESTROY
      removes the pin).
    - SERVE_UNKNOWN: mark 0, no pin: the local stack answers (a TCP reset), and the next
      packet asks again."""
    if outcome.action is Action.TUNNEL:
        mark = PINNED | (outcome.target & OWNER_MASK)
        if kind is Packet.FIN:
            return Verdict(mark, None)
        t = remote_pin_s(outcome, owner_ttl_s, now_ms)
        return Verdict(mark, Pin(mark, t) if t >= MIN_PIN_S else None)
    if outcome.action is Action.SERVE:
        if kind in (Packet.DATA, Packet.UDP):
            return Verdict(PINNED, Pin(PINNED, pin_timeout_s))
        return Verdict(PINNED, None)
    return Verdict(0, None)


def nft_element(key: bytes) -> tuple[int, str]:
    """(IP version, the map element's key text) of a 40-byte flow key record:
    ``tcp . CLIENT . CPORT . SERVICE . SPORT``."""
    proto = "tcp" if key[1] == TCP else "udp"
    c6 = ipaddress.IPv6Address(key[2:18])
    s6 = ipaddress.IPv6Address(key[20:36])
    cport = int.from_bytes(key[18:20], "big")
    sport = int.from_bytes(key[36:38], "big")
    c4, s4 = c6.ipv4_mapped, s6.ipv4_mapped
    if c4 is not None and s4 is not None:
        return 4, f"{proto} . {c4} . {cport} . {s4} . {sport}"
    return 6, f"{proto} . {c6} . {cport} . {s6} . {sport}"


def _ms(t: float) -> str:
    return f"{max(1, round(t * 1000))}ms"


@dataclass
class _Entry:
    mark: int
    expires: float  # monotonic s: the pin's timeout as this process counts it
    local: bool


class PinTable:
    """This process's view of the flow maps, and the updates waiting for the next
    ``nft`` batch. ``set``/``remove``/``rearm`` queue updates; ``take_batch`` returns
    them as one ``nft -f -`` script (or "" when nothing waits). Not thread-safe; one
    event loop."""

    def __init__(self) -> None:
        self._pins: dict[bytes, _Entry] = {}
        # One group of lines per update: a batch that fails is retried group by group.
        self._pending: list[str] = []

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, key: bytes) -> int | None:
        e = self._pins.get(key)
        return None if e is None else e.mark

    def count(self, now: float) -> tuple[int, int]:
        """(local, remote) pins alive now."""
        local = remote = 0
        for e in self._pins.values():
            if e.expires > now:
                if e.local:
                    local += 1
                else:
                    remote += 1
        return local, remote

    def set(self, key: bytes, pin: Pin, now: float) -> None:
        v, elem = nft_element(key)
        m = f"inet {TABLE} flows{v}"
        old = self._pins.get(key)
        # Another mark: nft refuses to `add` it over the old one; add the old one (a no-op
        # if present), delete it, add the new one, in one transaction.
        lines = _remove_lines(m, elem, old.mark) if old is not None and old.mark != pin.mark else []
        # The same mark again re-arms the element's timeout.
        lines.append(f"add element {m} {{ {elem} timeout {_ms(pin.timeout_s)} : {pin.mark:#x} }}")
        self._pending.append("\n".join(lines))
        self._pins[key] = _Entry(pin.mark, now + pin.timeout_s, pin.mark == PINNED)

    def remove(self, key: bytes) -> bool:
        old = self._pins.pop(key, None)
        if old is None:
            return False
        v, elem = nft_element(key)
        m = f"inet {TABLE} flows{v}"
        self._pending.append("\n".join(_remove_lines(m, elem, old.mark)))
        return True

    def rearm(self, keys: Iterable[bytes], timeout_s: float, now: float) -> int:
        """Re-arm the local pins of ``keys`` (flows still alive here) that would lapse
        within ``timeout_s / 2``; returns how many."""
        n = 0
        for k in keys:
            e = self._pins.get(k)
            if e is not None and e.local and e.expires - now < timeout_s / 2:
                self.set(k, Pin(e.mark, timeout_s), now)
                n += 1
        return n

    def local_keys(self, now: float) -> list[bytes]:
        return [k for k, e in self._pins.items() if e.local and e.expires > now]

    def prune(self, now: float) -> int:
        """Forget pins the kernel has dropped (past their timeout plus GRACE_S)."""
        dead = [k for k, e in self._pins.items() if e.expires + GRACE_S < now]
        for k in dead:
            del self._pins[k]
        return len(dead)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def take_batch(self) -> list[str]:
        """The updates waiting, one ``nft`` script per update (join them for one batch);
        they leave the table."""
        out, self._pending = self._pending, []
        return out


def _remove_lines(m: str, elem: str, mark: int) -> list[str]:
    # `delete` of a missing element fails the whole batch: add it first (a no-op when it
    # is there with this mark).
    return [
        f"add element {m} {{ {elem} timeout 1s : {mark:#x} }}",
        f"delete element {m} {{ {elem} }}",
    ]
