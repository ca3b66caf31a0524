"""The in-memory flow record store of one node (DESIGN sections 4 and 5).

Layout, capacity and quota only: every decision about a record is made by the pure
functions of :mod:`dht.core.record` (``decide_*`` and ``merge``), so the store cannot disagree
with the rules it is tested against.

Why this layout: a Python object per record costs 120-200 bytes (BASELINES.md), so there
is none. Each address family has one table in the style of CPython's compact dict:

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

Lookups are vectorised (probe all keys of a batch in lock-step; ~0.25 ms per 1000 keys at
1M records). Mutations loop per key in Python, in call order, but read the batch's
existing rows in one vectorised gather and write them back in one vectorised scatter at
the end; inside the loop a batch-local dict of pending records makes duplicate keys in
one batch behave as if applied one after the other.

Replication (copies from replicas, hints, anti-entropy, refill) goes through
``merge_in``/``merge_entries``, vectorised: the merge rule runs on columns for the first
copy of each key in a batch (~0.4 ms per 1000 copies at 1M records); only the later
copies of a key repeated in the batch are merged one by one. A copy is *dead* once
expired for ``tombstone_extra_ms`` (the maximum clock offset): merge_in skips dead copies
and replaces, rather than merges with, a dead stored one; purge removes only dead ones.
``partition_digests`` and ``export_entries`` scan both tables in chunks (~35 ms and
~50 ms at 1M records) and see only copies not yet expired, so replicas that purge at
different moments agree.

Not thread-safe: one store per node, used from its event loop. No call blocks on I/O.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from dht.core import digest, wire
from dht.core.config import StoreLimits
from dht.core.record import (
    Acting,
    Decision,
    HybridClock,
    Record,
    State,
    Status,
    TtlPolicy,
    decide_claim,
    decide_confirm,
    decide_refresh,
    decide_release,
    merge,
)
from dht.core.wire import EntryArray, KeyArray, ResultArray, U64Array

I64Array = npt.NDArray[np.int64]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]
Columns = dict[str, npt.NDArray[Any]]

_EMPTY = -1
_DELETED = -2
_MAX_LOAD = 0.7
_MIN_INDEX = 1024
_MIN_ENTRIES = 1024
_MMAP_MIN_BYTES = 1 << 20
_REBUILD_CHUNK = 1 << 14
_SCAN_CHUNK = 1 << 16  # rows per step of the whole-table scans (digests, export)
_STATES = (State.NONE, State.EMBRYONIC, State.ESTABLISHED, State.RELEASED)

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
_MAPPED_KEY_PREFIX = bytes(10) + b"\xff\xff"  # bytes 2-13 of a key with an IPv4 client
# Probe widths of successive lookup rounds: most keys sit in their home slot; the few
# that do not would otherwise cost one numpy round per further slot.
_PROBE_WIDTHS = (1, 4, 16)

_RECORD_FIELDS = (
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
_FIELD_TYPES: dict[str, type[np.generic]] = {
    "owner_pop": np.uint16,
    "owner_server": np.uint16,
    "state": np.uint8,
    "birth_hlc": np.uint64,
    "birth_pop": np.uint16,
    "generation": np.uint32,
    "expiry_ms": np.int64,
}

Op = Literal["claim", "confirm", "refresh", "release"]


@dataclass(frozen=True, slots=True)
class MergeStats:
    """What one :meth:`FlowStore.merge_in` did. ``applied``: copies that changed the store
    (created a record or changed a stored one); ``refused``: copies of keys the store did
    not hold, refused at the hard ceiling. Dead copies and copies that changed nothing
    count in neither."""

    applied: int = 0
    refused: int = 0


def _merge_columns(a: Columns, b: Columns) -> Columns:
    """:func:`dht.core.record.merge` of ``a[i]`` and ``b[i]`` for every i, on columns of the
    record fields (native types). Must stay the same rule as ``merge``: the store tests
    check it against ``merge`` on random copies."""
    ga, gb = a["generation"], b["generation"]
    ha, hb, pa, pb = a["birth_hlc"], b["birth_hlc"], a["birth_pop"], b["birth_pop"]
    a_earlier = (ha < hb) | ((ha == hb) & (pa < pb))
    same_birth = (ha == hb) & (pa == pb)
    same_gen = ga == gb
    a_wins = (ga > gb) | (same_gen & a_earlier)
    out = {f: np.where(a_wins, a[f], b[f]) for f in _RECORD_FIELDS}
    claim = same_gen & same_birth  # two copies of one claim: combine them
    if claim.any():
        oa, ob, sa, sb = a["owner_pop"], b["owner_pop"], a["owner_server"], b["owner_server"]
        a_owner = (oa < ob) | ((oa == ob) & (sa <= sb))
        out["owner_pop"] = np.where(claim & a_owner, oa, out["owner_pop"])
        out["owner_server"] = np.where(claim & a_owner, sa, out["owner_server"])
        out["state"] = np.where(claim, np.maximum(a["state"], b["state"]), out["state"])
        out["expiry_ms"] = np.where(
            claim, np.maximum(a["expiry_ms"], b["expiry_ms"]), out["expiry_ms"]
        )
    return out


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


class _Table:
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
        self.index = np.full(_MIN_INDEX, _EMPTY, dtype=np.int32)
        self.filled = 0  # index slots not EMPTY (entries + DELETED markers)
        self.cursor = 0  # purge position in [0, high)
        self.state_counts = [0, 0, 0, 0]
        self.embryos: dict[bytes, int] = {}

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
            open_ = rows != _EMPTY if width == 1 else np.cumsum(rows == _EMPTY, axis=1) == 0
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
                taken_empty += int(np.count_nonzero(before[free][won] == _EMPTY))
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
        index.fill(_EMPTY)
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
        cols = [got[f].tolist() for f in _RECORD_FIELDS]
        return [
            Record(op, os, _STATES[st], bh, bp, g, ex)
            for op, os, st, bh, bp, g, ex in zip(*cols, strict=True)
        ]

    def write(self, rows: I64Array, recs: list[Record]) -> None:
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
        return {f: got[f] for f in _RECORD_FIELDS}

    def write_columns(self, rows: I64Array, cols: Columns) -> None:
        e = self.entries
        for f in _RECORD_FIELDS:
            e[f][rows] = cols[f]

    def results(self, rows: I64Array) -> ResultArray:
        """``rows`` as wire.RESULT_DTYPE rows, status OK (the partition column left 0)."""
        got = self.gather(rows)
        out = wire.new_results(len(rows))
        out["status"] = Status.OK
        for f in _RECORD_FIELDS:
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
        for s in _STATES[1:]:
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

    def purge(self, start: int, stop: int, dead_before: int) -> int:
        """Remove the records in [start, stop) with ``expiry_ms <= dead_before``."""
        part = self.entries[start:stop]
        rows = np.flatnonzero((part["state"] != 0) & (part["expiry_ms"] <= dead_before)) + start
        if not rows.size:
            return 0
        states = self.entries["state"][rows]
        prefixes = self.prefixes(self.key_bytes(self.entries["key"][rows]))
        self.recount(states, np.zeros_like(states), prefixes)
        self.release_rows(rows)
        return len(rows)


class _Batch:
    """One family's share of one mutating call: existing rows read up front, new and
    changed records held here (so later duplicates of a key see them), written at end."""

    def __init__(self, table: _Table, compact: U8Array, hashes: U64Array) -> None:
        self.table = table
        self.hashes = hashes
        self.compact = compact
        self.protocols: list[int] = compact[:, 0].tolist()
        rows = table.find(hashes, self.compact)
        present = rows >= 0
        self.stored: list[Record | None] = [None] * len(rows)
        for j, rec in zip(
            np.flatnonzero(present).tolist(), table.records(rows[present]), strict=True
        ):
            self.stored[j] = rec
        self.rows: list[int] = rows.tolist()
        self.prefixes = table.prefixes(self.compact)
        # Only a batch with a repeated hash can create a key and then meet it again.
        self.fresh: dict[bytes, int] | None = {} if len(np.unique(hashes)) < len(hashes) else None
        self.new_rows: list[int] = []
        self.new_at: list[int] = []
        self.pending: dict[int, Record] = {}
        table.reserve(len(rows))

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


class _Answers:
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
            for field in _RECORD_FIELDS:
                out[field][at] = [int(getattr(r, field)) for r in recs]
        return out


class FlowStore:
    """All flow records of one node. Every op takes ``keys`` (validated ``wire.KEY_DTYPE``
    rows) and their ``hashes`` (``wire.key_hashes``) and answers one ``wire.RESULT_DTYPE``
    row per key, in order (the ``partition`` column is left to the node)."""

    def __init__(self, policy: TtlPolicy, limits: StoreLimits, clock: HybridClock) -> None:
        self._policy = policy
        self._limits = limits
        self._clock = clock
        self._tables = (
            _Table("ipv4", _V4_COLUMNS, 4, limits.prefix_v4),
            _Table("ipv6", _V6_COLUMNS, 16, limits.prefix_v6),
        )
        self._purge_table = 0
        self._hard_refused = False
        self.expirations = 0
        self.refusals: dict[str, int] = {"full": 0, "quota": 0, "hard": 0}

    def __len__(self) -> int:
        return self._tables[0].used + self._tables[1].used

    @property
    def over_hard_limit(self) -> bool:
        """A replicated record was refused and the store is still at its hard ceiling."""
        return self._hard_refused and len(self) >= self._limits.hard_max_records

    def counts(self) -> dict[tuple[str, str], int]:
        return {
            (t.family, s.name.lower()): t.state_counts[s] for t in self._tables for s in _STATES[1:]
        }

    def _split(
        self, keys: KeyArray, hashes: U64Array
    ) -> Iterator[tuple[_Table, npt.NDArray[np.intp], U8Array, U64Array]]:
        """Per family: the batch positions, compact keys and hashes of its keys."""
        keys = np.ascontiguousarray(keys)
        raw = keys.view(np.uint8).reshape(-1, wire.KEY_SIZE)
        parts = keys.view(_MAPPED_VIEW)
        v4 = (parts["head"] == 0) & (parts["tail"] == _MAPPED_TAIL)
        n4 = int(np.count_nonzero(v4))
        for table, sel in zip(self._tables, (v4, ~v4), strict=True):
            n = n4 if table is self._tables[0] else len(keys) - n4
            if not n:
                continue
            if n == len(keys):  # a batch of one family: no copies
                yield table, np.arange(n), table.compact(raw), hashes
            else:
                at = np.flatnonzero(sel)
                yield table, at, table.compact(raw[at]), hashes[at]

    # ------------------------------------------------------------------ reads

    def lookup(self, keys: KeyArray, hashes: U64Array, now_ms: int) -> ResultArray:
        """Vectorised ``decide_lookup``: OK with the record if live, else NOT_FOUND."""
        out = wire.new_results(len(keys))
        out["status"] = Status.NOT_FOUND
        for t, sel, compact, h in self._split(keys, hashes):
            rows = t.find(h, compact)
            hit = rows >= 0
            got = t.gather(rows[hit])
            live = (got["state"] != State.RELEASED) & (got["expiry_ms"] > now_ms)
            at, got = sel[hit][live], got[live]
            out["status"][at] = Status.OK
            for field in _RECORD_FIELDS:
                out[field][at] = got[field]
        return out

    def lookup_one(self, key: bytes, key_hash: int, now_ms: int, partition: int = 0) -> bytes:
        """:meth:`lookup` of one validated 40-byte key, as one packed result record, in
        pure Python: a vectorised lookup costs tens of numpy calls whatever the batch
        size, ~20x this for a single key (the UDP miss path, dht.edge.udp)."""
        if key[2:14] == _MAPPED_KEY_PREFIX:
            t = self._tables[0]
            compact = key[1:2] + key[14:20] + key[32:38]
        else:
            t = self._tables[1]
            compact = key[1:38]
        index = t.index
        mask = len(index) - 1
        pos = key_hash & mask
        entries = t.entries
        for _ in range(len(index)):  # bounded: the index always has EMPTY slots
            row = int(index[pos])
            if row == _EMPTY:
                break
            if row >= 0:
                h, birth, expiry, gen, owner, server, birth_pop, state, k = entries[row].item()
                if h == key_hash and k == compact:
                    if state == State.RELEASED or expiry <= now_ms:
                        break
                    return wire.RESULT_STRUCT.pack(
                        Status.OK, state, owner, server, birth_pop, gen, partition, 0, birth,
                        expiry,
                    )  # fmt: skip
            pos = (pos + 1) & mask
        return wire.RESULT_STRUCT.pack(Status.NOT_FOUND, 0, 0, 0, 0, 0, partition, 0, 0, 0)

    def get(self, key: bytes, now_ms: int | None = None) -> Record | None:
        """The stored copy of one 40-byte key, tombstones and expired copies included;
        with ``now_ms``, None once the copy has expired."""
        keys = wire.decode_keys(key, max_keys=1)
        for t, _, compact, h in self._split(keys, wire.key_hashes(key)):
            rows = t.find(h, compact)
            if rows[0] >= 0:
                rec = t.records(rows)[0]
                if now_ms is None or rec.expiry_ms > now_ms:
                    return rec
        return None

    def copies(self, keys: KeyArray, hashes: U64Array) -> ResultArray:
        """The stored copy of each key whatever its liveness (expired copies and tombstones
        included): OK with the record, or NOT_FOUND (no fields) when none is stored. For
        quorum reads and read repair, which merge the replicas' raw copies."""
        out = wire.new_results(len(keys))
        out["status"] = Status.NOT_FOUND
        for t, sel, compact, h in self._split(keys, hashes):
            rows = t.find(h, compact)
            hit = rows >= 0
            out[sel[hit]] = t.results(rows[hit])
        return out

    def partition_digests(
        self, num_partitions: int, now_ms: int
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        """Per partition (``hash % num_partitions``): the sum of
        :func:`dht.core.digest.record_fingerprints` over the stored copies with
        ``expiry_ms > now_ms`` (live records and unexpired tombstones), and their count.
        Expired copies are left out, so replicas that purge at different moments agree."""
        digests = np.zeros(num_partitions, dtype=np.uint64)
        counts = np.zeros(num_partitions, dtype=np.uint32)
        parts = np.uint64(num_partitions)
        for t in self._tables:
            for start in range(0, t.high, _SCAN_CHUNK):
                rows = t.unexpired(start, min(t.high, start + _SCAN_CHUNK), now_ms)
                if not rows.size:
                    continue
                h = t.entries["hash"][rows]
                fingerprints = digest.record_fingerprints(h, t.results(rows))
                d, c = digest.partition_sums(h % parts, fingerprints, num_partitions)
                digests += d  # wraps mod 2**64, like the sum itself
                counts += c
        return digests, counts

    def export_entries(
        self,
        partitions: npt.NDArray[np.integer] | None,
        num_partitions: int,
        now_ms: int,
    ) -> EntryArray:
        """The stored copies with ``expiry_ms > now_ms`` whose partition
        (``hash % num_partitions``) is in ``partitions`` (None: all), as wire.ENTRY_DTYPE
        rows: canonical 40-byte key + RESULT_DTYPE record with status OK."""
        wanted: BoolArray | None = None
        if partitions is not None:
            picked = np.asarray(partitions, dtype=np.int64).reshape(-1)
            if picked.size and (picked.min() < 0 or picked.max() >= num_partitions):
                raise ValueError(f"partitions must be in [0, {num_partitions})")
            wanted = np.zeros(num_partitions, dtype=np.bool_)
            wanted[picked] = True
        parts = np.uint64(num_partitions)
        chosen: list[list[I64Array]] = []
        for t in self._tables:
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
        for t, chunks in zip(self._tables, chosen, strict=True):
            for rows in chunks:
                end = at + len(rows)
                raw[at:end, : wire.KEY_SIZE] = t.canonical(t.key_bytes(t.entries["key"][rows]))
                raw[at:end, wire.KEY_SIZE :] = (
                    t.results(rows).view(np.uint8).reshape(-1, wire.RESULT_SIZE)
                )
                at = end
        return out

    # ------------------------------------------------------------------ writes

    def claim(
        self,
        keys: KeyArray,
        hashes: U64Array,
        *,
        pop: int,
        server: int,
        ttl_ms: int | None,
        now_ms: int,
    ) -> ResultArray:
        return self._mutate(
            "claim", keys, hashes, pop=pop, server=server, ttl_ms=ttl_ms, now_ms=now_ms
        )

    def confirm(
        self,
        keys: KeyArray,
        hashes: U64Array,
        *,
        pop: int,
        server: int,
        ttl_ms: int | None,
        now_ms: int,
    ) -> ResultArray:
        return self._mutate(
            "confirm", keys, hashes, pop=pop, server=server, ttl_ms=ttl_ms, now_ms=now_ms
        )

    def refresh(
        self, keys: KeyArray, hashes: U64Array, *, pop: int, ttl_ms: int | None, now_ms: int
    ) -> ResultArray:
        return self._mutate(
            "refresh", keys, hashes, pop=pop, server=0, ttl_ms=ttl_ms, now_ms=now_ms
        )

    def release(self, keys: KeyArray, hashes: U64Array, *, pop: int, now_ms: int) -> ResultArray:
        return self._mutate("release", keys, hashes, pop=pop, server=0, ttl_ms=None, now_ms=now_ms)

    def _mutate(
        self,
        op: Op,
        keys: KeyArray,
        hashes: U64Array,
        *,
        pop: int,
        server: int,
        ttl_ms: int | None,
        now_ms: int,
    ) -> ResultArray:
        answers = _Answers(len(keys))
        acting = {p: Acting(pop, server, p, now_ms, ttl_ms) for p in wire.PROTOCOL_NAMES}
        policy = self._policy
        batches, plan = self._plan(keys, hashes)
        for i, (batch, j) in enumerate(plan):
            row, old = batch.existing(j)
            act = acting[batch.protocols[j]]
            d: Decision
            if op in {"claim", "confirm"}:
                # A birth stamp only for a record this call may create (decide_claim and
                # decide_confirm create exactly when nothing live is stored).
                creating = old is None or not old.live(now_ms)
                birth = self._clock.now() if creating else 0
                decide = decide_claim if op == "claim" else decide_confirm
                d = decide(old, act, policy, birth)
            elif op == "refresh":
                d = decide_refresh(old, act, policy)
            else:
                d = decide_release(old, act, policy)
            refusal = self._refusal(op, d, batch=batch, j=j, row=row, old=old)
            if refusal is not None:
                answers.add(i, refusal, None)
                continue
            if d.store is not None:
                batch.put(j, row, old, d.store)
            answers.add(i, d.status, d.shown)
        for batch in batches:
            batch.flush()
        return answers.done()

    def _plan(
        self, keys: KeyArray, hashes: U64Array
    ) -> tuple[list[_Batch], list[tuple[_Batch, int]]]:
        """One _Batch per family, and for each key in call order its batch and position
        there: keys are applied in call order, so births, capacity and quota decisions
        come out as if the keys had been sent one by one."""
        batches = []
        slots: list[tuple[_Batch, int] | None] = [None] * len(keys)
        for t, sel, compact, h in self._split(keys, hashes):
            batch = _Batch(t, compact, h)
            batches.append(batch)
            for j, i in enumerate(sel.tolist()):
                slots[i] = (batch, j)
        return batches, [s for s in slots if s is not None]

    def _refusal(
        self, op: Op, d: Decision, *, batch: _Batch, j: int, row: int, old: Record | None
    ) -> Status | None:
        """Capacity and quota (DESIGN section 5): only a claim creating an embryonic
        record is refused by the soft limit and the quota; a confirm that needs a new row
        is refused only at the hard ceiling. Owners' refreshes are never refused."""
        if d.status != Status.CREATED:
            return None
        limits = self._limits
        if op == "claim":
            if len(self) >= limits.max_records:
                self.refusals["full"] += 1
                return Status.REFUSED_FULL
            # A re-claim over this key's own expired embryo does not add an embryo.
            mine = old is not None and old.state == State.EMBRYONIC
            if (
                batch.table.embryos.get(batch.prefix(j), 0) - mine
                >= limits.embryonic_quota_per_prefix
            ):
                self.refusals["quota"] += 1
                return Status.REFUSED_QUOTA
        elif row < 0 and len(self) >= limits.hard_max_records:
            self.refusals["hard"] += 1
            self._hard_refused = True
            return Status.REFUSED_FULL
        return None

    def drop_partitions(self, keep: npt.NDArray[np.bool_]) -> int:
        """Remove every record whose partition (``hash % len(keep)``) is not kept: the
        partitions this node no longer replicates, once they were handed off."""
        removed = 0
        p = np.uint64(len(keep))
        for table in self._tables:
            live = table.entries[: table.high]
            rows = np.flatnonzero((live["state"] != 0) & ~keep[(live["hash"] % p).astype(np.intp)])
            if rows.size:
                states = table.entries["state"][rows]
                prefixes = table.prefixes(table.key_bytes(table.entries["key"][rows]))
                table.recount(states, np.zeros_like(states), prefixes)
                table.release_rows(rows.astype(np.int64))
                removed += int(rows.size)
        return removed

    def restore(self, keys: KeyArray, hashes: U64Array, old: ResultArray) -> None:
        """Undo a write: put back exactly the copies ``old`` (as :meth:`copies` returned
        them before the write; NOT_FOUND = remove the record). Not a merge: only to take
        back a write that missed its quorum, where the copy is still the one written
        (checked by the caller in the same step)."""
        for table, at, compact, h in self._split(keys, hashes):
            batch = _Batch(table, compact, h)
            gone: list[int] = []
            for j, i in enumerate(at.tolist()):
                row, cur = batch.existing(j)
                if int(old["status"][i]) == Status.OK:
                    v = [int(old[f][i]) for f in _RECORD_FIELDS]
                    rec = Record(v[0], v[1], _STATES[v[2]], v[3], v[4], v[5], v[6])
                    if rec != cur:
                        batch.put(j, row, cur, rec)
                elif row >= 0 and cur is not None:
                    gone.append(row)
            batch.flush()
            if gone:
                rows = np.array(sorted(set(gone)), dtype=np.int64)
                states = table.entries["state"][rows]
                prefixes = table.prefixes(table.key_bytes(table.entries["key"][rows]))
                table.recount(states, np.zeros_like(states), prefixes)
                table.release_rows(rows)

    def merge_in(
        self, keys: KeyArray, hashes: U64Array, recs: ResultArray, now_ms: int
    ) -> MergeStats:
        """Apply record copies from replicas or other PoPs (``recs``: wire.RESULT_DTYPE
        rows, the status column ignored) with the rule of :func:`dht.core.record.merge`, in
        call order. Always applied up to ``hard_max_records``.

        Dead copies, ``expiry_ms <= now_ms - tombstone_extra_ms`` (expired for longer than
        the maximum clock offset, so no node can still treat them as live): an incoming one
        is skipped, a stored one counts as absent and the incoming copy replaces it rather
        than merging with it (else an expired copy of a higher generation would hide a
        newer live claim until purged).

        Vectorised: the first copy of each key is merged in one pass; only later copies of
        a key repeated in the batch are merged one by one."""
        dead_before = now_ms - self._policy.tombstone_extra_ms
        expiry = recs["expiry_ms"].astype(np.int64)
        keep = np.flatnonzero(expiry > dead_before)
        if len(keep) < len(keys):
            keys, hashes, recs = keys[keep], hashes[keep], recs[keep]
        cols: Columns = {f: recs[f].astype(_FIELD_TYPES[f]) for f in _RECORD_FIELDS}

        # Per family: the first copy of each key (positions into the batch), its row.
        plans = []
        for t, sel, compact, h in self._split(keys, hashes):
            first = np.arange(len(sel))
            later = first[:0]
            if len(np.unique(h)) < len(h):
                first = np.sort(np.unique(t.key_values(compact), return_index=True)[1])
                repeated = np.ones(len(sel), dtype=np.bool_)
                repeated[first] = False
                later = np.flatnonzero(repeated)
            rows = t.find(h[first], compact[first])
            plans.append((t, sel, compact, h, first, later, rows))

        # Capacity: new keys take rows in call order until the hard ceiling.
        new_at = np.sort(np.concatenate([p[1][p[4][p[6] < 0]] for p in plans] or [keep[:0]]))
        room = max(0, self._limits.hard_max_records - len(self))
        admitted = np.zeros(len(keys), dtype=np.bool_)
        admitted[new_at[:room]] = True

        applied = refused = 0
        for t, sel, compact, h, first, later, found in plans:
            rows = found.copy()
            at = sel[first]
            inc = {f: c[at] for f, c in cols.items()}
            present = rows >= 0
            # Keys held: merge, or replace a dead copy.
            if present.any():
                prows = rows[present]
                old = t.fields(prows)
                new = {f: c[present] for f, c in inc.items()}
                merged = _merge_columns(old, new)
                dead = old["expiry_ms"] <= dead_before
                if dead.any():
                    merged = {f: np.where(dead, new[f], merged[f]) for f in _RECORD_FIELDS}
                changed = np.zeros(len(prows), dtype=np.bool_)
                for f in _RECORD_FIELDS:
                    changed |= merged[f] != old[f]
                if changed.any():
                    t.write_columns(prows[changed], {f: c[changed] for f, c in merged.items()})
                    moved = first[present][changed]
                    t.recount(
                        old["state"][changed], merged["state"][changed], t.prefixes(compact[moved])
                    )
                    applied += int(np.count_nonzero(changed))
            # Keys not held: new rows up to the hard ceiling.
            absent = ~present
            take = absent & admitted[at]
            refused += int(np.count_nonzero(absent)) - int(np.count_nonzero(take))
            if take.any():
                n = int(np.count_nonzero(take))
                t.reserve(n)
                new_rows = t.alloc_many(n)
                fresh = first[take]
                t.write_columns(new_rows, {f: c[take] for f, c in inc.items()})
                t.entries["hash"][new_rows] = h[fresh]
                t.entries["key"][new_rows] = t.key_values(compact)[fresh]
                t.index_add(new_rows, h[fresh])
                t.recount(
                    np.zeros(n, dtype=np.uint8), inc["state"][take], t.prefixes(compact[fresh])
                )
                rows[take] = new_rows
                applied += n
            if later.size:
                a, r = self._merge_repeats(t, sel, compact, first, later, rows, cols)
                applied += a
                refused += r
        if refused:
            self.refusals["hard"] += refused
            self._hard_refused = True
        return MergeStats(applied=applied, refused=refused)

    @staticmethod
    def _merge_repeats(
        t: _Table,
        sel: npt.NDArray[np.intp],
        compact: U8Array,
        first: npt.NDArray[np.intp],
        later: npt.NDArray[np.intp],
        rows: I64Array,
        cols: Columns,
    ) -> tuple[int, int]:
        """merge_in's second pass: the second and later copies of keys repeated in the
        batch, one by one in call order, after the first copies are in. None is dead and
        neither is what they merge with (a first copy's merge never is), so this is merge
        alone. Returns (applied, refused)."""
        row_of = dict(zip((k.tobytes() for k in compact[first]), rows.tolist(), strict=True))
        at = sel[later]
        incoming = [
            Record(op, os, _STATES[st], bh, bp, g, ex)
            for op, os, st, bh, bp, g, ex in zip(
                *(cols[f][at].tolist() for f in _RECORD_FIELDS), strict=True
            )
        ]
        held = sorted({row_of[compact[j].tobytes()] for j in later.tolist()} - {-1})
        before = dict(zip(held, t.records(np.array(held, dtype=np.int64)), strict=True))
        current = dict(before)
        applied = refused = 0
        for j, rec in zip(later.tolist(), incoming, strict=True):
            row = row_of[compact[j].tobytes()]
            if row < 0:  # refused at the ceiling, which no later copy can lift
                refused += 1
                continue
            merged = merge(current[row], rec)
            if merged != current[row]:
                current[row] = merged
                applied += 1
        changed = [row for row in held if current[row] != before[row]]
        if changed:
            rows_changed = np.array(changed, dtype=np.int64)
            t.write(rows_changed, [current[row] for row in changed])
            keys = t.key_bytes(t.entries["key"][rows_changed])
            t.recount(
                np.array([before[row].state for row in changed], dtype=np.uint8),
                np.array([current[row].state for row in changed], dtype=np.uint8),
                t.prefixes(keys),
            )
        return applied, refused

    def merge_entries(
        self, entries: EntryArray, hashes: U64Array | None, now_ms: int
    ) -> MergeStats:
        """:meth:`merge_in` of wire.ENTRY_DTYPE rows from other nodes (not validated).
        Entries of another key kind than flow (affinity) are skipped: filter them out
        before calling. ``hashes`` default to ``wire.key_hashes`` of the keys."""
        raw = np.ascontiguousarray(entries).view(np.uint8).reshape(-1, wire.ENTRY_SIZE)
        flow = raw[:, 0] == wire.KIND_FLOW
        if not flow.all():
            raw = raw[flow]
            hashes = None if hashes is None else hashes[flow]
        keys = np.ascontiguousarray(raw[:, : wire.KEY_SIZE]).view(wire.KEY_DTYPE).reshape(-1)
        recs = np.ascontiguousarray(raw[:, wire.KEY_SIZE :]).view(wire.RESULT_DTYPE).reshape(-1)
        if hashes is None:
            hashes = wire.key_hashes(keys.tobytes())
        return self.merge_in(keys, hashes, recs, now_ms)

    def purge_expired(self, now_ms: int, budget: int = 4096) -> int:
        """Remove dead records and tombstones (``expiry_ms <= now_ms - tombstone_extra_ms``),
        scanning at most ``budget`` rows from a cursor that rotates over both tables, so no
        call walks the whole table. Copies expired for less than the maximum clock offset
        are kept: a claim over one still starts generation g + 1, and merge_in still merges
        with it rather than replacing it."""
        dead_before = now_ms - self._policy.tombstone_extra_ms
        removed = 0
        left = min(budget, sum(t.high for t in self._tables))
        while left > 0:
            t = self._tables[self._purge_table]
            stop = min(t.high, t.cursor + left)
            removed += t.purge(t.cursor, stop, dead_before)
            left -= stop - t.cursor
            t.cursor = stop
            if t.cursor >= t.high:
                t.cursor = 0
                self._purge_table = 1 - self._purge_table
        self.expirations += removed
        return removed
