"""Every background task of a node has an owner: this.

A failing task is logged and recorded in ``failed`` (``/livez`` and ``/readyz`` show it);
periodic loops are one coroutine each, with jitter, until the stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Tasks:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        self.failed: dict[str, str] = {}

    def spawn(self, name: str, coro: Awaitable[object]) -> asyncio.Task[None]:
        """Start an owned background task; a failure is logged and recorded."""

        async def runner() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("background task %s failed", name)
                self.failed[name] = repr(e)

        return self.own(asyncio.create_task(runner(), name=f"{self._owner}:{name}"))

    def own(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Own a task started elsewhere (it is cancelled by :meth:`cancel_all`)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start an owned task whose failure is its owner's business (not recorded)."""
        return self.own(asyncio.create_task(coro, name=f"{self._owner}:{name}"))

    async def every(self, interval_s: float, step: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``step`` every ``interval_s`` (+-10% jitter) until stop."""
        while not self.stopping.is_set():
            result = step()
            if result is not None:
                await result
            delay = interval_s * random.uniform(0.9, 1.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the node stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def cancel_all(self, *extra: asyncio.Task[Any]) -> None:
        tasks = list(self._tasks) + list(extra)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
