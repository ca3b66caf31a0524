"""The embryonic quota per client prefix, PoP-wide (docs/protocol.md#capacity-and-quota).

A PoP's quota ``Q`` (``embryonic_quota_per_prefix``) is enforced by each coordinator from
what it sees, scaled up to the PoP by the share of the key space it sees it in (set at every
epoch from the partition table; keys spread evenly over partitions):

* embryonic records: counted in this node's store, which holds copies of the partitions it
  replicates (``held``: their fraction of all partitions), so ``n`` embryos here stand for
  about ``n / held`` in the PoP;
* records created by confirms (no claim came first: established at once, so they never
  show in the embryonic count, and a flood of them could fill the table from one prefix):
  counted only by the node that coordinated them, per prefix in windows of the embryonic
  TTL, so ``m`` of them stand for about ``m / led`` (``led``: the fraction of partitions
  this node is the primary of, the coordinator of their writes).

A new one is admitted while ``n / held + m / led < Q``. The PoP as a whole then admits
about ``Q`` per prefix; the spread of the hash and writes still in flight between replicas
make it approximate (measured in tests/integration/test_bounded.py).
"""

from __future__ import annotations


class PrefixQuota:
    """This node's part of the PoP's embryonic quota per client prefix."""

    def __init__(self, quota: int, window_ms: int) -> None:
        self.quota = quota
        self._window_ms = window_ms
        self.held = 1.0  # fraction of the partitions this node replicates
        self.led = 1.0  # fraction of the partitions this node is the primary of
        # prefix -> (window start, confirms that created a record in that window)
        self._created: dict[bytes, tuple[int, int]] = {}
        self._swept_ms = 0

    def set_shares(self, held: float, led: float) -> None:
        """This node's shares of the key space (each in (0, 1], ``led <= held``)."""
        if not 0.0 < led <= held <= 1.0:
            raise ValueError(f"quota shares held={held} led={led}: want 0 < led <= held <= 1")
        self.held, self.led = held, led

    def created(self, prefix: bytes, now_ms: int) -> int:
        """Records created by confirms of ``prefix`` in its current window."""
        start, n = self._created.get(prefix, (0, 0))
        return n if now_ms - start < self._window_ms else 0

    def allows(self, prefix: bytes, embryos: int, now_ms: int) -> bool:
        """May ``prefix``, holding ``embryos`` embryonic records here, get one more?"""
        return embryos / self.held + self.created(prefix, now_ms) / self.led < self.quota

    def count_created(self, prefix: bytes, now_ms: int) -> None:
        """A confirm of ``prefix`` created a record."""
        start, n = self._created.get(prefix, (now_ms, 0))
        if now_ms - start >= self._window_ms:
            start, n = now_ms, 0
        self._created[prefix] = (start, n + 1)

    def sweep(self, now_ms: int) -> None:
        """Forget ended windows (at most once per window: one pass over the prefixes)."""
        if now_ms - self._swept_ms < self._window_ms:
            return
        self._swept_ms = now_ms
        w = self._window_ms
        self._created = {p: v for p, v in self._created.items() if now_ms - v[0] < w}

    def __len__(self) -> int:
        return len(self._created)
