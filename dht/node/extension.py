"""The hooks a node offers to what lives outside it (cross-PoP shipping and affinity,
dht.pops). Called from the node's event loop; none may block."""

from __future__ import annotations

from typing import Protocol

from dht.core.ops import BatchCall, Op
from dht.core.wire import EntryArray, ResultArray
from dht.node.peerview import PeerView


class NodeExtension(Protocol):
    def written(self, op: Op, entries: EntryArray, before: ResultArray) -> None:
        """Copies this node coordinated and got acknowledged, with the copies before."""

    async def after_batch(self, call: BatchCall, out: ResultArray) -> None:
        """A batch call this node received first (not a forward) has its results."""

    def sized(self, view: PeerView, members: int) -> None:
        """A new table of ``members``: adjust the view's quorums if need be."""

    def not_ready(self) -> list[str]:
        """Reasons for /readyz to say not ready."""
        ...
