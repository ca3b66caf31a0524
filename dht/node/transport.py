"""The interfaces a node's replication speaks through: calls to the other nodes of the
PoP (:class:`PeerTransport`) and the node's own copies (:class:`LocalReplica`).

The gRPC implementation is dht.edge.peer_grpc; tests use an in-memory one (tests/sim).
Wire packing of the bytes fields is dht.core.packing, for both ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dht.core.errors import DhtError
from dht.core.membership import MemberState
from dht.core.ops import BatchCall
from dht.core.placement import Member
from dht.core.wire import EntryArray, U64Array


class PeerUnreachable(DhtError):
    """A call to a peer failed. ``refused``: the peer is not listening (a dead process),
    as opposed to slow or timed out."""

    retryable = True

    def __init__(self, peer: str, detail: str, refused: bool = False) -> None:
        super().__init__(f"{peer}: {detail}")
        self.refused = refused


_NONE: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a replica did with copies it was sent (a Replicate call)."""

    applied: int = 0
    refused: int = 0
    stale: bool = False  # a write refused whole for its age (nothing applied)
    # A write refused whole because a higher term was promised for these partitions;
    # the highest such term is ``fenced_by``.
    fenced: npt.NDArray[np.intp] = field(default_factory=lambda: _NONE)
    fenced_by: int = 0
    # Positions of a coordinated write's entries that lost to a different claim held by
    # the replica: not held there, so not acknowledgements.
    superseded: npt.NDArray[np.intp] = field(default_factory=lambda: _NONE)
    # Fenced by the replica's floor alone (no promise since it started): it refuses
    # every term from before its start, in every partition it replicates.
    fenced_by_floor: bool = False


class PeerTransport(Protocol):
    """Node-to-node calls. Each raises PeerUnreachable on failure and returns within the
    configured RPC timeout."""

    async def ping(
        self, member: Member, view: Sequence[MemberState]
    ) -> tuple[int, list[MemberState]]:
        """Probe ``member`` with our membership view; returns its epoch and view."""
        ...

    async def ping_req(self, via: Member, target: Member) -> bool:
        """Ask ``via`` to probe ``target`` (SWIM indirect probe)."""
        ...

    async def replicate(
        self,
        member: Member,
        entries: bytes,
        hinted: bool,
        issued_hlc: int = 0,
        terms: U64Array | None = None,
    ) -> MergeResult:
        """Apply copies at ``member``; ``terms`` (one per entry) makes it a coordinated
        write, fenced by the member's promises."""
        ...

    async def promise(
        self, member: Member, partitions: npt.NDArray[np.intp], term: int
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        """Ask ``member`` to promise ``term`` for ``partitions``; returns its promised
        term per partition after the call (== ``term`` where granted), and where its
        copy of the partition is incomplete (dht.node.state.NodeState.incomplete)."""
        ...

    async def undo(
        self, member: Member, written: bytes, before: bytes, terms: U64Array
    ) -> npt.NDArray[np.intp]:
        """Have ``member`` take back a write that missed its quorum (entries as
        ``written``, put back as ``before`` where it may, see dht.proto UndoRequest);
        returns the positions of the entries it left standing."""
        ...

    async def read_copies(self, member: Member, keys: bytes) -> tuple[bytes, npt.NDArray[np.bool_]]:
        """``member``'s copies of the keys, and per key where its partition's copy there
        is incomplete."""
        ...

    async def digests(
        self, member: Member, partitions: npt.NDArray[np.intp]
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]: ...

    def fetch(
        self, member: Member, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> AsyncIterator[bytes]: ...

    def reset(self, member: Member) -> None:
        """Drop the connection state to ``member`` (it came back: reconnect now, without
        waiting out a reconnect backoff)."""


class LocalReplica(Protocol):
    """The node's own copies (flows and affinity alike)."""

    def merge_entries(self, entries: EntryArray) -> MergeResult: ...

    def partition_digests(self) -> tuple[U64Array, npt.NDArray[np.uint32]]: ...

    def export_entries(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> EntryArray: ...


# Forwards a sub-batch to a member: (member, call) -> packed result records. Raises
# PeerUnreachable when the member cannot be reached in time.
ForwardCall = Callable[[Member, BatchCall], Awaitable[bytes]]
