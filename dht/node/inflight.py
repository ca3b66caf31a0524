"""Writes in flight on their coordinator: the keys they hold and their copies before.

A mutating call holds its keys until its copies are acknowledged or undone, so no other
call sees or builds on a write that may still be undone (docs/protocol.md#undo). And no
other node may get such a write from this one by another path meanwhile (quorum reads,
anti-entropy): it gets the copy from before the write, or nothing.

Written by the coordinator (dht.node.writes), read by the replica side
(dht.node.replica). Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt

from dht.core.wire import KEY_SIZE, ResultArray

Lock = asyncio.Future[None]


class InFlight:
    def __init__(self) -> None:
        # Per key held: the future of the write holding it (done when it settles).
        self._locks: dict[bytes, Lock] = {}
        # Per write in flight: its keys and their copies before it.
        self._writes: dict[Lock, tuple[npt.NDArray[np.uint8], ResultArray]] = {}

    def __bool__(self) -> bool:
        return bool(self._writes)

    def holds(self, key: bytes) -> bool:
        return key in self._locks

    @property
    def any_held(self) -> bool:
        return bool(self._locks)

    async def lock(self, keys: list[bytes], hold: bool) -> Lock | None:
        """Wait until none of ``keys`` is held by a write in flight; then, if ``hold``,
        hold them all (all at once: no call holds some while waiting for others)."""
        while True:
            busy = {self._locks[k] for k in keys if k in self._locks}
            if not busy:
                break
            await asyncio.wait(busy)
        if not hold or not keys:
            return None
        fut: Lock = asyncio.get_running_loop().create_future()
        for k in keys:
            self._locks[k] = fut
        return fut

    def unlock(self, keys: list[bytes], fut: Lock) -> None:
        self.settled(fut)
        for k in keys:
            if self._locks.get(k) is fut:
                del self._locks[k]
        fut.set_result(None)

    def writing(self, fut: Lock, keys: npt.NDArray[np.uint8], before: ResultArray) -> None:
        """The write holding ``fut`` applied ``keys`` (rows of 40 bytes) locally; their
        copies before it were ``before``."""
        self._writes[fut] = (keys, before)

    def settled(self, fut: Lock) -> None:
        """The write is acknowledged or undone: its copies are no longer hidden."""
        self._writes.pop(fut, None)

    def unsettled(self) -> dict[bytes, ResultArray]:
        """Keys of writes in flight, with their copies before the write."""
        out: dict[bytes, ResultArray] = {}
        for keys, before in self._writes.values():
            for i in range(len(keys)):
                out[keys[i].tobytes()] = before[i : i + 1]
        return out

    def hidden(self, raw_keys: bytes) -> npt.NDArray[np.bool_]:
        """Per 40-byte key of ``raw_keys``: is it written by a write in flight?"""
        unsettled = self.unsettled()
        return np.array(
            [raw_keys[i : i + KEY_SIZE] in unsettled for i in range(0, len(raw_keys), KEY_SIZE)],
            dtype=bool,
        )
