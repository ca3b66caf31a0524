"""One validation of record copies arriving from the network
(docs/protocol.md#what-is-validated-where).

Every internal ingress that applies copies another node or PoP sent (Replicate, with
hints and anti-entropy pushes; Undo, written and before; the copies a node pulls with
FetchPartitions and ReadCopies for anti-entropy, take-overs, quorum reads, refill and
hand-off; PoP shipping, PopPush and PopFetch) passes its wire.ENTRY_DTYPE rows through
:func:`check_entries` before anything is applied. A bad entry is refused on its own,
named by one reason; the good entries of the batch are applied as usual.

The checks, per entry:

* the key as the public API checks it (:func:`dht.core.wire.key_faults`), or, for a
  kind-2 key, as :func:`dht.core.wire.affinity_keys` makes it;
* ``state`` a :class:`~dht.core.record.State` (a flow record never NONE);
* ``owner_pop`` and ``birth_pop`` PoP ids of the configuration's ``pops`` table;
* ``generation`` at most :data:`MAX_GENERATION` (a flow record's at least 1), so
  ``generation + 1`` cannot overflow the 32-bit wire field and a forged generation
  cannot outrank every real claim by a margin no real key reaches;
* the birth stamp (an affinity record's write stamp) not beyond now + the maximum
  clock offset, nor older than any live record could be: an affinity stamp is renewed by
  each write, so older than the longest TTL + tombstone extra + clock offset is refused;
  a flow's birth is kept by every refresh of a live connection, so it is bounded by
  :data:`MAX_FLOW_AGE_MS` instead (a birth near the Unix epoch would win every
  same-generation conflict);
* ``expiry_ms`` not beyond now + the longest TTL + tombstone extra + clock offset (the
  furthest any node can set it: a tombstone outlives its record by the tombstone extra).

Also the bounds on terms (:func:`term_bound`): a term is an HLC stamp (plus one per
take-over), so one further ahead than the clock offset allows is refused.

Pure: time is an argument.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dht.core.config import NodeConfig
from dht.core.errors import InvalidArgument
from dht.core.record import State, Status, hlc_pack
from dht.core.wire import (
    ENTRY_DTYPE,
    ENTRY_SIZE,
    KEY_SIZE,
    KIND_AFFINITY,
    KIND_FLOW,
    RESULT_STRUCT,
    BoolArray,
    EntryArray,
    affinity_key_faults,
    check_key,
    key_faults,
)

# Claims of one 5-tuple: each needs the previous record expired or released, so 2^24
# (16.7 M) is decades of reuse of one key; the wire field is 32 bits.
MAX_GENERATION = 1 << 24
# The oldest birth a live flow record may carry: refreshes keep a connection's birth,
# so this bounds the age of a connection (a year), not a TTL.
MAX_FLOW_AGE_MS = 366 * 86_400_000
# How far above the HLC of now + the clock offset a term may be: a node proposes
# max(its HLC now, the highest promise + 1), so real terms exceed a clock by one per
# take-over, far less than a minute of HLC stamps (65,536 per ms).
TERM_SLACK_MS = 60_000

# Every reason an entry can be refused for, in the order they are checked (an entry
# failing several is counted under the first). Metric label values.
REASONS = (
    "key_kind",
    "key_protocol",
    "key_client_port",
    "key_service_port",
    "key_family",
    "key_reserved",
    "state",
    "owner_pop",
    "birth_pop",
    "generation",
    "birth_ahead",
    "birth_too_old",
    "expiry_too_far",
)
_CODE = {r: i + 1 for i, r in enumerate(REASONS)}


@dataclass(frozen=True, slots=True)
class Bounds:
    """What an entry is checked against, from the configuration."""

    pops: frozenset[int]
    max_clock_offset_ms: int
    # The furthest ahead of its writer's clock an expiry can be: the longest TTL plus
    # the tombstone extra.
    longest_ms: int

    @classmethod
    def of(cls, config: NodeConfig) -> Bounds:
        t = config.ttl
        longest = max(t.max_ms, t.embryonic_ms, t.established_tcp_ms, t.established_udp_ms)
        return cls(
            pops=frozenset(config.pops.values()),
            max_clock_offset_ms=config.max_clock_offset_ms,
            longest_ms=longest + t.tombstone_extra_ms,
        )


@functools.lru_cache(maxsize=8)
def _pop_table(pops: frozenset[int]) -> BoolArray:
    """Per 16-bit PoP id: is it one of ``pops``? (An index into it costs a fraction of
    ``np.isin`` on the few rows of a typical batch.)"""
    table = np.zeros(1 << 16, dtype=np.bool_)
    table[sorted(pops)] = True
    return table


@dataclass(frozen=True, slots=True)
class Checked:
    """The verdict on a batch: ``ok`` per entry, and the refused ones counted by reason
    (only reasons that occurred)."""

    ok: BoolArray
    refused: Mapping[str, int]

    @property
    def all_ok(self) -> bool:
        return not self.refused

    @property
    def n_refused(self) -> int:
        return sum(self.refused.values())


# Batches of at most this many entries try the scalar checks first (:func:`_all_ok`).
SMALL_BATCH = 4


def check_entries(
    entries: EntryArray, bounds: Bounds, now_ms: int, *, records_optional: bool = False
) -> Checked:
    """Check wire.ENTRY_DTYPE rows (see the module docstring). ``records_optional``: a
    row whose status is not OK carries no record (an undo's "before" of a key that was
    not held) and only its key is checked.

    A batch of at most :data:`SMALL_BATCH` entries (a replica's copy of one client call,
    a quiet moment's shipment) is first checked entry by entry in pure Python, at a
    fraction of the column checks' fixed cost; any entry that fails there sends the
    batch to the column checks, which name the reasons."""
    # astype: the wire layout (big-endian) even if numpy made the rows native-order
    # (np.concatenate of structured rows does); a no-op otherwise.
    if 0 < len(entries) <= SMALL_BATCH and _all_ok(
        entries.astype(ENTRY_DTYPE, copy=False).tobytes(), bounds, now_ms, records_optional
    ):
        return Checked(np.ones(len(entries), dtype=np.bool_), {})
    return check_columns(entries, bounds, now_ms, records_optional=records_optional)


def _all_ok(raw: bytes, bounds: Bounds, now_ms: int, records_optional: bool) -> bool:
    """Does every entry of ``raw`` (packed wire.ENTRY_DTYPE rows) pass every check of
    :func:`check_columns`? The same checks, one entry at a time."""
    ahead_ms = now_ms + bounds.max_clock_offset_ms
    far = max(0, ahead_ms + bounds.longest_ms)
    pops = bounds.pops
    for at in range(0, len(raw), ENTRY_SIZE):
        key = raw[at : at + KEY_SIZE]
        kind = key[0]
        if kind == KIND_FLOW:
            try:
                check_key(key, 0, KIND_FLOW)
            except InvalidArgument:
                return False
        elif kind == KIND_AFFINITY:
            # affinity_key_faults: the prefix in caddr, every other field zero.
            if key[1] != 0 or key[18:20] != b"\0\0" or any(key[20:40]):
                return False
        else:
            return False
        status, state, owner, _, birth_pop, gen, _, _, birth_hlc, expiry = (
            RESULT_STRUCT.unpack_from(raw, at + KEY_SIZE)
        )
        if records_optional and status != Status.OK:
            continue
        is_flow = kind == KIND_FLOW
        if state > State.RELEASED or (is_flow and state < State.EMBRYONIC):
            return False
        if owner not in pops or birth_pop not in pops:
            return False
        if gen > MAX_GENERATION or (is_flow and gen == 0):
            return False
        birth = birth_hlc >> 16
        oldest = now_ms - (MAX_FLOW_AGE_MS if is_flow else bounds.longest_ms + ahead_ms - now_ms)
        if birth > ahead_ms or birth < oldest or expiry > far:
            return False
    return True


def check_columns(
    entries: EntryArray, bounds: Bounds, now_ms: int, *, records_optional: bool = False
) -> Checked:
    """:func:`check_entries` on columns, for any batch size."""
    n = len(entries)
    code = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return Checked(code == 0, {})

    def fail(reason: str, rows: npt.NDArray[np.intp], bad: BoolArray) -> None:
        if not bad.any():
            return
        hit = rows[bad]
        hit = hit[code[hit] == 0]
        code[hit] = _CODE[reason]

    keys = entries["key"]
    kinds = keys["kind"]
    flows = np.flatnonzero(kinds == KIND_FLOW)
    aff = np.flatnonzero(kinds == KIND_AFFINITY)
    code[(kinds != KIND_FLOW) & (kinds != KIND_AFFINITY)] = _CODE["key_kind"]
    if flows.size:
        for reason, bad in key_faults(keys[flows], KIND_FLOW):
            fail("key_" + reason, flows, bad)
    if aff.size:
        for reason, bad in affinity_key_faults(keys[aff]):
            fail("key_" + reason, aff, bad)

    rec = entries["rec"]
    has = np.ones(n, dtype=bool)
    if records_optional:
        has = rec["status"] == Status.OK
    flows, aff = flows[has[flows]], aff[has[aff]]
    known = _pop_table(bounds.pops)
    ahead_ms = now_ms + bounds.max_clock_offset_ms
    for rows, is_flow in ((flows, True), (aff, False)):
        if not rows.size:
            continue
        r = rec[rows]
        state = r["state"]
        if is_flow:
            fail("state", rows, (state < State.EMBRYONIC) | (state > State.RELEASED))
        else:
            fail("state", rows, state > State.RELEASED)
        fail("owner_pop", rows, ~known[r["owner_pop"]])
        fail("birth_pop", rows, ~known[r["birth_pop"]])
        gen = r["generation"]
        bad_gen = gen > MAX_GENERATION
        if is_flow:
            bad_gen |= gen == 0
        fail("generation", rows, bad_gen)
        birth = (r["birth_hlc"] >> np.uint64(16)).astype(np.int64)
        fail("birth_ahead", rows, birth > ahead_ms)
        oldest = now_ms - (MAX_FLOW_AGE_MS if is_flow else bounds.longest_ms + ahead_ms - now_ms)
        fail("birth_too_old", rows, birth < oldest)
        far = np.uint64(max(0, ahead_ms + bounds.longest_ms))
        fail("expiry_too_far", rows, r["expiry_ms"] > far)

    ok: BoolArray = code == 0
    if ok.all():
        return Checked(ok, {})
    counts = np.bincount(code, minlength=len(REASONS) + 1)
    refused = {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS) if counts[i + 1]}
    return Checked(ok, refused)


def term_bound(max_clock_offset_ms: int, now_ms: int) -> int:
    """The highest term a node accepts (in a Promise, a coordinated Replicate or an
    Undo) at wall time ``now_ms``: far below 2^64, so no term arithmetic overflows."""
    return hlc_pack(now_ms + max_clock_offset_ms + TERM_SLACK_MS, 0xFFFF)
