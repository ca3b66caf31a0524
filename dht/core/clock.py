"""Monotonic milliseconds: the one source of local intervals (timeouts, windows, ticks).

Parts that measure intervals take a ``mono_ms`` callable defaulting to this, so tests can
drive them from a virtual clock (tests/sim).
"""

from __future__ import annotations

import time
from collections.abc import Callable

MonoMs = Callable[[], int]


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000
