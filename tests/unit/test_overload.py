"""The overload measure (dht.node.overload): a stall shows at once, is forgotten within
a fraction of a second, and only lag above the limit sheds."""

from __future__ import annotations

import pytest

from dht.core.errors import LimitExceeded
from dht.node.overload import DECAY, TICK_MS, Overload


def test_a_stall_sheds_at_once_and_is_forgotten_within_a_few_ticks() -> None:
    o = Overload(limit_ms=100)
    o.admit()  # nothing seen yet
    o.observe(400)
    assert o.overloaded
    with pytest.raises(LimitExceeded, match="overloaded: the node runs 400 ms behind"):
        o.admit()
    assert o.shed == 1
    ticks = 0
    while o.overloaded:
        o.observe(0)
        ticks += 1
    assert ticks == 3 and 400 * DECAY**3 <= 100  # ~3 ticks of TICK_MS
    assert ticks * TICK_MS < 100
    o.admit()


def test_lasting_lag_keeps_shedding_and_zero_never_sheds() -> None:
    o = Overload(limit_ms=100)
    for _ in range(50):
        o.observe(150)
    assert o.overloaded and o.lag_ms == 150
    off = Overload(limit_ms=0)
    off.observe(10_000)
    off.admit()
    assert not off.overloaded and off.shed == 0
    o.observe(-5)  # a timer early by the clock's jitter is no lag
    assert o.lag_ms == 150 * DECAY or o.lag_ms == 150
