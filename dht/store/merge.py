"""Merge-in: record copies from replicas and other PoPs applied to the tables.

Replication (copies from replicas, hints, anti-entropy, refill) goes through
``FlowStore.merge_in``/``merge_entries``, vectorised: the merge rule runs on columns for
the first copy of each key in a batch (~0.4 ms per 1000 copies at 1M records); only the
later copies of a key repeated in the batch are merged one by one. A batch of at most
``SMALL_MERGE`` copies (a replica's copy of one client call, a PoP link's shipment of a
quiet moment) goes copy by copy in pure Python instead: the vectorised pass costs about a
hundred numpy calls whatever the batch size. A copy is *dead* once
expired for ``tombstone_extra_ms`` (the maximum clock offset): merge-in skips dead copies
and replaces, rather than merges with, a dead stored one; purge removes only dead ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from dht.core import wire
from dht.core.record import Record, State, merge
from dht.core.wire import EntryArray, KeyArray, ResultArray, U64Array
from dht.store.table import (
    FIELD_TYPES,
    RECORD_FIELDS,
    STATES,
    Columns,
    FamilyTable,
    I64Array,
    U8Array,
    locate,
    split,
)

# Batches of at most this many copies are merged copy by copy (module doc).
SMALL_MERGE = 4


@dataclass(frozen=True, slots=True)
class MergeStats:
    """What one :meth:`FlowStore.merge_in` did. ``applied``: copies that changed the store
    (created a record or changed a stored one); ``refused``: copies of keys the store did
    not hold, refused at the hard ceiling; ``refused_embryonic``: how many of those were
    embryonic (a claim flood: those refusals do not take the node out of /readyz). Dead
    copies and copies that changed nothing count in neither."""

    applied: int = 0
    refused: int = 0
    refused_embryonic: int = 0


def merge_columns(a: Columns, b: Columns) -> Columns:
    """:func:`dht.core.record.merge` of ``a[i]`` and ``b[i]`` for every i, on columns of the
    record fields (native types). Must stay the same rule as ``merge``: the store tests
    check it against ``merge`` on random copies."""
    ga, gb = a["generation"], b["generation"]
    ha, hb, pa, pb = a["birth_hlc"], b["birth_hlc"], a["birth_pop"], b["birth_pop"]
    a_earlier = (ha < hb) | ((ha == hb) & (pa < pb))
    same_birth = (ha == hb) & (pa == pb)
    a_done = a["state"] >= int(State.ESTABLISHED)
    b_done = b["state"] >= int(State.ESTABLISHED)
    same_gen = ga == gb
    same_class = a_done == b_done
    a_wins = (ga > gb) | (same_gen & ((a_done & ~b_done) | (same_class & a_earlier)))
    out = {f: np.where(a_wins, a[f], b[f]) for f in RECORD_FIELDS}
    claim = same_gen & same_class & same_birth  # two copies of one claim: combine them
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


def merge_copies(
    tables: tuple[FamilyTable, FamilyTable],
    keys: KeyArray,
    hashes: U64Array,
    recs: ResultArray,
    *,
    dead_before: int,
    room: int,
) -> MergeStats:
    """The work of :meth:`FlowStore.merge_in`: merge ``recs`` (wire.RESULT_DTYPE rows, the
    status column ignored) into ``tables`` in call order, skipping copies with
    ``expiry_ms <= dead_before`` and replacing dead stored ones; at most ``room`` keys not
    held yet get a row, the rest are refused (counted, not stored).

    Vectorised: the first copy of each key is merged in one pass; only later copies of
    a key repeated in the batch are merged one by one. At most ``SMALL_MERGE`` copies:
    copy by copy (:func:`_merge_few`), the same outcome."""
    if len(keys) <= SMALL_MERGE:
        return _merge_few(tables, keys, hashes, recs, dead_before, room)
    expiry = recs["expiry_ms"].astype(np.int64)
    keep = np.flatnonzero(expiry > dead_before)
    if len(keep) < len(keys):
        keys, hashes, recs = keys[keep], hashes[keep], recs[keep]
    cols: Columns = {f: recs[f].astype(FIELD_TYPES[f]) for f in RECORD_FIELDS}

    # Per family: the first copy of each key (positions into the batch), its row.
    plans = []
    for t, sel, compact, h in split(tables, keys, hashes):
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
    admitted = np.zeros(len(keys), dtype=np.bool_)
    admitted[new_at[:room]] = True

    applied = refused = refused_embryonic = 0
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
            merged = merge_columns(old, new)
            dead = old["expiry_ms"] <= dead_before
            if dead.any():
                merged = {f: np.where(dead, new[f], merged[f]) for f in RECORD_FIELDS}
            changed = np.zeros(len(prows), dtype=np.bool_)
            for f in RECORD_FIELDS:
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
        refused_embryonic += int(
            np.count_nonzero(absent & ~take & (inc["state"] == State.EMBRYONIC))
        )
        if take.any():
            n = int(np.count_nonzero(take))
            t.reserve(n)
            new_rows = t.alloc_many(n)
            fresh = first[take]
            t.write_columns(new_rows, {f: c[take] for f, c in inc.items()})
            t.entries["hash"][new_rows] = h[fresh]
            t.entries["key"][new_rows] = t.key_values(compact)[fresh]
            t.index_add(new_rows, h[fresh])
            t.recount(np.zeros(n, dtype=np.uint8), inc["state"][take], t.prefixes(compact[fresh]))
            rows[take] = new_rows
            applied += n
        if later.size:
            a, r, e = _merge_repeats(t, sel, compact, first, later, rows, cols)
            applied += a
            refused += r
            refused_embryonic += e
    return MergeStats(applied=applied, refused=refused, refused_embryonic=refused_embryonic)


def _merge_repeats(
    t: FamilyTable,
    sel: npt.NDArray[np.intp],
    compact: U8Array,
    first: npt.NDArray[np.intp],
    later: npt.NDArray[np.intp],
    rows: I64Array,
    cols: Columns,
) -> tuple[int, int, int]:
    """merge_copies' second pass: the second and later copies of keys repeated in the
    batch, one by one in call order, after the first copies are in. None is dead and
    neither is what they merge with (a first copy's merge never is), so this is merge
    alone. Returns (applied, refused, refused embryonic copies)."""
    row_of = dict(zip((k.tobytes() for k in compact[first]), rows.tolist(), strict=True))
    at = sel[later]
    incoming = [
        Record(op, os, STATES[st], bh, bp, g, ex)
        for op, os, st, bh, bp, g, ex in zip(
            *(cols[f][at].tolist() for f in RECORD_FIELDS), strict=True
        )
    ]
    held = sorted({row_of[compact[j].tobytes()] for j in later.tolist()} - {-1})
    before = dict(zip(held, t.records(np.array(held, dtype=np.int64)), strict=True))
    current = dict(before)
    applied = refused = refused_embryonic = 0
    for j, rec in zip(later.tolist(), incoming, strict=True):
        row = row_of[compact[j].tobytes()]
        if row < 0:  # refused at the ceiling, which no later copy can lift
            refused += 1
            refused_embryonic += rec.state == State.EMBRYONIC
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
    return applied, refused, refused_embryonic


def entry_copies(
    entries: EntryArray, hashes: U64Array | None
) -> tuple[KeyArray, U64Array, ResultArray]:
    """wire.ENTRY_DTYPE rows as the keys, hashes and copies :func:`merge_copies` takes.
    Entries of another key kind than flow (affinity) are dropped; ``hashes`` default to
    ``wire.key_hashes`` of the keys."""
    raw = np.ascontiguousarray(entries).view(np.uint8).reshape(-1, wire.ENTRY_SIZE)
    flow = raw[:, 0] == wire.KIND_FLOW
    if not flow.all():
        raw = raw[flow]
        hashes = None if hashes is None else hashes[flow]
    keys = np.ascontiguousarray(raw[:, : wire.KEY_SIZE]).view(wire.KEY_DTYPE).reshape(-1)
    recs = np.ascontiguousarray(raw[:, wire.KEY_SIZE :]).view(wire.RESULT_DTYPE).reshape(-1)
    if hashes is None:
        hashes = wire.key_hashes(keys.tobytes())
    return keys, hashes, recs


def _merge_few(
    tables: tuple[FamilyTable, FamilyTable], keys: KeyArray, hashes: U64Array, recs: ResultArray,
    dead_before: int, room: int,
) -> MergeStats:  # fmt: skip
    """:func:`merge_copies` (same arguments) copy by copy, in call order, in pure Python."""
    cols = [recs[f].tolist() for f in RECORD_FIELDS]
    raw = np.ascontiguousarray(keys).tobytes()
    size = wire.KEY_SIZE
    applied = refused = refused_embryonic = 0
    for i, (h, (op, os, st, bh, bp, g, ex)) in enumerate(
        zip(hashes.tolist(), zip(*cols, strict=True), strict=True)
    ):
        key = raw[i * size : (i + 1) * size]
        if ex <= dead_before:
            continue
        rec = Record(op, os, STATES[st], bh, bp, g, ex)
        t, compact = locate(tables, key)
        row = t.find_one(h, compact)
        if row < 0:
            if room <= 0:
                refused += 1
                refused_embryonic += rec.state == State.EMBRYONIC
                continue
            room -= 1
            t.add_one(h, compact, rec)
            t.count_state(State.NONE, rec.state, partial(t.prefix_one, compact))
            applied += 1
            continue
        old = t.record_at(row)
        new = rec if old.expiry_ms <= dead_before else merge(old, rec)
        if new != old:
            t.write_one(row, new)
            t.count_state(old.state, new.state, partial(t.prefix_one, compact))
            applied += 1
    return MergeStats(applied=applied, refused=refused, refused_embryonic=refused_embryonic)
