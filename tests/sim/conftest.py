"""Scenario tests on the in-memory network (tests/sim/memnet.py), in virtual time.

Every test here runs on a ``looptime`` event loop: the loop's clock jumps to the next
timer whenever every task waits, so the nodes' timeouts and intervals pass at once and
in the same order on every run. There are no sockets and no real sleeps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent

# One idle pass of the loop before its clock jumps: looptime's default, 42 passes, makes
# room for I/O and threads; these tests have neither, and the clock jumps thousands of
# times.
LOOPTIME = pytest.mark.looptime(noop_cycles=1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(LOOPTIME)
