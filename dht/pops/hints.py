"""What a PoP adds to the results of a call this node received first (the node's
``after_batch`` hook; docs/protocol.md#client-affinity, docs/protocol.md#second-chance):

* a confirm makes the confirming PoP the client prefix's preferred PoP
  (``affinity_on_confirm``);
* a Lookup that found nothing answers the client's preferred PoP, flagged
  FLAG_AFFINITY_FALLBACK, status still NOT_FOUND (``affinity_fallback``);
* a Lookup with ``second_chance`` asks the other PoPs about the flows it found nothing
  for (:mod:`dht.pops.second`), at the same time as the affinity read; a live copy found
  there is answered OK, flagged FLAG_SECOND_CHANCE.

Hints only: a failure leaves the call's own results standing.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import numpy.typing as npt

from dht.core.errors import DhtError
from dht.core.ops import BatchCall, Op
from dht.core.record import Record, Status
from dht.core.wire import (
    FLAG_AFFINITY_FALLBACK,
    FLAG_SECOND_CHANCE,
    KEY_DTYPE,
    ResultArray,
    put_result,
)
from dht.node.node import Node
from dht.pops.link import PeerPop
from dht.pops.second import SecondChance

log = logging.getLogger(__name__)


class Hints:
    """The after-batch work of one node with links to other PoPs."""

    def __init__(self, node: Node, links: list[PeerPop], second: SecondChance) -> None:
        self.node = node
        self.links = links
        self.second = second

    async def after_batch(self, call: BatchCall, out: ResultArray) -> None:
        cfg = self.node.config
        if not self.links:
            # A lone PoP: every flow's preferred PoP is this one, so affinity records
            # (one per client prefix, a /32 by default) would only cost memory and a
            # quorum write per confirm. Explicit SetAffinity calls still work.
            return
        if call.op is Op.LOOKUP and call.peer_pop:
            return  # another PoP's second chance: this PoP's own table only
        try:
            if call.op is Op.CONFIRM and cfg.affinity_on_confirm:
                await self._affinity_on_confirm(call, out)
            elif call.op is Op.LOOKUP:
                miss = np.flatnonzero(out["status"] == Status.NOT_FOUND)
                if not miss.size:
                    return
                second = None
                if call.second_chance:
                    second = asyncio.ensure_future(self._second_chance(call, miss))
                try:
                    if cfg.affinity_fallback:
                        await self._affinity_fallback(call, out, miss)
                finally:
                    if second is not None:
                        self._apply_second_chance(out, miss, await second)
        except DhtError as e:
            # A hint only: the call's own results stand.
            log.info("affinity after %s failed: %s", call.op.value, e)

    async def _second_chance(
        self, call: BatchCall, miss: npt.NDArray[np.intp]
    ) -> list[Record | None]:
        keys = np.frombuffer(call.payload, dtype=KEY_DTYPE)[miss]
        now = self.node.clock.wall_ms()
        return await self.second.ask(self.links, keys.tobytes(), now)

    def _apply_second_chance(
        self, out: ResultArray, miss: npt.NDArray[np.intp], found: list[Record | None]
    ) -> None:
        for i, rec in zip(miss.tolist(), found, strict=True):
            if rec is not None:
                put_result(out, i, Status.OK, rec)
                out["flags"][i] = FLAG_SECOND_CHANCE

    async def _affinity_on_confirm(self, call: BatchCall, out: ResultArray) -> None:
        pop = call.pop or self.node.pop_id
        ok = np.isin(out["status"], (Status.OK, Status.CREATED)) & (out["owner_pop"] == pop)
        if not ok.any():
            return
        keys = np.frombuffer(call.payload, dtype=KEY_DTYPE)[ok]
        clients = np.unique(np.ascontiguousarray(keys["caddr"]), axis=0)
        await self.node.batch(BatchCall(Op.SET_AFFINITY, clients.tobytes(), pop=pop))

    async def _affinity_fallback(
        self, call: BatchCall, out: ResultArray, miss: npt.NDArray[np.intp]
    ) -> None:
        keys = np.frombuffer(call.payload, dtype=KEY_DTYPE)[miss]
        raw = await self.node.batch(
            BatchCall(Op.GET_AFFINITY, np.ascontiguousarray(keys["caddr"]).tobytes())
        )
        res = np.frombuffer(raw, dtype=out.dtype)
        found = (res["status"] == Status.OK) & (res["owner_pop"] != 0)
        at = miss[found]
        out["owner_pop"][at] = res["owner_pop"][found]
        out["flags"][at] |= FLAG_AFFINITY_FALLBACK
