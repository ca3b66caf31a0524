"""A replica's undo windows (docs/protocol.md#undo): which copies other coordinators wrote
here lately, and may still take back, and which of those were pulled from here meanwhile.

Not thread-safe; lives in the node's loop (dht.node.replica owns one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from dht.core.wire import U64Array

# Batches of key hashes, oldest first: (until when, mono ms; the hashes; their writer).
_Batches = deque[tuple[int, U64Array, str]]


class UndoWindows:
    """Copies open to an undo by their writer for ``window_ms`` after they were taken
    (``open``), and those of them a take-over, refill, hand-off or quorum read pulled from
    here meanwhile (``pinned``): the puller may decide claims on them, so an undo leaves
    them standing."""

    def __init__(self, window_ms: int, mono_ms: Callable[[], int]) -> None:
        self.window_ms = window_ms
        self._mono = mono_ms
        self._open: _Batches = deque()
        self._pinned: _Batches = deque()

    def wrote(self, hashes: U64Array, writer: str) -> None:
        """``writer``'s coordinated write of these keys was just taken here."""
        self._add(self._open, hashes, writer)

    def recent(self) -> U64Array | None:
        """Hashes of every copy still open to an undo (None: none is)."""
        return self._hashes(self._open, None)

    def written_by(self, hashes: U64Array, writer: str) -> npt.NDArray[np.bool_]:
        """Per key: a copy ``writer`` wrote here is still open to its undo."""
        return self._member(self._open, hashes, writer)

    def pin(self, hashes: U64Array) -> None:
        """These copies open to an undo are being pulled from here: they stand."""
        if len(hashes):
            self._add(self._pinned, hashes, "")

    def pinned(self, hashes: U64Array) -> npt.NDArray[np.bool_]:
        """Per key: a copy pulled from here while open to an undo."""
        return self._member(self._pinned, hashes, None)

    def _member(
        self, batches: _Batches, hashes: U64Array, writer: str | None
    ) -> npt.NDArray[np.bool_]:
        got = self._hashes(batches, writer)
        if got is None:
            return np.zeros(len(hashes), dtype=bool)
        return np.isin(hashes, got)

    def _add(self, batches: _Batches, hashes: U64Array, writer: str) -> None:
        self._prune(batches)
        batches.append((self._mono() + self.window_ms, hashes, writer))

    def _hashes(self, batches: _Batches, writer: str | None) -> U64Array | None:
        self._prune(batches)
        got = [h for _, h, w in batches if writer is None or w == writer]
        return np.concatenate(got) if got else None

    def _prune(self, batches: _Batches) -> None:
        """Forget batches past their window."""
        now = self._mono()
        while batches and batches[0][0] <= now:
            batches.popleft()
