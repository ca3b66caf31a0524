"""What a forwarder does with a packet: the decision table of docs/protocol.md#decision-table
(pure).

    decide(Packet.DATA, here=1, tunnelled=False, owner=2, affinity=0)
    -> Decision(Action.TUNNEL, target=2, reason="owner")

Inputs are what the forwarder knows: whether it holds a local socket for the flow (then
the packet is served here, whatever the table says), the flow's owning PoP from its cache
or the table (0 = no live record in this PoP nor, after a second chance, in any other),
the client's preferred PoP from the affinity fallback (0 = none). No I/O;
``dht.client.forwarder`` does the look-ups, claims and releases.

The loop guard is part of the table: a packet that arrived tunnelled is served here and
never tunnelled again (hop limit 1), and no decision ever tunnels to ``here``, whatever
the table says.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Packet(IntEnum):
    """The kinds of packet the table tells apart."""

    SYN = 1  # TCP SYN (a first SYN, or a retransmission after a flap)
    DATA = 2  # any other TCP packet of a connection
    FIN = 3  # TCP FIN or RST: the connection ends
    UDP = 4


class Action(IntEnum):
    SERVE = 1  # the flow is (or becomes) this PoP's: hand the packet to the local stack
    TUNNEL = 2  # encapsulate to ``target``, the PoP that owns the connection
    CLAIM = 3  # claim for this PoP (embryonic), then serve; "owned by Q" -> tunnel to Q
    SERVE_UNKNOWN = 4  # no owner known: serve locally and count it (the kernel resets it)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    # The PoP to tunnel to (TUNNEL only; 0 otherwise).
    target: int = 0
    # Why, for counters and the simulator's explanations: "local-socket", "tunnelled-in",
    # "owner", "affinity", "new-flow", "unknown", "loop-guard".
    reason: str = ""
    # FIN/RST served by the owner: release the record (a tombstone).
    release: bool = False
    # A CLAIM whose answer names another owner may tunnel there; a tunnelled-in SYN's
    # claim may not (hop limit 1).
    may_tunnel: bool = True


def decide(
    packet: Packet,
    *,
    here: int,
    tunnelled: bool,
    owner: int,
    affinity: int = 0,
    sticky_clients: bool = False,
    local: bool = False,
) -> Decision:
    """The table of docs/protocol.md#decision-table for one packet at PoP ``here``.

    ``owner``: the flow's owning PoP, 0 if no live record is known. ``affinity``: the
    client's preferred PoP (the look-up's affinity fallback), 0 if none.
    ``sticky_clients``: a new flow (SYN) of a client whose affinity names another PoP
    goes there rather than starting here. ``local``: this host holds a local socket for
    the flow, so the connection is served right here: no table answer sends it away."""
    if local:
        return Decision(Action.SERVE, reason="local-socket", release=packet is Packet.FIN)
    d = _table(packet, here, tunnelled, owner, affinity, sticky_clients)
    if d.action is Action.TUNNEL and d.target in (here, 0):
        # Never tunnel to yourself (nor nowhere), whatever the table says.
        return Decision(Action.SERVE, reason="loop-guard", release=packet is Packet.FIN)
    return d


def _table(
    packet: Packet, here: int, tunnelled: bool, owner: int, affinity: int, sticky: bool
) -> Decision:
    if tunnelled:
        # Hop limit 1: served here. A new flow tunnelled in is claimed here (it is ours
        # now), but its claim never sends it on again.
        if packet in (Packet.SYN, Packet.UDP) and owner != here:
            return Decision(Action.CLAIM, reason="tunnelled-in", may_tunnel=False)
        return Decision(Action.SERVE, reason="tunnelled-in", release=packet is Packet.FIN)
    if owner == here:
        return Decision(Action.SERVE, reason="owner", release=packet is Packet.FIN)
    if owner:
        # Owned elsewhere: a retransmitted SYN after a flap, a packet of a moved client,
        # its FIN (the owner releases it).
        return Decision(Action.TUNNEL, owner, "owner")
    # No live record.
    if packet is Packet.SYN:
        if sticky and affinity and affinity != here:
            return Decision(Action.TUNNEL, affinity, "affinity")
        return Decision(Action.CLAIM, reason="new-flow")
    if packet is Packet.UDP:
        return Decision(Action.CLAIM, reason="new-flow")
    # TCP non-SYN (data, FIN, RST) of a flow nobody is known to own.
    if affinity and affinity != here:
        return Decision(Action.TUNNEL, affinity, "affinity")
    return Decision(Action.SERVE_UNKNOWN, reason="unknown")
