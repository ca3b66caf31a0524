"""A replica's undo windows (docs/protocol.md#undo): which copies other coordinators wrote
here lately, and may still take back, and which of those were pulled from here meanwhile.

Not thread-safe; lives in the node's loop (dht.node.replica owns one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from dht.core.config import NodeConfig
from dht.core.wire import ResultArray, U64Array, new_results

# Batches of key hashes, oldest first: (until when, mono ms; the hashes; their writer;
# the terms and the copies written, for open writes).
_Batch = tuple[int, U64Array, str, U64Array | None, ResultArray | None]
_Batches = deque[_Batch]


def undo_window_ms(config: NodeConfig) -> int:
    """How long a replica keeps another coordinator's write open: two RPC timeouts (the
    write, then its undo) and a second of slack, and the failure timeout more for a later
    write to replace it (a retry, maybe at another coordinator once the first looks down)."""
    return 2 * config.rpc_timeout_ms + 1000 + round(config.failure_timeout_s * 1000)


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

    def wrote(self, hashes: U64Array, writer: str, terms: U64Array, written: ResultArray) -> None:
        """``writer``'s coordinated write of these keys (the copies ``written``, under
        ``terms``) was just taken here."""
        self._add(self._open, hashes, writer, terms, written)

    def last_written(self, hashes: U64Array) -> tuple[npt.NDArray[np.bool_], U64Array, ResultArray]:
        """Per key: is a write of it still open here, and the term and the copy of the
        latest such write."""
        self._prune(self._open)
        found = np.zeros(len(hashes), dtype=bool)
        terms = np.zeros(len(hashes), dtype=np.uint64)
        written = new_results(len(hashes))
        for _, h, _, t, w in reversed(self._open):
            if t is None or w is None or not len(h):
                continue
            sorter = np.argsort(h)
            pos = sorter[np.searchsorted(h, hashes, sorter=sorter).clip(0, len(h) - 1)]
            hit = ~found & (h[pos] == hashes)
            terms[hit] = t[pos[hit]]
            written[hit] = w[pos[hit]]
            found |= hit
        return found, terms, written

    def recent(self) -> U64Array | None:
        """Hashes of every copy still open to an undo (None: none is)."""
        return self._hashes(self._open, None)

    def written_by(self, hashes: U64Array, writer: str) -> npt.NDArray[np.bool_]:
        """Per key: a copy ``writer`` wrote here is still open to its undo."""
        return self._member(self._open, hashes, writer)

    def pin(self, hashes: U64Array) -> None:
        """These copies open to an undo are being pulled from here: they stand."""
        if len(hashes):
            self._add(self._pinned, hashes, "", None, None)

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

    def _add(
        self,
        batches: _Batches,
        hashes: U64Array,
        writer: str,
        terms: U64Array | None,
        written: ResultArray | None,
    ) -> None:
        self._prune(batches)
        batches.append((self._mono() + self.window_ms, hashes, writer, terms, written))

    def _hashes(self, batches: _Batches, writer: str | None) -> U64Array | None:
        self._prune(batches)
        got = [h for _, h, w, _, _ in batches if writer is None or w == writer]
        return np.concatenate(got) if got else None

    def _prune(self, batches: _Batches) -> None:
        """Forget batches past their window."""
        now = self._mono()
        while batches and batches[0][0] <= now:
            batches.popleft()
