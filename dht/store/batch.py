"""The write buffer of one mutating call (claim, confirm, refresh, release, restore).

Mutations loop per key in Python, in call order, but read the batch's existing rows in
one vectorised gather (:class:`FamilyBatch`, one per address family) and write them back
in one vectorised scatter at the end; inside the loop a batch-local dict of pending
records makes duplicate keys in one batch behave as if applied one after the other.
:class:`Answers` collects the per-key results the same way.
"""

from __future__ import annotations

import numpy as np

from dht.core import wire
from dht.core.record import Record, State, Status
from dht.core.wire import ResultArray, U64Array
from dht.store.table import RECORD_FIELDS, FamilyTable, U8Array

# Batches of at most this many keys read their rows key by key in pure Python.
SMALL_BATCH = 4


class FamilyBatch:
    """One family's share of one mutating call: existing rows read up front, new and
    changed records held here (so later duplicates of a key see them), written at end."""

    def __init__(self, table: FamilyTable, compact: U8Array, hashes: U64Array) -> None:
        self.table = table
        self.hashes = hashes
        self.compact = compact
        self.protocols: list[int] = compact[:, 0].tolist()
        self.stored: list[Record | None]
        self.rows: list[int]
        if len(hashes) <= SMALL_BATCH:
            # Key by key in pure Python: the vectorised probe costs tens of numpy calls.
            self.rows = [
                table.find_one(h, c.tobytes())
                for h, c in zip(hashes.tolist(), self.compact, strict=True)
            ]
            self.stored = [table.record_at(r) if r >= 0 else None for r in self.rows]
            distinct = len(set(hashes.tolist()))
        else:
            rows = table.find(hashes, self.compact)
            present = rows >= 0
            self.stored = [None] * len(rows)
            for j, rec in zip(
                np.flatnonzero(present).tolist(), table.records(rows[present]), strict=True
            ):
                self.stored[j] = rec
            self.rows = rows.tolist()
            distinct = len(np.unique(hashes))
        self.prefixes = table.prefixes(self.compact)
        # Only a batch with a repeated hash can create a key and then meet it again.
        self.fresh: dict[bytes, int] | None = {} if distinct < len(hashes) else None
        self.new_rows: list[int] = []
        self.new_at: list[int] = []
        self.pending: dict[int, Record] = {}
        table.reserve(len(self.rows))

    def existing(self, j: int) -> tuple[int, Record | None]:
        row = self.rows[j]
        if row < 0 and self.fresh is not None:
            row = self.fresh.get(self.compact[j].tobytes(), -1)
        if row < 0:
            return row, None
        pending = self.pending.get(row)
        return row, pending if pending is not None else self.stored[j]

    def prefix(self, j: int) -> bytes:
        return bytes(self.prefixes[j].tobytes())

    def put(self, j: int, row: int, old: Record | None, rec: Record) -> None:
        if row < 0:
            row = self.table.alloc()
            self.new_rows.append(row)
            self.new_at.append(j)
            if self.fresh is not None:
                self.fresh[self.compact[j].tobytes()] = row
        self.table.count_state(
            State.NONE if old is None else old.state, rec.state, lambda: self.prefix(j)
        )
        self.pending[row] = rec

    def flush(self) -> None:
        t = self.table
        if self.pending:
            t.write(np.fromiter(self.pending, np.int64), list(self.pending.values()))
        if self.new_rows:
            rows = np.array(self.new_rows, dtype=np.int64)
            at = np.array(self.new_at, dtype=np.int64)
            t.entries["hash"][rows] = self.hashes[at]
            t.entries["key"][rows] = t.key_values(self.compact)[at]
            t.index_add(rows, self.hashes[at])


class Answers:
    """Per-key results collected as Python lists, written as columns at the end."""

    def __init__(self, n: int) -> None:
        self.out = wire.new_results(n)
        self.at: list[int] = []
        self.status: list[int] = []
        self.shown_at: list[int] = []
        self.shown: list[Record] = []

    def add(self, i: int, status: Status, rec: Record | None) -> None:
        self.at.append(i)
        self.status.append(status)
        if rec is not None:
            self.shown_at.append(i)
            self.shown.append(rec)

    def done(self) -> ResultArray:
        out = self.out
        out["status"][self.at] = self.status
        at, recs = self.shown_at, self.shown
        if at:
            for field in RECORD_FIELDS:
                out[field][at] = [int(getattr(r, field)) for r in recs]
        return out
