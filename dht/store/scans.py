"""Whole-table scans of the flow store: export, hand-off drop, purge (the partition
digests are kept up to date instead: dht.store.digests).

``export_entries`` scans both tables in chunks (~50 ms at 1M records) and sees only
copies not yet expired, so replicas that purge at different moments agree.
``purge_expired`` walks a bounded number of rows per call from
a cursor that rotates over both tables, so no call walks the whole table.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dht.core import wire
from dht.core.wire import EntryArray
from dht.store.table import BoolArray, FamilyTable, I64Array

Tables = tuple[FamilyTable, FamilyTable]

_SCAN_CHUNK = 1 << 16  # rows per step of the whole-table scans (digests, export)


def export_entries(
    tables: Tables,
    partitions: npt.NDArray[np.integer] | None,
    num_partitions: int,
    now_ms: int,
) -> EntryArray:
    """See :meth:`dht.store.flows.FlowStore.export_entries`."""
    wanted: BoolArray | None = None
    if partitions is not None:
        picked = np.asarray(partitions, dtype=np.int64).reshape(-1)
        if picked.size and (picked.min() < 0 or picked.max() >= num_partitions):
            raise ValueError(f"partitions must be in [0, {num_partitions})")
        wanted = np.zeros(num_partitions, dtype=np.bool_)
        wanted[picked] = True
    parts = np.uint64(num_partitions)
    chosen: list[list[I64Array]] = []
    for t in tables:
        chunks = []
        for start in range(0, t.high, _SCAN_CHUNK):
            rows = t.unexpired(start, min(t.high, start + _SCAN_CHUNK), now_ms)
            if wanted is not None and rows.size:
                rows = rows[wanted[(t.entries["hash"][rows] % parts).astype(np.intp)]]
            if rows.size:
                chunks.append(rows)
        chosen.append(chunks)
    total = sum(len(rows) for chunks in chosen for rows in chunks)
    out = np.zeros(total, dtype=wire.ENTRY_DTYPE)
    # Filled as bytes: numpy turns the big-endian fields of KEY_DTYPE and RESULT_DTYPE
    # native-endian when it concatenates or copies structured arrays field by field.
    raw = out.view(np.uint8).reshape(total, wire.ENTRY_SIZE)
    at = 0
    for t, chunks in zip(tables, chosen, strict=True):
        for rows in chunks:
            end = at + len(rows)
            raw[at:end, : wire.KEY_SIZE] = t.canonical(t.key_bytes(t.entries["key"][rows]))
            raw[at:end, wire.KEY_SIZE :] = (
                t.results(rows).view(np.uint8).reshape(-1, wire.RESULT_SIZE)
            )
            at = end
    return out


def drop_partitions(tables: Tables, keep: BoolArray) -> int:
    """See :meth:`dht.store.flows.FlowStore.drop_partitions`."""
    removed = 0
    p = np.uint64(len(keep))
    for table in tables:
        live = table.entries[: table.high]
        rows = np.flatnonzero((live["state"] != 0) & ~keep[(live["hash"] % p).astype(np.intp)])
        if rows.size:
            table.remove(rows.astype(np.int64))
            removed += int(rows.size)
    return removed


def purge_expired(tables: Tables, current: int, dead_before: int, budget: int) -> tuple[int, int]:
    """Remove records with ``expiry_ms <= dead_before``, scanning at most ``budget`` rows
    from each table's ``cursor``, starting in ``tables[current]`` and moving to the other
    table when one is done. Returns (records removed, the table to go on from)."""
    removed = 0
    left = min(budget, sum(t.high for t in tables))
    while left > 0:
        t = tables[current]
        stop = min(t.high, t.cursor + left)
        removed += t.purge(t.cursor, stop, dead_before)
        left -= stop - t.cursor
        t.cursor = stop
        if t.cursor >= t.high:
            t.cursor = 0
            current = 1 - current
    return removed, current
