"""The replica's half of replication, beside the copies it guards.

What other nodes of the PoP ask of this one (the NodeInternal calls: Replicate, Undo,
Promise, ReadCopies, PartitionDigests, FetchPartitions) and the copies they change: the
flow and affinity stores, the terms this node promised (dht.node.terms), and the windows
in which a coordinator may still take back a write this node took
(docs/protocol.md#undo). Everything arriving here comes from the network and is checked
before it touches state.

Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from dht.core.clock import MonoMs
from dht.core.config import NodeConfig
from dht.core.errors import InvalidArgument
from dht.core.ingress import Bounds, Checked, check_entries, term_bound
from dht.core.placement import PartitionMap
from dht.core.record import HybridClock, State, Status, hlc_physical_ms
from dht.core.wire import (
    ENTRY_DTYPE,
    ENTRY_SIZE,
    KEY_DTYPE,
    KEY_SIZE,
    KIND_AFFINITY,
    KIND_FLOW,
    EntryArray,
    KeyArray,
    ResultArray,
    U64Array,
    check_batch_size,
    key_hashes,
    new_results,
)
from dht.node.inflight import InFlight
from dht.node.state import NodeState
from dht.node.terms import Terms
from dht.node.transport import MergeResult
from dht.node.undo import UndoWindows, undo_window_ms
from dht.store.affinity import AffinityStore
from dht.store.flows import FlowStore


def same_claim(a: ResultArray, b: ResultArray) -> npt.NDArray[np.bool_]:
    """Per row: the same claim (generation and birth), whatever its state since."""
    same: npt.NDArray[np.bool_] = (
        (a["generation"] == b["generation"])
        & (a["birth_hlc"] == b["birth_hlc"])
        & (a["birth_pop"] == b["birth_pop"])
    )
    return same


def _unchanged(now: ResultArray, wrote: ResultArray) -> npt.NDArray[np.bool_]:
    """Per row: the copy held ``now`` is still the one written (nothing merged in)."""
    same: npt.NDArray[np.bool_] = (
        (now["status"] == Status.OK)
        & same_claim(now, wrote)
        & (now["state"] == wrote["state"])
        & (now["owner_pop"] == wrote["owner_pop"])
        & (now["expiry_ms"] == wrote["expiry_ms"])
    )
    return same


def failed_copies(
    windows: UndoWindows,
    store: FlowStore,
    entries: EntryArray,
    hashes: U64Array,
    terms: npt.NDArray[np.uint64],
    lost: npt.NDArray[np.intp],
) -> tuple[npt.NDArray[np.intp], ResultArray]:
    """Of coordinated-write entries at ``lost`` (their claim lost the merge to another):
    those (positions into ``lost``, and the copies held) whose winner is an embryonic
    copy that an earlier coordinated write left here, as written, still open to its undo
    and not pulled from here since (docs/protocol.md#undo). That write was not
    acknowledged: its coordinator, under the same term, decided this one without it, and
    a coordinator under a higher term would have pulled it in its take-over had a write
    quorum taken it."""
    found, open_terms, written = windows.last_written(hashes[lost])
    can = np.flatnonzero(found & (open_terms <= terms[lost]) & ~windows.pinned(hashes[lost]))
    idx = lost[can]
    held = store.copies(entries["key"][idx], hashes[idx])
    failed = _unchanged(held, written[can]) & (held["state"] == State.EMBRYONIC)
    return can[failed], held[failed]


class Replica:
    """The copies of one node and what peers may do to them. ``prev_table`` gives the
    previous table while a membership change settles (a coordinator still counting its
    quorums there is a member too)."""

    def __init__(
        self,
        config: NodeConfig,
        state: NodeState,
        store: FlowStore,
        affinity: AffinityStore,
        clock: HybridClock,
        terms: Terms,
        inflight: InFlight,
        mono_ms: MonoMs,
        prev_table: Callable[[], PartitionMap | None],
    ) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.affinity = affinity
        self.clock = clock
        self.terms = terms
        self.inflight = inflight
        self._mono = mono_ms
        self._prev_table = prev_table
        # Other coordinators' writes taken here lately, open to an undo (two RPC timeouts
        # and a second) and to a later write replacing them (the failure timeout more),
        # left out of settled-only exchanges till then (docs/protocol.md#undo).
        self.windows = UndoWindows(undo_window_ms(config), mono_ms)
        self.undone_for_others = 0  # copies put back here at a coordinator's request
        self.replaced_failed = 0  # failed writes' copies a later write replaced here
        # Undo entries refused (left standing): caller not a member, term not promised,
        # copy not written here by the caller (or no longer open to an undo).
        self.undo_refused = {"not_member": 0, "term": 0, "not_writer": 0}
        self._bounds = Bounds.of(config)
        # Copies refused by the ingress checks (dht.core.ingress), by reason.
        self.ingress_refused: dict[str, int] = {}

    # ------------------------------------------------------------------ local copies

    def check(self, entries: EntryArray, *, records_optional: bool = False) -> Checked:
        """The ingress checks (dht.core.ingress) of copies from the network; refusals
        are counted by reason (``dht_ingress_refused_total``)."""
        checked = check_entries(
            entries, self._bounds, self.clock.wall_ms(), records_optional=records_optional
        )
        for reason, n in checked.refused.items():
            self.ingress_refused[reason] = self.ingress_refused.get(reason, 0) + n
        return checked

    def merge_entries(self, entries: EntryArray) -> MergeResult:
        """Apply copies from other nodes or PoPs (replication, hints, anti-entropy,
        refill, hand-off, pulls, shipping): each checked on its own first; a refused
        copy is counted in ``refused`` and never applied."""
        if len(entries) == 0:
            return MergeResult()
        checked = self.check(entries)
        if checked.all_ok:
            return self.merge_checked(entries)
        merged = self.merge_checked(entries[checked.ok])
        return replace(merged, refused=merged.refused + checked.n_refused)

    def merge_checked(self, entries: EntryArray) -> MergeResult:
        """Apply copies that passed :meth:`check` already."""
        if len(entries) == 0:
            return MergeResult()
        now = self.clock.wall_ms()
        kinds = entries["key"]["kind"]
        flows = entries[kinds == KIND_FLOW]
        applied = refused = 0
        if len(flows):
            stats = self.store.merge_entries(flows, None, now)
            applied, refused = stats.applied, stats.refused
        aff = entries[kinds == KIND_AFFINITY]
        if len(aff):
            applied += self.affinity.merge_entries(aff, now, self.config.ttl.tombstone_extra_ms)
        return MergeResult(applied, refused)

    def partition_digests(self) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        now = self.clock.wall_ms()
        p = self.state.table.num_partitions
        d1, c1 = self.store.partition_digests(p, now)
        d2, c2 = self.affinity.partition_digests(p, now)
        with np.errstate(over="ignore"):
            return d1 + d2, c1 + c2

    def export_entries(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> EntryArray:
        """Every copy of ``partitions``, except those of writes still in flight; with
        ``settled_only``, also except copies of other coordinators' writes taken
        recently, which their coordinator may still take back (see undo)."""
        now = self.clock.wall_ms()
        p = self.state.table.num_partitions
        raw = (
            self.store.export_entries(partitions, p, now).tobytes()
            + self.affinity.export_entries(partitions, p, now).tobytes()
        )
        entries = np.frombuffer(raw, dtype=ENTRY_DTYPE)
        if self.inflight and len(entries):
            entries = entries[~self.inflight.hidden(entries["key"].tobytes())]
        recent = self.windows.recent() if len(entries) else None
        if recent is not None:
            hashes = key_hashes(entries["key"].tobytes())
            open_ = np.isin(hashes, recent)
            if settled_only:
                entries = entries[~open_]
            else:
                self.windows.pin(hashes[open_])
        return entries

    def copies(self, keys: KeyArray, hashes: U64Array) -> ResultArray:
        """This node's copies of ``keys`` (flows and affinity prefixes alike)."""
        out = new_results(len(keys))
        flows = np.flatnonzero(keys["kind"] == KIND_FLOW)
        if flows.size:
            out[flows] = self.store.copies(keys[flows], hashes[flows])
        aff = np.flatnonzero(keys["kind"] == KIND_AFFINITY)
        if aff.size:
            out[aff] = self.affinity.copies(keys["caddr"][aff])
        other = (keys["kind"] != KIND_FLOW) & (keys["kind"] != KIND_AFFINITY)
        out["status"][other] = Status.NOT_FOUND
        return out

    def put_back(
        self, keys: KeyArray, hashes: U64Array, wrote: ResultArray, before: ResultArray
    ) -> npt.NDArray[np.bool_]:
        """Put the copies ``before`` back where the copy held is still the one written
        (a copy merged in meanwhile, say another coordinator's acknowledged claim, is
        kept). Returns per key whether it was put back. Serves the coordinator's own
        undo and a replica's alike."""
        kinds = keys["kind"]
        put = np.zeros(len(keys), dtype=bool)
        flows = np.flatnonzero(kinds == KIND_FLOW)
        if flows.size:
            still = _unchanged(self.store.copies(keys[flows], hashes[flows]), wrote[flows])
            sel = flows[still]
            put[sel] = True
            if sel.size:
                self.store.restore(keys[sel], hashes[sel], before[sel])
        aff = np.flatnonzero(kinds == KIND_AFFINITY)
        if aff.size:
            prefixes = keys["caddr"][aff]
            still = _unchanged(self.affinity.copies(prefixes), wrote[aff])
            put[aff[still]] = True
            if still.any():
                self.affinity.restore(prefixes[still], before[aff[still]])
        return put

    # ------------------------------------------------------------------ NodeInternal

    def replicate(
        self,
        raw: bytes,
        issued_hlc: int = 0,
        terms: npt.NDArray[np.uint64] | None = None,
        from_node: str = "",
    ) -> MergeResult:
        """Apply copies. A coordinator's write (``terms`` given) is refused whole when a
        higher term was promised for any of its partitions, or when it was issued longer
        ago than the failure timeout (see dht.proto EntryBatch). Each copy is checked on
        its own (dht.core.ingress): a refused one is counted in ``refused``, not applied,
        and, in a coordinated write, reported ``superseded`` (not an acknowledgement).
        Terms above :func:`~dht.core.ingress.term_bound` fail the call whole."""
        check_batch_size(len(raw), ENTRY_SIZE, 1_000_000, "entries")
        entries = np.frombuffer(raw, dtype=ENTRY_DTYPE)
        if terms is not None and len(terms):
            self.check_terms(terms)
        if terms is not None and len(terms) and self.state.leaving:
            # A leaving node takes no part in write quorums: its copy leaves with it, and
            # a take-over in the table without it would not look for the write here
            # (docs/protocol.md#leave). Refused like a stale write: no ack, no hint.
            return MergeResult(stale=True)
        if issued_hlc:
            # Past the failure timeout others may have routed around the coordinator
            # and acknowledged a conflicting claim (a paused coordinator cannot know).
            limit = round(self.config.failure_timeout_s * 1000) + self.config.max_clock_offset_ms
            if hlc_physical_ms(issued_hlc) < self.clock.wall_ms() - limit:
                return MergeResult(stale=True)
        if terms is None or not len(terms):
            return self.merge_entries(entries)
        if len(terms) != len(entries):
            raise InvalidArgument(
                "terms", f"{8 * len(terms)} bytes for {len(entries)} entries (want 8 each)"
            )
        checked = self.check(entries)
        if not checked.all_ok:
            # Refused copies take no part: no fencing, no promise, no undo window.
            good = np.flatnonzero(checked.ok)
            res = self._coordinated(entries[good], terms[good], from_node)
            refused = np.flatnonzero(~checked.ok)
            return replace(
                res,
                refused=res.refused + refused.size,
                superseded=np.sort(np.concatenate([good[res.superseded], refused])),
            )
        return self._coordinated(entries, terms, from_node)

    def _coordinated(
        self, entries: EntryArray, terms: npt.NDArray[np.uint64], from_node: str
    ) -> MergeResult:
        """A coordinated write of checked copies: fenced by the promises made here."""
        if not len(entries):
            return MergeResult()
        hashes = key_hashes(entries["key"].tobytes())
        parts = self.state.table.partitions_of(hashes).astype(np.intp)
        if not self.is_member(from_node):
            # A coordinator this node's table does not hold (declared dead, left, not
            # yet known) cannot count its quorums in any table in force here.
            return MergeResult(
                fenced=np.unique(parts), fenced_by=int(self.terms.promised[parts].max())
            )
        fenced, by = self.terms.fence(parts, terms)
        if fenced.size:
            return MergeResult(fenced=fenced, fenced_by=by, fenced_by_floor=by == self.terms.floor)
        merged = self.merge_checked(entries)
        lost = self._superseded(entries, hashes)
        if lost.size:
            lost = self._in_place_of_failed(entries, hashes, terms, lost)
        self.windows.wrote(hashes, from_node, terms, entries["rec"].copy())
        if lost.size:
            return replace(merged, superseded=lost)
        return merged

    def _in_place_of_failed(
        self,
        entries: EntryArray,
        hashes: U64Array,
        terms: npt.NDArray[np.uint64],
        lost: npt.NDArray[np.intp],
    ) -> npt.NDArray[np.intp]:
        """Of the flow entries at ``lost`` (their claim lost the merge here to another
        claim): put the incoming claim in place of the winner where that is a failed
        write's copy (see failed_copies). Returns the positions still lost."""
        at, held = failed_copies(self.windows, self.store, entries, hashes, terms, lost)
        if not at.size:
            return lost
        sel = lost[at]
        done = self.put_back(entries["key"][sel], hashes[sel], held, entries["rec"][sel])
        self.replaced_failed += int(np.count_nonzero(done))
        still: npt.NDArray[np.intp] = np.delete(lost, at[done])
        return still

    def undo(
        self,
        raw_written: bytes,
        raw_before: bytes,
        terms: npt.NDArray[np.uint64],
        from_node: str,
    ) -> npt.NDArray[np.intp]:
        """Take back a coordinator's write that missed its quorum (see dht.proto
        UndoRequest): per entry, put ``before`` back where the copy held here is still
        the one written, unless a take-over or quorum read pulled that copy from here
        meanwhile, or this node took the partition over under a higher term since: the
        puller, or this node as coordinator, may have decided claims on it. Only by its
        writer (see _by_writer). Returns the positions of the entries left standing."""
        check_batch_size(len(raw_written), ENTRY_SIZE, 1_000_000, "written")
        written = np.frombuffer(raw_written, dtype=ENTRY_DTYPE)
        if len(raw_before) != len(raw_written):
            raise InvalidArgument(
                "before", f"{len(raw_before)} bytes for {len(written)} written entries"
            )
        before = np.frombuffer(raw_before, dtype=ENTRY_DTYPE)
        if (before["key"] != written["key"]).any():
            raise InvalidArgument("before", "keys differ from those written")
        if len(terms) != len(written):
            raise InvalidArgument(
                "terms", f"{8 * len(terms)} bytes for {len(written)} entries (want 8 each)"
            )
        self.check_terms(terms)
        hashes = key_hashes(written["key"].tobytes())
        parts = self.state.table.partitions_of(hashes).astype(np.intp)
        ours = self.terms.undoable_by(parts, terms)
        # Both sides checked (dht.core.ingress): a refused entry is left standing.
        ours &= self.check(written).ok & self.check(before, records_optional=True).ok
        ours &= self._by_writer(parts, hashes, terms, from_node)
        ours &= ~self.windows.pinned(hashes)
        undone = np.zeros(len(written), dtype=bool)
        mine = np.flatnonzero(ours)
        undone[mine] = self.put_back(
            written["key"][mine], hashes[mine], written["rec"][mine], before["rec"][mine]
        )
        self.undone_for_others += int(np.count_nonzero(undone))
        kept: npt.NDArray[np.intp] = np.flatnonzero(~undone)
        return kept

    def _by_writer(
        self,
        parts: npt.NDArray[np.intp],
        hashes: U64Array,
        terms: npt.NDArray[np.uint64],
        from_node: str,
    ) -> npt.NDArray[np.bool_]:
        """Per entry of an undo: may ``from_node`` take it back? Only a member of the
        tables in force (its coordinator was one), only under a term this replica
        promised for the partition (a write it applied under term T left a promise of at
        least T here, so an undo above the promise undoes nothing written here), and only
        a copy that ``from_node`` itself wrote here within the undo window. Refused
        entries are left standing and counted in ``undo_refused``."""
        if not self.is_member(from_node):
            self.undo_refused["not_member"] += len(parts)
            return np.zeros(len(parts), dtype=bool)
        ok: npt.NDArray[np.bool_] = terms <= self.terms.promised[parts]
        self.undo_refused["term"] += int(np.count_nonzero(~ok))
        written = self.windows.written_by(hashes, from_node)
        self.undo_refused["not_writer"] += int(np.count_nonzero(ok & ~written))
        return ok & written

    def _superseded(self, entries: EntryArray, hashes: U64Array) -> npt.NDArray[np.intp]:
        """Positions of flow ``entries`` whose claim is not the one now held here: a
        different generation or birth won the merge (this replica holds another claim)."""
        flows = np.flatnonzero(entries["key"]["kind"] == KIND_FLOW)
        if not flows.size:
            return flows
        keys = entries["key"][flows]
        held = self.store.copies(keys, hashes[flows])
        same = (held["status"] == Status.OK) & same_claim(held, entries["rec"][flows])
        if self.inflight and not same.all():
            # A claim this node coordinates itself, still in flight, is no winner yet:
            # a write under a higher term reaching it means another node took the
            # partition over, so that claim can no longer be acknowledged (it is fenced
            # and undone).
            same |= self.inflight.hidden(keys.tobytes())
        lost: npt.NDArray[np.intp] = flows[~same]
        return lost

    def promise(
        self, parts: npt.NDArray[np.intp], term: int, from_node: str
    ) -> npt.NDArray[np.uint64]:
        """Promise ``term`` for partitions (``from_node`` takes them over); not to a
        node this node's table does not hold (see replicate)."""
        self.check_partitions(parts)
        if term == 0:
            raise InvalidArgument("term", "must be set")
        self.check_terms(np.array([term], dtype=np.uint64))
        if not self.is_member(from_node):
            promised: npt.NDArray[np.uint64] = self.terms.promised[parts].copy()
            return promised
        return self.terms.promise_in(parts, term)

    def check_terms(self, terms: npt.NDArray[np.uint64]) -> None:
        """Refuse (InvalidArgument) a call carrying a term no node's clock could have
        made (dht.core.ingress.term_bound): it would fence every real coordinator, and
        the next term above it would overflow."""
        bound = term_bound(self.config.max_clock_offset_ms, self.clock.wall_ms())
        if len(terms) and int(terms.max()) > bound:
            self.ingress_refused["term"] = self.ingress_refused.get("term", 0) + 1
            raise InvalidArgument("term", f"{int(terms.max())} is above the bound {bound}")

    def is_member(self, node_id: str) -> bool:
        """In this node's table, or (while a membership change settles) its previous."""
        prev = self._prev_table()
        tables = [self.state.table] + ([prev] if prev else [])
        return any(m.node_id == node_id for t in tables for m in t.members)

    def read_copies(self, raw: bytes) -> tuple[bytes, npt.NDArray[np.bool_]]:
        """This node's copies of ``raw`` keys for a quorum read, take-over or refill:
        writes still in flight show as their copy before; copies still open to an undo
        that are pulled are pinned (see undo). With, per key, whether this node's copy
        of its partition is incomplete (NodeState.incomplete): then it does not count."""
        check_batch_size(len(raw), KEY_SIZE, 1_000_000, "keys")
        keys = np.frombuffer(raw, dtype=KEY_DTYPE)
        hashes = key_hashes(raw)
        out = self.copies(keys, hashes)
        if self.inflight:
            unsettled = self.inflight.unsettled()
            for i in range(len(keys)):
                row = unsettled.get(raw[i * KEY_SIZE : (i + 1) * KEY_SIZE])
                if row is not None:
                    out[i] = row[0]
        recent = self.windows.recent()
        if recent is not None:
            found = out["status"] == Status.OK
            self.windows.pin(hashes[found & np.isin(hashes, recent)])
        parts = self.state.table.partitions_of(hashes).astype(np.intp)
        return out.tobytes(), self.state.incomplete(parts)

    def digests(self, partitions: npt.NDArray[np.intp]) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        self.check_partitions(partitions)
        digests, counts = self.partition_digests()
        if partitions.size == 0:
            return digests, counts
        return digests[partitions], counts[partitions]

    async def fetch(
        self, partitions: npt.NDArray[np.intp], settled_only: bool = False, batch: int = 20_000
    ) -> AsyncIterator[bytes]:
        self.check_partitions(partitions)
        if partitions.size == 0:
            partitions = np.arange(self.state.table.num_partitions)
        entries = self.export_entries(partitions, settled_only)
        for start in range(0, len(entries), batch):
            yield entries[start : start + batch].tobytes()
            await asyncio.sleep(0)  # let calls in flight run between batches

    def check_partitions(self, parts: npt.NDArray[np.intp]) -> None:
        if parts.size and int(parts.max()) >= self.state.table.num_partitions:
            raise InvalidArgument("partitions", f"partition {int(parts.max())} does not exist")
