"""The column table of one address family: the flow store's memory layout.

Why this layout: a Python object per record costs 120-200 bytes (docs/benchmarks.md#baselines), so
there is none. Each address family has one table in the style of CPython's compact dict:

* ``entries``: one packed numpy structured array, one 48-byte (IPv4) or 72-byte (IPv6) row
  per record: the key's hash, the record fields and the key itself, compacted to 13 bytes
  (proto, client v4, cport, service v4, sport) or 37 bytes (the same with v6 addresses).
  One row per record rather than a column per field, because a lookup at 1M records is
  bound by random memory accesses: a row is one or two cache lines, columns would be nine.
  Grown by 1.5x into zero-filled anonymous mmaps: untouched tail pages cost no RSS, and
  the array grown out of goes straight back to the OS (see ``_zeros``).
  ``state == 0`` marks a free row; free rows are reused through a numpy free stack.
* ``index``: an open-addressing ``int32`` array (power-of-two size, linear probing, -1
  empty, -2 deleted) pointing into ``entries``. Rebuilt, vectorised, when used plus deleted
  slots pass 0.7 of its size; sized to at most half full after a rebuild. At 1M records
  that is 2^21 slots, 8 bytes per record.

So a record costs ~56 bytes (IPv4) or ~80 bytes (IPv6) plus slack; measured RSS growth at
1M records: 59 and 84 bytes (scripts/measure_memory.py; Redis with TTL: 145 and 177).

Lookups are vectorised: :meth:`FamilyTable.find` probes all keys of a batch in lock-step
(~0.25 ms per 1000 keys at 1M records). The table keeps its bookkeeping (state counts,
embryonic count per client prefix) exact on every change; what a change is, it does not
decide (dht.store.flows does, through dht.core.record).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from dht.core import wire
from dht.core.record import Record, State, Status
from dht.core.wire import KeyArray, ResultArray, U64Array

I64Array = npt.NDArray[np.int64]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
Columns = dict[str, npt.NDArray[Any]]

EMPTY = -1
_DELETED = -2
_MAX_LOAD = 0.7
_MIN_INDEX = 1024
_MIN_ENTRIES = 1024
_MMAP_MIN_BYTES = 1 << 20
# Change batches kept for the digests before they count as "everything changed".
_MAX_CHANGES = 4096
_REBUILD_CHUNK = 1 << 14
STATES = (State.NONE, State.EMBRYONIC, State.ESTABLISHED, State.RELEASED)

# Positions of the compact key's bytes inside the 40-byte canonical key (wire.KEY_DTYPE):
# proto, client address, client port, service address, service port. IPv4 keeps only the
# last 4 bytes of each IPv4-mapped address; the ::ffff: prefix is put back on export.
_V4_COLUMNS = np.array([1, 14, 15, 16, 17, 18, 19, 32, 33, 34, 35, 36, 37], dtype=np.intp)
_V6_COLUMNS = np.arange(1, 38, dtype=np.intp)
# The client address's bytes 0-7 and 8-11 as integers: an IPv4-mapped one reads 0 and
# 00 00 ff ff. Same test as wire.is_mapped_v4, at a fraction of its cost per batch.
_MAPPED_VIEW = np.dtype(
    {"names": ["head", "tail"], "formats": ["<u8", "<u4"], "offsets": [2, 10], "itemsize": 40}
)
_MAPPED_TAIL = 0xFFFF0000
MAPPED_KEY_PREFIX = bytes(10) + b"\xff\xff"  # bytes 2-13 of a key with an IPv4 client
# Probe widths of successive lookup rounds: most keys sit in their home slot; the few
# that do not would otherwise cost one numpy round per further slot.
_PROBE_WIDTHS = (1, 4, 16)

RECORD_FIELDS = (
    "owner_pop",
    "owner_server",
    "state",
    "birth_hlc",
    "birth_pop",
    "generation",
    "expiry_ms",
)

# The record fields in the store's native types (the same in both tables): copies that
# arrive as wire.RESULT_DTYPE rows (big-endian) are converted to these before merging.
FIELD_TYPES: dict[str, type[np.generic]] = {
    "owner_pop": np.uint16,
    "owner_server": np.uint16,
    "state": np.uint8,
    "birth_hlc": np.uint64,
    "birth_pop": np.uint16,
    "generation": np.uint32,
    "expiry_ms": np.int64,
}


def _zeros(n: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``np.zeros``, but a large array gets its own anonymous mmap, so its pages go back
    to the OS the moment it is dropped. From the heap they would not: after the first big
    free, glibc raises its mmap threshold (up to 32 MiB) and the arrays a table grows out
    of stay in the heap as RSS (measured: 121 instead of 60 bytes per record at 1M)."""
    nbytes = n * dtype.itemsize
    if nbytes < _MMAP_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.zeros(n, dtype=dtype)
    # Private, not Python's default MAP_SHARED: a forked child must not write our table.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dtype)


class FamilyTable:
    """One address family: the entry rows, the index over them, and the bookkeeping
    (state counts, embryonic count per client prefix) kept exact on every change."""

    def __init__(self, family: str, columns: npt.NDArray[np.intp], addr_len: int, bits: int):
        self.family = family
        self.columns = columns
        self.width = len(columns)
        self.addr_len = addr_len
        self.prefix = wire.mask_bits(bits, addr_len)
        self.dtype: np.dtype[np.void] = np.dtype(
            [
                ("hash", "<u8"),
                ("birth_hlc", "<u8"),
                ("expiry_ms", "<i8"),
                ("generation", "<u4"),
                ("owner_pop", "<u2"),
                ("owner_server", "<u2"),
                ("birth_pop", "<u2"),
                ("state", "u1"),
                ("key", f"V{self.width}"),
            ]
        )
        # Gathering rows through an unstructured void view is ~10x faster than through
        # the structured dtype (numpy copies those field by field).
        self.row_void = np.dtype((np.void, self.dtype.itemsize))
        # Keys are compared as one opaque value each: ~4x faster than byte by byte.
        self.key_void = np.dtype((np.void, self.width))
        self.entries: npt.NDArray[np.void] = np.zeros(_MIN_ENTRIES, dtype=self.dtype)
        self.high = 0  # rows [0, high) have been handed out at least once
        self.used = 0  # rows holding a record (live, tombstone or expired)
        self.free = np.zeros(_MIN_ENTRIES, dtype=np.int32)
        self.nfree = 0
        self.index = np.full(_MIN_INDEX, EMPTY, dtype=np.int32)
        self.filled = 0  # index slots not EMPTY (entries + DELETED markers)
        self.cursor = 0  # purge position in [0, high)
        self.state_counts = [0, 0, 0, 0]
        self.embryos: dict[bytes, int] = {}
        # What changed since the digests were last brought up to date
        # (dht.store.digests): rows written (their hash read then) and the hashes of
        # rows released (a released row may hold another key by then).
        # Past _MAX_CHANGES batches (digests not asked for a while) only that something
        # changed everywhere is kept.
        self.written: list[I64Array] = []
        self.released: list[U64Array] = []
        self.changed_all = False

    # ------------------------------------------------------------------ keys

    def compact(self, raw: U8Array) -> U8Array:
        """(n, 40) canonical key bytes -> (n, width) compact keys (contiguous)."""
        return np.ascontiguousarray(raw[:, self.columns])

    def key_values(self, compact: U8Array) -> npt.NDArray[np.void]:
        """(n, width) compact keys as n opaque values, the type of the ``key`` field."""
        return compact.view(self.key_void).reshape(-1)

    def key_bytes(self, values: npt.NDArray[np.void]) -> U8Array:
        return np.ascontiguousarray(values).view(np.uint8).reshape(-1, self.width)

    def canonical(self, compact: U8Array) -> U8Array:
        """Compact keys back to (n, 40) canonical key bytes."""
        raw = np.zeros((len(compact), wire.KEY_SIZE), dtype=np.uint8)
        raw[:, 0] = wire.KIND_FLOW
        raw[:, self.columns] = compact
        if self.family == "ipv4":
            raw[:, 12:14] = 0xFF  # the ::ffff: of the client's IPv4-mapped address
            raw[:, 30:32] = 0xFF  # and of the service's
        return raw

    def prefixes(self, compact: U8Array) -> U8Array:
        """Client addresses masked to the quota prefix, one row per key."""
        return compact[:, 1 : 1 + self.addr_len] & self.prefix

    # ------------------------------------------------------------------ index

    def find(self, hashes: U64Array, compact: U8Array) -> I64Array:
        """Row of each key, -1 when absent. All keys probe in lock-step: each round reads
        a window of slots per still-unresolved key (up to the first EMPTY), compares the
        hashes of the rows found there, then the key bytes of the rows whose hash matches."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        mask = len(self.index) - 1
        pos = (hashes & np.uint64(mask)).astype(np.int64)
        todo = np.arange(len(hashes))
        hash_col, key_col = self.entries["hash"], self.entries["key"]
        wanted = self.key_values(compact)
        round_ = 0
        while todo.size:
            width = _PROBE_WIDTHS[min(round_, len(_PROBE_WIDTHS) - 1)]
            rows = self.index[(pos[todo, None] + np.arange(width)) & mask]
            # The slots before the first EMPTY (cumsum is the costly part, so not for 1).
            open_ = rows != EMPTY if width == 1 else np.cumsum(rows == EMPTY, axis=1) == 0
            at, col = np.nonzero(open_ & (rows >= 0))
            ti, tr = todo[at], rows[at, col].astype(np.int64)
            same = hash_col[tr] == hashes[ti]
            ti, tr = ti[same], tr[same]
            same = key_col[tr] == wanted[ti]
            found[ti[same]] = tr[same]
            todo = todo[open_[:, -1] & (found[todo] < 0)]
            pos[todo] += width
            round_ += 1
        return found

    def find_one(self, key_hash: int, compact: bytes) -> int:
        """:meth:`find` of one key (``compact``: its compact bytes), probing the index in
        pure Python: a vectorised probe costs tens of numpy calls whatever the batch size.
        The row, or -1."""
        index = self.index
        mask = len(index) - 1
        pos = key_hash & mask
        hash_col, key_col = self.entries["hash"], self.entries["key"]
        for _ in range(len(index)):  # bounded: the index always has EMPTY slots
            row = int(index[pos])
            if row == EMPTY:
                return -1
            if row >= 0 and int(hash_col[row]) == key_hash and key_col[row].tobytes() == compact:
                return row
            pos = (pos + 1) & mask
        return -1

    def record_at(self, row: int) -> Record:
        _, birth, expiry, gen, owner, server, birth_pop, state, _ = self.entries[row].item()
        return Record(owner, server, STATES[state], birth, birth_pop, gen, expiry)

    def write_one(self, row: int, rec: Record) -> None:
        """:meth:`write` of one record; ``row`` is held (see :meth:`add_one`)."""
        self._changed(self.written, np.array([row], dtype=np.int64))
        e = self.entries
        h, _, _, _, _, _, _, _, key = e[row].item()
        e[row] = (
            h, rec.birth_hlc, rec.expiry_ms, rec.generation, rec.owner_pop,
            rec.owner_server, rec.birth_pop, int(rec.state), key,
        )  # fmt: skip

    def add_one(self, key_hash: int, compact: bytes, rec: Record) -> int:
        """A new row for one key not held (its bookkeeping is the caller's)."""
        self.reserve(1)
        row = self.alloc()
        self.entries[row] = (
            key_hash, rec.birth_hlc, rec.expiry_ms, rec.generation, rec.owner_pop,
            rec.owner_server, rec.birth_pop, int(rec.state), compact,
        )  # fmt: skip
        self._changed(self.written, np.array([row], dtype=np.int64))
        self.index_add(np.array([row], dtype=np.int64), np.array([key_hash], dtype=np.uint64))
        return row

    def prefix_one(self, compact: bytes) -> bytes:
        """:meth:`prefixes` of one compact key."""
        addr = compact[1 : 1 + self.addr_len]
        return bytes(a & m for a, m in zip(addr, self.prefix.tobytes(), strict=True))

    def gather(self, rows: I64Array) -> npt.NDArray[np.void]:
        return self.entries.view(self.row_void)[rows].view(self.dtype)

    def _slots_of(self, rows: I64Array, hashes: U64Array) -> I64Array:
        """Index slot holding each of ``rows`` (all present)."""
        mask = len(self.index) - 1
        pos = (hashes & np.uint64(mask)).astype(np.int64)
        slots = np.empty(len(rows), dtype=np.int64)
        todo = np.arange(len(rows))
        while todo.size:
            here = self.index[pos[todo]] == rows[todo]
            slots[todo[here]] = pos[todo[here]]
            todo = todo[~here]
            pos[todo] = (pos[todo] + 1) & mask
        return slots

    @staticmethod
    def _insert(index: npt.NDArray[np.int32], rows: I64Array, hashes: U64Array) -> int:
        """Put new (absent) keys' rows into ``index``; returns how many EMPTY slots it
        used. Keys racing for one free slot all write it; numpy keeps one of the writes,
        reading back tells who won, and the others probe on."""
        mask = len(index) - 1
        pos = (hashes & np.uint64(mask)).astype(np.int64)
        todo = np.arange(len(rows))
        taken_empty = 0
        while todo.size:
            slot = pos[todo]
            before = index[slot]
            free = before < 0
            placed = np.zeros(len(todo), dtype=np.bool_)
            if free.any():
                fi, fs = todo[free], slot[free]
                index[fs] = rows[fi]
                won = index[fs] == rows[fi]
                taken_empty += int(np.count_nonzero(before[free][won] == EMPTY))
                placed[free] = won
            todo = todo[~placed]
            pos[todo] = (pos[todo] + 1) & mask
        return taken_empty

    def index_add(self, rows: I64Array, hashes: U64Array) -> None:
        if self.filled + len(rows) > _MAX_LOAD * len(self.index):
            self._rebuild()  # the new rows are already marked used, so it picks them up
        else:
            self.filled += self._insert(self.index, rows, hashes)

    def _rebuild(self) -> None:
        """Rehash every used row into a fresh index at most half full; drops the DELETED
        markers left by purges. Works in chunks so the temporaries stay small: glibc keeps
        big freed temporaries in the heap as RSS (measured: +16 bytes per record at 1M)."""
        size = _MIN_INDEX
        while size < 2 * self.used:
            size *= 2
        index = _zeros(size, np.dtype(np.int32))
        index.fill(EMPTY)
        self.filled = 0
        for start in range(0, self.high, _REBUILD_CHUNK):
            part = self.entries[start : start + _REBUILD_CHUNK]
            rows = np.flatnonzero(part["state"] != 0)
            self.filled += self._insert(index, rows + start, part["hash"][rows])
        self.index = index

    # ------------------------------------------------------------------ rows

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more records without reallocating inside a batch."""
        need = self.high + max(0, n - self.nfree)
        if need > len(self.entries):
            grown = _zeros(max(need, len(self.entries) * 3 // 2), self.dtype)
            grown[: self.high] = self.entries[: self.high]
            self.entries = grown

    def alloc(self) -> int:
        self.used += 1
        if self.nfree:
            self.nfree -= 1
            return int(self.free[self.nfree])
        self.high += 1
        return self.high - 1

    def alloc_many(self, n: int) -> I64Array:
        """Rows for ``n`` new records (``reserve(n)`` first), freed rows first."""
        take = min(n, self.nfree)
        rows = np.empty(n, dtype=np.int64)
        rows[:take] = self.free[self.nfree - take : self.nfree][::-1]
        self.nfree -= take
        rows[take:] = np.arange(self.high, self.high + n - take)
        self.high += n - take
        self.used += n
        return rows

    def release_rows(self, rows: I64Array) -> None:
        """Forget the records in ``rows`` (their bookkeeping is already updated)."""
        self._changed(self.released, self.entries["hash"][rows])
        self.index[self._slots_of(rows, self.entries["hash"][rows])] = _DELETED
        self.entries["state"][rows] = 0
        end = self.nfree + len(rows)
        if end > len(self.free):
            grown = _zeros(max(end, 2 * len(self.free)), np.dtype(np.int32))
            grown[: self.nfree] = self.free[: self.nfree]
            self.free = grown
        self.free[self.nfree : end] = rows
        self.nfree = end
        self.used -= len(rows)

    def records(self, rows: I64Array) -> list[Record]:
        got = self.gather(rows)
        cols = [got[f].tolist() for f in RECORD_FIELDS]
        return [
            Record(op, os, STATES[st], bh, bp, g, ex)
            for op, os, st, bh, bp, g, ex in zip(*cols, strict=True)
        ]

    def _changed(self, log: list[Any], values: npt.NDArray[Any]) -> None:
        if self.changed_all:
            return
        log.append(values)
        if len(self.written) + len(self.released) > _MAX_CHANGES:
            self.changed_all = True
            self.written, self.released = [], []

    def take_changes(self) -> tuple[bool, U64Array]:
        """(everything changed?, hashes of the copies changed) since the last call."""
        if self.changed_all:
            self.changed_all = False
            return True, np.zeros(0, dtype=np.uint64)
        hashes = [self.entries["hash"][rows] for rows in self.written] + self.released
        self.written, self.released = [], []
        return False, np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)

    def write(self, rows: I64Array, recs: list[Record]) -> None:
        self._changed(self.written, rows)
        e = self.entries
        e["owner_pop"][rows] = [r.owner_pop for r in recs]
        e["owner_server"][rows] = [r.owner_server for r in recs]
        e["state"][rows] = [int(r.state) for r in recs]
        e["birth_hlc"][rows] = [r.birth_hlc for r in recs]
        e["birth_pop"][rows] = [r.birth_pop for r in recs]
        e["generation"][rows] = [r.generation for r in recs]
        e["expiry_ms"][rows] = [r.expiry_ms for r in recs]

    def fields(self, rows: I64Array) -> Columns:
        """The record fields of ``rows`` as native columns."""
        got = self.gather(rows)
        return {f: got[f] for f in RECORD_FIELDS}

    def write_columns(self, rows: I64Array, cols: Columns) -> None:
        self._changed(self.written, rows)
        e = self.entries
        for f in RECORD_FIELDS:
            e[f][rows] = cols[f]

    def results(self, rows: I64Array) -> ResultArray:
        """``rows`` as wire.RESULT_DTYPE rows, status OK (the partition column left 0)."""
        got = self.gather(rows)
        out = wire.new_results(len(rows))
        out["status"] = Status.OK
        for f in RECORD_FIELDS:
            out[f] = got[f]
        return out

    def unexpired(self, start: int, stop: int, now_ms: int) -> I64Array:
        """Rows in [start, stop) holding a copy with ``expiry_ms > now_ms``."""
        part = self.entries[start:stop]
        return np.flatnonzero((part["state"] != 0) & (part["expiry_ms"] > now_ms)) + start

    def recount(self, old: U8Array, new: U8Array, prefixes: U8Array) -> None:
        """The bookkeeping of many records changing state ``old`` -> ``new`` at once
        (State.NONE: no record); ``prefixes`` are their clients' quota prefixes."""
        delta = np.bincount(new, minlength=4) - np.bincount(old, minlength=4)
        for s in STATES[1:]:
            self.state_counts[s] += int(delta[s])
        for sign, moved in (
            (-1, (old == State.EMBRYONIC) & (new != State.EMBRYONIC)),
            (1, (new == State.EMBRYONIC) & (old != State.EMBRYONIC)),
        ):
            if not moved.any():
                continue
            grouped = np.ascontiguousarray(prefixes[moved]).view((np.void, self.addr_len))
            keys, counts = np.unique(grouped.reshape(-1), return_counts=True)
            for key, n in zip(keys, counts.tolist(), strict=True):
                k = key.tobytes()
                left = self.embryos.get(k, 0) + sign * n
                if left:
                    self.embryos[k] = left
                else:
                    del self.embryos[k]

    def count_state(self, old: State, new: State, prefix: Callable[[], bytes]) -> None:
        """Keep the state counts and the embryonic count per prefix exact."""
        if old == new:
            return
        if old != State.NONE:
            self.state_counts[old] -= 1
        self.state_counts[new] += 1
        if old == State.EMBRYONIC:
            self._uncount_embryo(prefix())
        elif new == State.EMBRYONIC:
            key = prefix()
            self.embryos[key] = self.embryos.get(key, 0) + 1

    def _uncount_embryo(self, key: bytes) -> None:
        left = self.embryos[key] - 1
        if left:
            self.embryos[key] = left
        else:
            del self.embryos[key]

    def remove(self, rows: I64Array) -> None:
        """Forget the records in ``rows`` (distinct, all held), bookkeeping included."""
        states = self.entries["state"][rows]
        prefixes = self.prefixes(self.key_bytes(self.entries["key"][rows]))
        self.recount(states, np.zeros_like(states), prefixes)
        self.release_rows(rows)

    def purge(self, start: int, stop: int, dead_before: int) -> int:
        """Remove the records in [start, stop) with ``expiry_ms <= dead_before``."""
        part = self.entries[start:stop]
        rows = np.flatnonzero((part["state"] != 0) & (part["expiry_ms"] <= dead_before)) + start
        if not rows.size:
            return 0
        self.remove(rows)
        return len(rows)


def family_tables(prefix_v4: int, prefix_v6: int) -> tuple[FamilyTable, FamilyTable]:
    """The IPv4 and the IPv6 table, with their clients' quota prefix lengths (bits)."""
    return (
        FamilyTable("ipv4", _V4_COLUMNS, 4, prefix_v4),
        FamilyTable("ipv6", _V6_COLUMNS, 16, prefix_v6),
    )


def split(
    tables: tuple[FamilyTable, FamilyTable], keys: KeyArray, hashes: U64Array
) -> Iterator[tuple[FamilyTable, npt.NDArray[np.intp], U8Array, U64Array]]:
    """Per family (``tables`` as :func:`family_tables` made them): the batch positions,
    compact keys and hashes of its keys."""
    keys = np.ascontiguousarray(keys)
    raw = keys.view(np.uint8).reshape(-1, wire.KEY_SIZE)
    parts = keys.view(_MAPPED_VIEW)
    v4 = (parts["head"] == 0) & (parts["tail"] == _MAPPED_TAIL)
    n4 = int(np.count_nonzero(v4))
    for table, sel in zip(tables, (v4, ~v4), strict=True):
        n = n4 if table is tables[0] else len(keys) - n4
        if not n:
            continue
        if n == len(keys):  # a batch of one family: no copies
            yield table, np.arange(n), table.compact(raw), hashes
        else:
            at = np.flatnonzero(sel)
            yield table, at, table.compact(raw[at]), hashes[at]


def locate(tables: tuple[FamilyTable, FamilyTable], key: bytes) -> tuple[FamilyTable, bytes]:
    """The family table of one canonical 40-byte key and its compact bytes (what
    :func:`split` does for a batch)."""
    if key[2:14] == MAPPED_KEY_PREFIX:
        return tables[0], key[1:2] + key[14:20] + key[32:38]
    return tables[1], key[1:38]
