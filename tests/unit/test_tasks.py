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


async def test_a_step_that_raises_is_counted_and_the_loop_goes_on() -> None:
    tasks = Tasks("n")
    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        if calls in (1, 2):
            raise ValueError(f"bad record {calls}")
        if calls >= 4:
            tasks.stopping.set()

    tasks.spawn("purge", tasks.every(0.001, step, "purge"))
    await asyncio.wait_for(tasks.stopping.wait(), 5)
    await tasks.cancel_all()
    assert calls == 4
    assert tasks.errors == {"purge": 2}
    assert tasks.last_error["purge"] == "ValueError('bad record 2')"
    assert tasks.failed == {}
    assert tasks.failing == {}  # the steps after went through


async def test_a_loop_whose_every_step_fails_shows_as_failing() -> None:
    tasks = Tasks("n")

    async def step() -> None:
        raise OverflowError("incarnation too large")

    tasks.spawn("probe", tasks.every(0.001, step, "probe"))
    for _ in range(500):
        if tasks.failing:
            break
        await asyncio.sleep(0.01)
    assert "probe" in tasks.failing
    assert "OverflowError" in tasks.failing["probe"]
    assert tasks.failed == {}  # still running: it recovers if the data does
    await tasks.cancel_all()


async def test_a_cancelled_step_ends_the_loop() -> None:
    tasks = Tasks("n")
    started = asyncio.Event()

    async def step() -> None:
        started.set()
        await asyncio.Event().wait()

    task = tasks.start("loop", tasks.every(0.001, step, "loop"))
    await started.wait()
    assert await tasks.cancel_all(bound_s=2.0) == []
    assert task.cancelled()
    assert tasks.errors == {}
