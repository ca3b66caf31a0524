"""Take-overs of partitions by this node as coordinator (docs/protocol.md#terms-and-fencing).

A write takes its partitions over before it applies anything (if this node holds no
term for them); a read answered from this node's copy alone needs a term too, so reads
take partitions over in the background once the membership has settled. One take-over
at a time per partition: later callers wait for the one under way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
import numpy.typing as npt

from dht.core.errors import DhtError
from dht.core.record import HybridClock
from dht.node.peerview import PeerView
from dht.node.replication import Replicator
from dht.node.terms import Terms

log = logging.getLogger(__name__)


class TakeOvers:
    def __init__(
        self,
        view: PeerView,
        terms: Terms,
        replicator: Replicator,
        clock: HybridClock,
        spawn: Callable[[str, Awaitable[object]], object] | None,
    ) -> None:
        self.view = view
        self.terms = terms
        self.replicator = replicator
        self.clock = clock
        self._spawn = spawn
        # Partitions being taken over now, each with the take-over's future.
        self._acquiring: dict[int, asyncio.Future[None]] = {}
        self._warming: set[int] = set()  # partitions taken over in the background now

    async def take_over(self, parts: npt.NDArray[np.uint16]) -> npt.NDArray[np.bool_]:
        """Per key of ``parts``: does this node hold a term for its partition (taking
        the partitions over first where it does not, see dht.node.replication)? A partition
        already being taken over by another call is waited for, not taken over twice;
        unrelated take-overs do not wait for each other."""
        if bool((self.terms.held[parts] > 0).all()):
            return np.ones(len(parts), dtype=bool)
        need = np.unique(parts[self.terms.held[parts] == 0]).astype(np.intp)
        waiting = {self._acquiring[p] for p in need.tolist() if p in self._acquiring}
        # With them, every other partition this node coordinates without a term: after a
        # membership change or a peer's restart (whose floor fences every earlier term)
        # each would otherwise be taken over at its own next write, a promise, digest and
        # fetch call per replica each time; one take-over costs those calls once.
        unheld = (self.view.coordinators() == self.view.self_index) & (self.terms.held == 0)
        unheld[need] = True
        mine = np.array(
            [p for p in np.flatnonzero(unheld).tolist() if p not in self._acquiring],
            dtype=np.intp,
        )
        if mine.size:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for p in mine.tolist():
                self._acquiring[p] = fut
            try:
                await self.replicator.acquire(mine, self.terms.next_term(mine, self.clock.now()))
            finally:
                for p in mine.tolist():
                    if self._acquiring.get(p) is fut:
                        del self._acquiring[p]
                fut.set_result(None)
        if waiting:
            await asyncio.wait(waiting)
        return np.asarray(self.terms.held[parts] > 0, dtype=bool)

    def settled(self) -> bool:
        """No membership change under way: one table in force, every peer up on it. Only
        then are partitions taken over in the background; during a change the nodes may
        disagree on who is primary, and take-overs for reads would fence each other."""
        return len(self.view.tables()) == 1 and self.view.epochs_agree()

    def warm(self, parts: npt.NDArray[np.uint16]) -> None:
        """Take ``parts`` over in the background (once at a time per partition), so that
        later reads of them are answered locally. Best effort: a take-over that fails is
        logged, and the next read tries again."""
        todo = [
            p
            for p in np.unique(parts).tolist()
            if p not in self._acquiring and p not in self._warming
        ]
        if not todo or self._spawn is None:
            return
        self._warming.update(todo)

        async def run() -> None:
            try:
                await self.take_over(np.array(todo, dtype=np.uint16))
            except DhtError as e:
                log.info("background take-over of %d partitions failed: %r", len(todo), e)
            finally:
                self._warming.difference_update(todo)

        self._spawn(f"take-over-{todo[0]}+{len(todo) - 1}", run())
