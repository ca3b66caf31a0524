"""The op vocabulary, one form from the wire to the store.

An :class:`Op`'s value is its gRPC method name (dht.edge.convert maps a request to it);
the node routes and coordinates a :class:`BatchCall` of it, and the store applies it
(``FlowStore.mutate``). Nothing re-dispatches on strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dht.core.wire import FORMAT_VERSION


class Op(Enum):
    CLAIM = "Claim"
    CONFIRM = "Confirm"
    LOOKUP = "Lookup"
    REFRESH = "Refresh"
    RELEASE = "Release"
    GET_AFFINITY = "GetAffinity"
    SET_AFFINITY = "SetAffinity"

    @property
    def mutating(self) -> bool:
        """Changes stored copies: coordinated, replicated, settled or undone."""
        return self not in (Op.LOOKUP, Op.GET_AFFINITY)

    @property
    def affinity(self) -> bool:
        """Addresses client prefixes (the affinity store), not flows."""
        return self in (Op.GET_AFFINITY, Op.SET_AFFINITY)

    @property
    def creates(self) -> bool:
        """May create a record (and so needs a birth stamp and a capacity check)."""
        return self in (Op.CLAIM, Op.CONFIRM)


@dataclass(frozen=True, slots=True)
class BatchCall:
    """A batch call as the node sees it, free of protobuf types (dht.edge.convert
    converts)."""

    op: Op
    payload: bytes  # packed keys (flow ops) or packed 16-byte client addresses (affinity)
    format_version: int = FORMAT_VERSION
    pop: int = 0
    server: int = 0
    ttl_s: int = 0
    epoch: int = 0
    no_forward: bool = False
    forwarded: bool = False
    # Lookup: ask the other PoPs for keys this PoP has no record of
    # (docs/protocol.md#second-chance).
    second_chance: bool = False
    # Asked by another PoP's node (a second chance): answered from this PoP's table alone.
    peer_pop: int = 0
