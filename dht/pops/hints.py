"""What a PoP adds to the results of a call this node received first (the node's
``after_batch`` hook; docs/protocol.md#client-affinity, docs/protocol.md#second-chance):

* a confirm makes the confirming PoP the client prefix's preferred PoP
  (``affinity_on_confirm``);
* a Lookup that found nothing answers the client's preferred PoP, flagged
  FLAG_AFFINITY_FALLBACK, status still NOT_FOUND (``affinity_fallback``);
* a Lookup with ``second_chance`` asks the other PoPs about the flows it found nothing
  for, or only an embryonic claim of (:mod:`dht.pops.second`), at the same time as the
  affinity read; a live copy found for an unknown flow, or a completed one for an
  embryonic claim, is answered OK, flagged FLAG_SECOND_CHANCE.

Hints only: a failure leaves the call's own results standing.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import numpy.typing as npt

from dht.core.errors import DhtError
from dht.core.ops import BatchCall, Op
from dht.core.record import Record, State, Status, merge
from dht.core.wire import (
    FLAG_AFFINITY_FALLBACK,
    FLAG_SECOND_CHANCE,
    KEY_DTYPE,
    ResultArray,
    prefix_mask,
    put_result,
)
from dht.node.node import Node
from dht.pops.link import PeerPop
from dht.pops.second import SecondChance, record_of

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
                await self._lookup_misses(call, out)
        except DhtError as e:
            # A hint only: the call's own results stand.
            log.info("affinity after %s failed: %s", call.op.value, e)

    async def _lookup_misses(self, call: BatchCall, out: ResultArray) -> None:
        """The affinity hint for keys this PoP does not know; with ``second_chance``, the
        other PoPs are asked about those, and about the keys this PoP holds only an
        embryonic claim of (the handshake may have completed at another PoP: a SYN-ACK
        lost before a flap), both at once."""
        cfg = self.node.config
        miss = np.flatnonzero(out["status"] == Status.NOT_FOUND)
        ask = miss
        if call.second_chance:
            embryo = (out["status"] == Status.OK) & (out["state"] == State.EMBRYONIC)
            ask = np.flatnonzero((out["status"] == Status.NOT_FOUND) | embryo)
        if not ask.size:
            return
        second = None
        if call.second_chance:
            second = asyncio.ensure_future(self._second_chance(call, ask))
        try:
            if cfg.affinity_fallback and miss.size:
                await self._affinity_fallback(call, out, miss)
        finally:
            if second is not None:
                self._apply_second_chance(out, ask, await second)

    async def _second_chance(
        self, call: BatchCall, ask: npt.NDArray[np.intp]
    ) -> list[Record | None]:
        keys = np.frombuffer(call.payload, dtype=KEY_DTYPE)[ask]
        now = self.node.clock.wall_ms()
        return await self.second.ask(self.links, keys.tobytes(), now)

    def _apply_second_chance(
        self, out: ResultArray, ask: npt.NDArray[np.intp], found: list[Record | None]
    ) -> None:
        """A key this PoP does not know takes any live copy found; a key it holds an
        embryonic claim of takes only a completed one (merge rule 2: the handshake
        finished there), never another PoP's embryonic claim (never shipped, so the
        copies never meet, and the handshake may be completing here)."""
        for i, theirs in zip(ask.tolist(), found, strict=True):
            if theirs is None:
                continue
            rec = theirs
            if out["status"][i] == Status.OK:
                rec = merge(record_of(out[i]), theirs)
                if rec.state < State.ESTABLISHED:
                    continue  # our claim, or another PoP's embryonic one: ours stands
            put_result(out, i, Status.OK, rec)
            out["flags"][i] = FLAG_SECOND_CHANCE

    async def _affinity_on_confirm(self, call: BatchCall, out: ResultArray) -> None:
        pop = call.pop or self.node.pop_id
        status = out["status"]
        ok = ((status == Status.OK) | (status == Status.CREATED)) & (out["owner_pop"] == pop)
        if not ok.any():
            return
        keys = np.frombuffer(call.payload, dtype=KEY_DTYPE)[ok]
        clients = np.ascontiguousarray(keys["caddr"])
        if len(clients) > 1:  # np.unique over rows costs ~50 us even for one
            clients = np.unique(clients, axis=0)
        clients = clients[~self._affinity_fresh(clients, pop)]
        if len(clients):
            await self.node.batch(BatchCall(Op.SET_AFFINITY, clients.tobytes(), pop=pop))

    def _affinity_fresh(self, clients: npt.NDArray[np.uint8], pop: int) -> npt.NDArray[np.bool_]:
        """Per client: does this node's copy already name ``pop``, with more than half of
        an affinity's TTL left? Its confirm then writes nothing: a client's every
        connection used to rewrite (and replicate) the same affinity, a third of a
        confirm's cost. A hint, so a copy that is behind costs at most one skipped
        refresh; a client that moved to another PoP is always written."""
        node = self.node
        cfg = node.config
        now = node.clock.wall_ms()
        have = node.affinity.get(
            prefix_mask(cfg.limits.prefix_v4, cfg.limits.prefix_v6, clients), now
        )
        left = have["expiry_ms"].astype(np.int64) - now
        fresh: npt.NDArray[np.bool_] = (
            (have["status"] == Status.OK)
            & (have["owner_pop"] == pop)
            & (left > cfg.ttl.max_ms // 2)
        )
        return fresh

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
