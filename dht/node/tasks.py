"""Every background task of a node has an owner: this.

A failing task is logged and recorded in ``failed`` (``/livez`` and ``/readyz`` show it);
periodic loops are one coroutine each, with jitter, until the stop event. One step of a
periodic loop that raises (one bad record, one peer's odd answer) does not end the loop:
it is logged, counted per loop in ``errors`` (``dht_loop_errors_total{loop}``) and the
loop goes on at its next interval; a loop whose last ``REPEATED_FAILURES`` steps all
failed shows in ``/livez`` (``failing``) as a dead one would. Cancellation is never
caught. Stopping is
bounded: a task that does not end after being cancelled is cancelled again and, past the
bound, left behind with a logged reason rather than hanging the node's stop.

Waits use ``asyncio.timeout``, never ``asyncio.wait_for``: on Python 3.11 ``wait_for``
loses a cancellation that arrives as the awaited thing completes, and a loop that loses
its cancellation never ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

# How long stopping waits for cancelled tasks to end, in all (they normally end at once).
CANCEL_BOUND_S = 5.0
# Consecutive failed steps after which a loop counts as failing (/livez): one bad step is
# an item skipped, a loop that fails every time does no work at all.
REPEATED_FAILURES = 5


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


class Tasks:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        self.failed: dict[str, str] = {}
        self.errors: dict[str, int] = {}  # failed steps (items skipped) per loop
        self.streak: dict[str, int] = {}  # consecutive failed steps per loop
        self.last_error: dict[str, str] = {}

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

    def error(self, loop: str, e: BaseException) -> None:
        """Record one failed step or item of ``loop`` (logged with its traceback)."""
        log.error("loop %s: a step failed and was skipped: %r", loop, e, exc_info=e)
        self.errors[loop] = self.errors.get(loop, 0) + 1
        self.streak[loop] = self.streak.get(loop, 0) + 1
        self.last_error[loop] = repr(e)

    def succeeded(self, loop: str) -> None:
        """A step of ``loop`` went through: it is no longer failing."""
        self.streak.pop(loop, None)

    @property
    def failing(self) -> dict[str, str]:
        """Loops whose last REPEATED_FAILURES steps failed, with their last error."""
        return {
            k: f"{n} steps failed in a row, last: {self.last_error.get(k, '?')}"
            for k, n in self.streak.items()
            if n >= REPEATED_FAILURES
        }

    async def every(
        self,
        interval_s: float,
        step: Callable[[], Awaitable[None] | None],
        name: str | None = None,
    ) -> None:
        """Run ``step`` every ``interval_s`` (+-10% jitter) until stop. A step that raises
        is recorded (:meth:`error`, under ``name``, default the step's name) and the loop
        goes on."""
        loop: str = name or str(getattr(step, "__name__", "loop"))
        while not self.stopping.is_set():
            try:
                result = step()
                if result is not None:
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.error(loop, e)
            else:
                self.succeeded(loop)
            delay = interval_s * random.uniform(0.9, 1.1)
            await self.pause(delay)

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the node stops meanwhile."""
        await wait_event(self.stopping, seconds)

    async def cancel_all(
        self, *extra: asyncio.Task[Any], bound_s: float = CANCEL_BOUND_S
    ) -> list[str]:
        """Cancel every owned task (and ``extra``) and wait for them to end, cancelling
        again those that swallow a cancellation, for at most ``bound_s``. Returns the
        names of the tasks still running then (logged; they are left behind)."""
        pending = {t for t in (*self._tasks, *extra) if not t.done()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound_s
        while pending:
            for t in pending:
                t.cancel()
            left = deadline - loop.time()
            if left <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(left, 0.5))
        stuck = sorted(t.get_name() for t in pending)
        if stuck:
            log.error("tasks still running %.1f s after cancel: %s", bound_s, stuck)
        return stuck
