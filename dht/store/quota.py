"""The embryonic quota per client prefix, PoP-wide (docs/protocol.md#capacity-and-quota).

A PoP's quota ``Q`` (``embryonic_quota_per_prefix``) is enforced by each coordinator from
what it sees, scaled up to the PoP by the share of the key space it sees it in (set at every
epoch from the partition table; keys spread evenly over partitions):

* embryonic records: counted in this node's store, which holds copies of the partitions it
  replicates (``held``: their fraction of all partitions), so ``n`` embryos here stand for
  about ``n / held`` in the PoP;
* records created by confirms (no claim came first: established at once, so they never
  show in the embryonic count, and a flood of them could fill the table from one prefix):
  counted only by the node that coordinated them, per prefix in fixed windows of the
  embryonic TTL, so ``m`` of them stand for about ``m / led`` (``led``: the fraction of
  partitions this node is the primary of, the coordinator of their writes). They are
  counted in a count-min sketch (two rows of 131,072 counters, 1 MiB whatever the load),
  not per prefix: a dict entry per confirming client cost ~150 bytes per record created
  in the window (1M confirms in 10 s: 150 MB). A sketch only ever over-counts, and only a
  prefix that shares both its counters with busier prefixes is refused early.

A new one is admitted while ``n / held + m / led < Q``. The PoP as a whole then admits
about ``Q`` per prefix; the spread of the hash and writes still in flight between replicas
make it approximate (measured in tests/integration/test_bounded.py).
"""

from __future__ import annotations

import numpy as np
import xxhash

# Count-min sketch of confirm-created records per prefix: 2 rows x 2^17 uint32 counters.
_ROWS = 2
_BITS = 17
_MASK = (1 << _BITS) - 1


class PrefixQuota:
    """This node's part of the PoP's embryonic quota per client prefix."""

    def __init__(self, quota: int, window_ms: int) -> None:
        self.quota = quota
        self._window_ms = window_ms
        self.held = 1.0  # fraction of the partitions this node replicates
        self.led = 1.0  # fraction of the partitions this node is the primary of
        # Confirm-created records per prefix in the current window (count-min sketch).
        self._counts = np.zeros((_ROWS, 1 << _BITS), dtype=np.uint32)
        self._window = -1  # index of the window the counts belong to (now // window_ms)

    def set_shares(self, held: float, led: float) -> None:
        """This node's shares of the key space (each in (0, 1], ``led <= held``)."""
        if not 0.0 < led <= held <= 1.0:
            raise ValueError(f"quota shares held={held} led={led}: want 0 < led <= held <= 1")
        self.held, self.led = held, led

    def _roll(self, now_ms: int) -> None:
        window = now_ms // self._window_ms
        if window != self._window:
            self._counts.fill(0)
            self._window = window

    @staticmethod
    def _slots(prefix: bytes) -> tuple[int, int]:
        h = xxhash.xxh3_64_intdigest(prefix)
        return h & _MASK, (h >> 32) & _MASK

    def created(self, prefix: bytes, now_ms: int) -> int:
        """Records created by confirms of ``prefix`` in the current window (never fewer
        than were counted; more only when both its counters are shared)."""
        self._roll(now_ms)
        a, b = self._slots(prefix)
        return int(min(self._counts[0, a], self._counts[1, b]))

    def allows(self, prefix: bytes, embryos: int, now_ms: int) -> bool:
        """May ``prefix``, holding ``embryos`` embryonic records here, get one more?"""
        return embryos / self.held + self.created(prefix, now_ms) / self.led < self.quota

    def count_created(self, prefix: bytes, now_ms: int) -> None:
        """A confirm of ``prefix`` created a record."""
        self._roll(now_ms)
        a, b = self._slots(prefix)
        self._counts[0, a] += 1
        self._counts[1, b] += 1

    def sweep(self, now_ms: int) -> None:
        """Start a new window if the current one has ended (the purge calls it)."""
        self._roll(now_ms)
