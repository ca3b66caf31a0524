"""The in-memory flow record store of one node (docs/protocol.md#merge-rule, #time-to-live).

Layout, capacity and quota only: every decision about a record is made by the pure
functions of :mod:`dht.core.record` (``decide_*`` and ``merge``), so the store cannot disagree
with the rules it is tested against.

:class:`FlowStore` is the public face; its parts are siblings of this module:

* :mod:`dht.store.table`: the column table of one address family (rows, index,
  bookkeeping) and why it is laid out that way;
* :mod:`dht.store.batch`: the write buffer of one mutating call;
* :mod:`dht.store.merge`: merge-in of copies from replicas and other PoPs;
* :mod:`dht.store.scans`: whole-table scans (export, hand-off drop, purge);
* :mod:`dht.store.digests`: the partition digests, kept up to date;
* :mod:`dht.store.quota`: the PoP's embryonic quota per client prefix.

Mutations (:meth:`FlowStore.mutate`, one :class:`dht.core.ops.Op` each) run the op's
``decide_*`` function per key, in call order, so births, capacity and quota decisions come
out as if the keys had been sent one by one.

Not thread-safe: one store per node, used from its event loop. No call blocks on I/O.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from dht.core import wire
from dht.core.config import StoreLimits
from dht.core.ops import Op
from dht.core.record import (
    Acting,
    Change,
    HybridClock,
    Record,
    State,
    Status,
    TtlPolicy,
    decide_claim,
    decide_confirm,
    decide_refresh,
    decide_release,
)
from dht.core.wire import EntryArray, KeyArray, ResultArray, U64Array
from dht.store import scans
from dht.store.batch import Answers, FamilyBatch
from dht.store.digests import DigestCache
from dht.store.merge import MergeStats, entry_copies, merge_copies
from dht.store.quota import PrefixQuota
from dht.store.table import RECORD_FIELDS, STATES, family_tables, locate, split

__all__ = ["FlowStore", "MergeStats"]

# Look-ups and copies of at most this many keys go key by key in pure Python.
SMALL_LOOKUP = 4

# One key's change under an op: (stored copy, who acts, policy, birth stamp) -> Change.
Decide = Callable[[Record | None, Acting, TtlPolicy, int], Change]

# The flow ops that change records, each with its create-once rule (dht.core.record). The
# birth stamp is drawn only for ops that may create a record (Op.creates); the others
# ignore it.
_DECIDE: dict[Op, Decide] = {
    Op.CLAIM: decide_claim,
    Op.CONFIRM: decide_confirm,
    Op.REFRESH: lambda old, act, policy, _birth: decide_refresh(old, act, policy),
    Op.RELEASE: lambda old, act, policy, _birth: decide_release(old, act, policy),
}


class FlowStore:
    """All flow records of one node. Every op takes ``keys`` (validated ``wire.KEY_DTYPE``
    rows) and their ``hashes`` (``wire.key_hashes``) and answers one ``wire.RESULT_DTYPE``
    row per key, in order (the ``partition`` column is left to the node)."""

    def __init__(self, policy: TtlPolicy, limits: StoreLimits, clock: HybridClock) -> None:
        self._policy = policy
        self._limits = limits
        self._clock = clock
        self._tables = family_tables(limits.prefix_v4, limits.prefix_v6)
        self._purge_table = 0
        self._hard_refused = False
        self.expirations = 0
        self.refusals: dict[str, int] = {"full": 0, "quota": 0, "hard": 0, "embryonic_copy": 0}
        self._digests = DigestCache()
        self.quota = PrefixQuota(limits.embryonic_quota_per_prefix, policy.embryonic_ms)

    def __len__(self) -> int:
        return self._tables[0].used + self._tables[1].used

    @property
    def over_hard_limit(self) -> bool:
        """A replicated record other than an embryonic one (or a confirm's new record) was
        refused, and the store is still at its hard ceiling."""
        return self._hard_refused and len(self) >= self._limits.hard_max_records

    def counts(self) -> dict[tuple[str, str], int]:
        return {
            (t.family, s.name.lower()): t.state_counts[s] for t in self._tables for s in STATES[1:]
        }

    # ------------------------------------------------------------------ reads

    def lookup(self, keys: KeyArray, hashes: U64Array, now_ms: int) -> ResultArray:
        """Vectorised ``decide_lookup``: OK with the record if live, else NOT_FOUND. A
        handful of keys (a forwarder's miss) take :meth:`lookup_one` each: the
        vectorised path's fixed cost (tens of numpy calls) is ~20x one key's."""
        if len(keys) <= SMALL_LOOKUP:
            raw = b"".join(
                self.lookup_one(k.tobytes(), int(h), now_ms)
                for k, h in zip(keys, hashes, strict=True)
            )
            return np.frombuffer(raw, dtype=wire.RESULT_DTYPE).copy()
        out = wire.new_results(len(keys))
        out["status"] = Status.NOT_FOUND
        for t, sel, compact, h in split(self._tables, keys, hashes):
            rows = t.find(h, compact)
            hit = rows >= 0
            got = t.gather(rows[hit])
            live = (got["state"] != State.RELEASED) & (got["expiry_ms"] > now_ms)
            at, got = sel[hit][live], got[live]
            out["status"][at] = Status.OK
            for field in RECORD_FIELDS:
                out[field][at] = got[field]
        return out

    def lookup_one(self, key: bytes, key_hash: int, now_ms: int, partition: int = 0) -> bytes:
        """:meth:`lookup` of one validated 40-byte key, as one packed result record, in
        pure Python: a vectorised lookup costs tens of numpy calls whatever the batch
        size, ~20x this for a single key (the UDP miss path, dht.edge.udp)."""
        got = self._find_one(key, key_hash)
        if got is not None:
            birth, expiry, gen, owner, server, birth_pop, state = got
            if state != State.RELEASED and expiry > now_ms:
                return wire.RESULT_STRUCT.pack(
                    Status.OK, state, owner, server, birth_pop, gen, partition, 0, birth, expiry
                )
        return wire.RESULT_STRUCT.pack(Status.NOT_FOUND, 0, 0, 0, 0, 0, partition, 0, 0, 0)

    def _copy_one(self, key: bytes, key_hash: int) -> bytes:
        """:meth:`copies` of one key, packed: OK with the stored copy whatever its
        liveness, or NOT_FOUND with no fields."""
        got = self._find_one(key, key_hash)
        if got is None:
            return wire.RESULT_STRUCT.pack(Status.NOT_FOUND, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        birth, expiry, gen, owner, server, birth_pop, state = got
        return wire.RESULT_STRUCT.pack(
            Status.OK, state, owner, server, birth_pop, gen, 0, 0, birth, expiry
        )

    def _find_one(self, key: bytes, key_hash: int) -> tuple[int, ...] | None:
        """The stored row of one key (birth, expiry, generation, owner, server, birth
        PoP, state), probing the index in pure Python; None when none is stored."""
        t, compact = locate(self._tables, key)
        row = t.find_one(key_hash, compact)
        if row < 0:
            return None
        _, birth, expiry, gen, owner, server, birth_pop, state, _ = t.entries[row].item()
        return birth, expiry, gen, owner, server, birth_pop, state

    def get(self, key: bytes, now_ms: int | None = None) -> Record | None:
        """The stored copy of one 40-byte key, tombstones and expired copies included;
        with ``now_ms``, None once the copy has expired."""
        keys = wire.decode_keys(key, max_keys=1)
        for t, _, compact, h in split(self._tables, keys, wire.key_hashes(key)):
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
        if len(keys) <= SMALL_LOOKUP:
            raw = b"".join(
                self._copy_one(k.tobytes(), int(h)) for k, h in zip(keys, hashes, strict=True)
            )
            return np.frombuffer(raw, dtype=wire.RESULT_DTYPE).copy()
        out = wire.new_results(len(keys))
        out["status"] = Status.NOT_FOUND
        for t, sel, compact, h in split(self._tables, keys, hashes):
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
        return self._digests.get(self._tables, num_partitions, now_ms)

    def export_entries(
        self,
        partitions: npt.NDArray[np.integer] | None,
        num_partitions: int,
        now_ms: int,
    ) -> EntryArray:
        """The stored copies with ``expiry_ms > now_ms`` whose partition
        (``hash % num_partitions``) is in ``partitions`` (None: all), as wire.ENTRY_DTYPE
        rows: canonical 40-byte key + RESULT_DTYPE record with status OK."""
        return scans.export_entries(self._tables, partitions, num_partitions, now_ms)

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
        return self.mutate(
            Op.CLAIM, keys, hashes, pop=pop, server=server, ttl_ms=ttl_ms, now_ms=now_ms
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
        return self.mutate(
            Op.CONFIRM, keys, hashes, pop=pop, server=server, ttl_ms=ttl_ms, now_ms=now_ms
        )

    def refresh(
        self, keys: KeyArray, hashes: U64Array, *, pop: int, ttl_ms: int | None, now_ms: int
    ) -> ResultArray:
        return self.mutate(
            Op.REFRESH, keys, hashes, pop=pop, server=0, ttl_ms=ttl_ms, now_ms=now_ms
        )

    def release(self, keys: KeyArray, hashes: U64Array, *, pop: int, now_ms: int) -> ResultArray:
        return self.mutate(Op.RELEASE, keys, hashes, pop=pop, server=0, ttl_ms=None, now_ms=now_ms)

    def mutate(
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
        """Apply a flow op that changes records (CLAIM, CONFIRM, REFRESH, RELEASE) for PoP
        ``pop`` (and ``server``, kept by a record it creates): the op's ``decide_*`` rule
        per key, in call order, then capacity and quota. ``ttl_ms`` None: the policy's TTL.
        Raises ValueError for LOOKUP (:meth:`lookup`) and the affinity ops."""
        decide = _DECIDE.get(op)
        if decide is None:
            raise ValueError(f"{op.name} does not change flow records")
        answers = Answers(len(keys))
        acting = {p: Acting(pop, server, p, now_ms, ttl_ms) for p in wire.PROTOCOL_NAMES}
        policy = self._policy
        batches, plan = self._plan(keys, hashes)
        for i, (batch, j) in enumerate(plan):
            row, old = batch.existing(j)
            # A birth stamp only for a record this call may create (decide_claim and
            # decide_confirm create exactly when nothing live is stored).
            creating = op.creates and (old is None or not old.live(now_ms))
            d = decide(
                old, acting[batch.protocols[j]], policy, self._clock.now() if creating else 0
            )
            refusal = self._refusal(op, d, batch=batch, j=j, row=row, old=old, now_ms=now_ms)
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
    ) -> tuple[list[FamilyBatch], list[tuple[FamilyBatch, int]]]:
        """One FamilyBatch per family, and for each key in call order its batch and
        position there: keys are applied in call order, so births, capacity and quota
        decisions come out as if the keys had been sent one by one."""
        batches = []
        slots: list[tuple[FamilyBatch, int] | None] = [None] * len(keys)
        for t, sel, compact, h in split(self._tables, keys, hashes):
            batch = FamilyBatch(t, compact, h)
            batches.append(batch)
            for j, i in enumerate(sel.tolist()):
                slots[i] = (batch, j)
        return batches, [s for s in slots if s is not None]

    def _refusal(
        self,
        op: Op,
        d: Change,
        *,
        batch: FamilyBatch,
        j: int,
        row: int,
        old: Record | None,
        now_ms: int,
    ) -> Status | None:
        """Capacity and quota (docs/protocol.md#capacity-and-quota): a claim creating an
        embryonic record is refused by the soft limit and the prefix quota; a confirm that
        creates a record by the prefix quota (counted there for an embryonic TTL) and only at
        the hard ceiling for room. Owners' refreshes are never refused."""
        if d.status != Status.CREATED:
            return None
        limits = self._limits
        if op is Op.CLAIM and len(self) >= limits.max_records:
            self.refusals["full"] += 1
            return Status.REFUSED_FULL
        # A re-creation over this key's own expired embryo does not add an embryo.
        mine = old is not None and old.state == State.EMBRYONIC
        prefix = batch.prefix(j)
        if not self.quota.allows(prefix, batch.table.embryos.get(prefix, 0) - mine, now_ms):
            self.refusals["quota"] += 1
            return Status.REFUSED_QUOTA
        if op is not Op.CLAIM:
            if row < 0 and len(self) >= limits.hard_max_records:
                self.refusals["hard"] += 1
                self._hard_refused = True
                return Status.REFUSED_FULL
            if not mine:
                self.quota.count_created(prefix, now_ms)
        return None

    def drop_partitions(self, keep: npt.NDArray[np.bool_]) -> int:
        """Remove every record whose partition (``hash % len(keep)``) is not kept: the
        partitions this node no longer replicates, once they were handed off."""
        return scans.drop_partitions(self._tables, keep)

    def restore(self, keys: KeyArray, hashes: U64Array, old: ResultArray) -> None:
        """Undo a write: put back exactly the copies ``old`` (as :meth:`copies` returned
        them before the write; NOT_FOUND = remove the record). Not a merge: only to take
        back a write that missed its quorum, where the copy is still the one written
        (checked by the caller in the same step)."""
        for table, at, compact, h in split(self._tables, keys, hashes):
            batch = FamilyBatch(table, compact, h)
            gone: list[int] = []
            for j, i in enumerate(at.tolist()):
                row, cur = batch.existing(j)
                if int(old["status"][i]) == Status.OK:
                    v = [int(old[f][i]) for f in RECORD_FIELDS]
                    rec = Record(v[0], v[1], STATES[v[2]], v[3], v[4], v[5], v[6])
                    if rec != cur:
                        batch.put(j, row, cur, rec)
                elif row >= 0 and cur is not None:
                    gone.append(row)
            batch.flush()
            if gone:
                table.remove(np.array(sorted(set(gone)), dtype=np.int64))

    # ------------------------------------------------------------------ merge-in

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
        newer live claim until purged). See :mod:`dht.store.merge`."""
        stats = merge_copies(
            self._tables,
            keys,
            hashes,
            recs,
            dead_before=now_ms - self._policy.tombstone_extra_ms,
            room=max(0, self._limits.hard_max_records - len(self)),
        )
        if stats.refused:
            # Embryonic copies refused at the ceiling are a claim flood the soft limit and
            # the quota answer at the coordinators: counted, but the node stays ready.
            # Refused established (or released) copies are state lost: not ready.
            self.refusals["hard"] += stats.refused - stats.refused_embryonic
            self.refusals["embryonic_copy"] += stats.refused_embryonic
            if stats.refused > stats.refused_embryonic:
                self._hard_refused = True
        return stats

    def merge_entries(
        self, entries: EntryArray, hashes: U64Array | None, now_ms: int
    ) -> MergeStats:
        """:meth:`merge_in` of wire.ENTRY_DTYPE rows from other nodes (not validated).
        Entries of another key kind than flow (affinity) are skipped: filter them out
        before calling. ``hashes`` default to ``wire.key_hashes`` of the keys."""
        return self.merge_in(*entry_copies(entries, hashes), now_ms)

    def purge_expired(self, now_ms: int, budget: int = 4096) -> int:
        """Remove dead records and tombstones (``expiry_ms <= now_ms - tombstone_extra_ms``),
        scanning at most ``budget`` rows from a cursor that rotates over both tables, so no
        call walks the whole table. Copies expired for less than the maximum clock offset
        are kept: a claim over one still starts generation g + 1, and merge_in still merges
        with it rather than replacing it."""
        self.quota.sweep(now_ms)
        dead_before = now_ms - self._policy.tombstone_extra_ms
        removed, self._purge_table = scans.purge_expired(
            self._tables, self._purge_table, dead_before, budget
        )
        self.expirations += removed
        return removed
