"""Owned tasks stop within their bound, even a task that swallows a cancellation (what
``asyncio.wait_for`` does on Python 3.11 when the awaited thing completes as the cancel
arrives: a ``while True`` loop around it then never ended, and a node's stop hung)."""

from __future__ import annotations

import asyncio

from dht.node.tasks import Tasks, wait_event


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    tasks = Tasks("n")
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # the first one is lost, as wait_for loses it

    tasks.spawn("stubborn", stubborn())
    await asyncio.sleep(0)  # let it start
    assert await tasks.cancel_all(bound_s=5.0) == []
    assert swallowed.is_set()


async def test_a_task_that_never_ends_is_left_behind_within_the_bound() -> None:
    tasks = Tasks("n")
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = tasks.start("immortal", immortal())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await tasks.cancel_all(bound_s=0.3) == ["n:immortal"]
    assert loop.time() - started < 2.0
    release.set()
    await task


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    event.set()
    assert await wait_event(event, 10.0)
