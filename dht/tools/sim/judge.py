"""Where a packet should have been served, and what to call it when it was not
(docs/simulator.md#how-packets-are-judged). Pure: the run hands in what its forwarders
decided.

A connection lives where the SYN that made it was served (a UDP flow, where its first
packet was). A packet that lands on another PoP is *saved* if it is served there anyway,
by how the landing PoP found the owner:

- ``record``: its cache or its own PoP's table named the owner;
- ``second-chance``: its PoP did not know the flow, another PoP did
  (docs/protocol.md#second-chance);
- ``affinity``: no PoP knew it, the client's preferred PoP was the right one.

Otherwise it *breaks* the connection, with a reason:

- ``handshake-elsewhere``: the handshake's ACK was served away from the SYN's PoP (the
  reason below it is kept as the breakage's ``detail``);
- ``record-lapsed``: no PoP knew the flow, and it was confirmed longer ago than the
  established TTL (by the clock): nothing kept its record alive;
- ``no-owner-known``: no PoP knew it and there was no affinity;
- ``affinity-elsewhere``: the client's affinity named another PoP;
- ``affinity-is-here``: it named the landing PoP itself (a newer connection of the client
  started there after the flap), so the packet was served here as unknown;
- ``claimed-as-new``: a UDP packet no PoP knew of was claimed as a new flow where it
  landed;
- ``wrong-owner``: the cache or the table named another PoP.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dht.client.forwarder import Outcome

# Forwarder reasons for packets decided with no live record known anywhere.
_NOBODY = ("unknown", "affinity", "new-flow")


@dataclass
class Breakage:
    flow: int
    t_s: float  # simulated
    landed: str
    home: str  # where the connection lives (for the handshake's ACK: the SYN's PoP)
    reason: str
    age_s: float  # simulated seconds since the packet that made the connection
    step: str = ""  # dht.tools.traffic.Step: "ack", "data", "fin", "udp"
    proto: str = "tcp"
    pinned: bool = False
    # What the landing PoP's forwarder decided ("unknown", "affinity", "owner", ...) and,
    # for a handshake, the reason below "handshake-elsewhere".
    detail: str = ""


@dataclass
class Tally:
    """The table run's verdicts and counters as they come in (docs/simulator.md#the-report)."""

    connections: int = 0
    packets: int = 0
    tunnelled: int = 0
    broken: list[Breakage] = field(default_factory=list)
    # Packets that landed on another PoP than their connection's: how they were saved
    # ("record", "second-chance", "affinity") or the breaking reason.
    foreign: Counter[str] = field(default_factory=Counter)
    # Of those, the ones whose landing PoP's own table had no record (a flap before the
    # record was shipped, during the handshake, or after it lapsed): saved
    # ("saved-by-second-chance", "saved-by-affinity") or the breaking reason.
    before_ship: Counter[str] = field(default_factory=Counter)
    # Packets that landed on their connection's PoP: "local" (handle(local=True)),
    # "data-plane" (a pinned flow: no handle() call).
    home: Counter[str] = field(default_factory=Counter)
    # "route-changed" (the ACK landed on another PoP than the SYN), "saved", "broken".
    handshakes: Counter[str] = field(default_factory=Counter)
    # "sent" (SYNs sent again after a lost SYN-ACK), "landed-elsewhere" (not on the
    # first SYN's PoP), "lived-elsewhere" (served, so the connection lives, elsewhere).
    syn_again: Counter[str] = field(default_factory=Counter)
    # "flows", "confirmed", "broken".
    udp: Counter[str] = field(default_factory=Counter)
    # "flows" (pinned once established), "data-plane-packets" (landed home or tunnelled
    # there: served by the data plane), "broken".
    pinned: Counter[str] = field(default_factory=Counter)
    # "calls", "keys" (alive() rounds), "not-owned" (answers naming no owner or another
    # PoP), "failed" (rounds the table did not answer).
    keepalive: Counter[str] = field(default_factory=Counter)
    # Confirm answers: "ok" (this PoP owns it), "owned-elsewhere", "failed".
    confirms: Counter[str] = field(default_factory=Counter)
    lag_s: float = 0.0


def saved_by(out: Outcome) -> str:
    """How a packet served at its connection's PoP after landing elsewhere was sent there."""
    if out.answer is not None and out.answer.second_chance:
        return "second-chance"
    if out.reason == "affinity":
        return "affinity"
    if out.reason in ("owner", "claim-owned-elsewhere"):
        return "record"
    return out.reason


def break_reason(out: Outcome, landed_pop: int, lapsed: bool) -> str:
    """Why a packet that landed on PoP ``landed_pop`` (wire id) was served away from its
    connection. ``lapsed``: it was confirmed longer ago than the established TTL."""
    if out.reason in _NOBODY:
        if lapsed:
            return "record-lapsed"
        if out.reason == "new-flow":
            return "claimed-as-new"
        if out.reason == "affinity":
            return "affinity-elsewhere"
        if out.answer is not None and out.answer.affinity == landed_pop:
            return "affinity-is-here"
        return "no-owner-known"
    return "wrong-owner"


def before_ship(out: Outcome) -> bool:
    """The landing PoP's own table had no record of the flow: no PoP knew it, or only
    another PoP did (a second chance found it)."""
    if out.reason in _NOBODY:
        return True
    return out.answer is not None and out.answer.second_chance
