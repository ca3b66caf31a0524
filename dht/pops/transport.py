"""The calls one node makes to the nodes of other PoPs: the :class:`PopTransport`
interface, its answers and its one error. gRPC implements it in :mod:`dht.edge.pop_grpc`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dht.core.errors import DhtError
from dht.core.wire import U64Array


class PopUnreachable(DhtError):
    """A call to another PoP's node failed or timed out."""

    retryable = True


@dataclass(frozen=True, slots=True)
class ShipResult:
    ok: bool
    applied: int = 0
    rejected: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Digests:
    """A peer node's answer: the partitions it covers and their digests and counts."""

    partitions: npt.NDArray[np.intp]
    digests: U64Array
    counts: npt.NDArray[np.uint32]


class ShipStream(Protocol):
    """One open shipping stream to a node of another PoP. ``send`` writes a batch and
    waits for its acknowledgement (bounded); raises PopUnreachable."""

    async def send(self, seq: int, raw: bytes, sent_hlc: int) -> ShipResult: ...

    async def close(self) -> None: ...


class PopTransport(Protocol):
    """Calls to other PoPs' nodes; each raises PopUnreachable and is bounded in time."""

    def stream(self, address: str) -> ShipStream: ...

    async def digests(
        self, address: str, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> Digests: ...

    def fetch(
        self, address: str, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> AsyncIterator[bytes]: ...

    async def push(self, address: str, raw: bytes, sent_hlc: int) -> ShipResult: ...

    async def lookup(self, address: str, raw: bytes) -> bytes:
        """Second chance: the peer PoP's results (packed RESULT records) for packed flow
        keys. The caller bounds it with its own deadline."""
        ...

    async def close(self) -> None: ...
