"""Property-based fuzzing of every gRPC method of a real node (docs/operations.md#fuzzing).

Hypothesis strategies make a request for each method of ``FlowTable``, ``NodeInternal``
and ``PopLink`` (random bytes in bytes fields, near-valid key and entry records, boundary
integers 0, 1, 2^31, 2^32-1, 2^63, 2^64-1, random lengths), and sometimes bytes that are
no message at all. :class:`FuzzTarget` runs one node of the test profile in a background
thread's event loop (its wall clock frozen, so nothing expires between two looks at its
state), sends each case over gRPC on loopback to the method's plane (FlowTable: public
port, NodeInternal and PopLink: peer port; docs/security.md#planes), and checks after it:

- the answer's status is one of :data:`ALLOWED` (never INTERNAL or UNKNOWN, never stuck);
- the node still answers a Claim and a Lookup of a fresh key: CREATED, then OK. Gossip
  (``Ping``, ``PingReq``; :data:`GOSSIP`) goes to a node of its own, which only has to
  answer the calls: without TLS nothing authenticates a fuzzed Ping, which may add members
  that exist nowhere; keys placed on them answer UNAVAILABLE (``degraded``, no failure);
- ``node.live()``: no background loop died or keeps failing, and no loop step failed
  (an item skipped) while the case ran;
- a refused call (any status but OK) changed nothing: records, affinity, promised terms.

``tests/integration/test_fuzz.py`` runs a fixed, derandomized count per method in CI;
``scripts/fuzz.py --cases N`` runs N cases and prints the counts (docs/operations.md).
This module needs ``hypothesis`` (a development dependency); nothing else imports it.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from hypothesis import strategies as st

from dht._proto.dht.v1 import dht_pb2 as pb
from dht.core.config import build_config
from dht.core.record import hlc_pack
from dht.core.wire import RESULT_STRUCT, decode_results
from dht.edge.server import NodeServer

BOUNDARY = (0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)
# The node's frozen wall clock (Unix ms): records stamped near it pass the clock checks.
NOW_MS = 1_800_000_000_000
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
CALL_TIMEOUT_S = 15.0
GOSSIP = frozenset({"Ping", "PingReq"})  # change the membership view (see above)
S = st.SearchStrategy
PUBLIC = "/dht.v1.FlowTable/"  # the public plane's methods; the rest are on the peer plane

# ------------------------------------------------------------------ strategies


def uint(bits: int) -> S[int]:
    """An unsigned integer of ``bits`` bits, boundaries (and their neighbours) first."""
    top = 2**bits - 1
    edges = sorted({v for b in BOUNDARY for v in (b, b - 1, b + 1) if 0 <= v <= top} | {top})
    return st.one_of(st.sampled_from(edges), st.integers(0, top))


def _ip16() -> S[bytes]:
    v4 = st.binary(min_size=4, max_size=4).map(lambda a: b"\0" * 10 + b"\xff\xff" + a)
    return st.one_of(v4, st.binary(min_size=16, max_size=16))


def valid_key() -> S[bytes]:
    """A flow key record the public API accepts (mostly)."""
    return st.builds(
        lambda proto, ca, cp, sa, sp: bytes([1, proto]) + ca + cp + sa + sp + b"\0\0",
        st.sampled_from([6, 17]),
        st.binary(min_size=4, max_size=4).map(lambda a: b"\0" * 10 + b"\xff\xff" + a),
        st.integers(1, 65535).map(lambda p: p.to_bytes(2, "big")),
        st.binary(min_size=4, max_size=4).map(lambda a: b"\0" * 10 + b"\xff\xff" + a),
        st.integers(1, 65535).map(lambda p: p.to_bytes(2, "big")),
    )


def _mutate(raw: bytes, at: int, value: int) -> bytes:
    at %= len(raw)
    return raw[:at] + bytes([value]) + raw[at + 1 :]


def key40() -> S[bytes]:
    """One 40-byte key record: valid, one byte off, the other kind, or noise."""
    return st.one_of(
        valid_key(),
        st.builds(_mutate, valid_key(), st.integers(0, 39), st.integers(0, 255)),
        st.builds(lambda ca: bytes([2, 0]) + ca + b"\0" * 22, _ip16()),
        st.binary(min_size=40, max_size=40),
    )


def result32() -> S[bytes]:
    """One 32-byte result (record) layout: fields near valid values and at boundaries."""
    hlc = st.one_of(st.integers(-60_000, 60_000).map(lambda d: hlc_pack(NOW_MS + d, 0)), uint(64))
    expiry = st.one_of(st.integers(-60_000, 10**7).map(lambda d: NOW_MS + d), uint(64))
    structured = st.builds(
        RESULT_STRUCT.pack,
        st.integers(0, 255),  # status
        st.one_of(st.integers(0, 4), st.integers(0, 255)),  # state
        st.one_of(st.integers(0, 4), uint(16)),  # owner_pop
        uint(16),  # owner_server
        st.one_of(st.integers(0, 4), uint(16)),  # birth_pop
        uint(32),  # generation
        uint(16),  # partition
        uint(16),  # flags
        hlc,
        expiry,
    )
    return st.one_of(structured, st.binary(min_size=32, max_size=32))


def records(item: S[bytes], size: int, good: S[bytes] | None = None, most: int = 6) -> S[bytes]:
    """A packed array of records: of ``good`` ones (mostly), of any ``item``, cut short,
    or random bytes."""
    joined = st.lists(item, max_size=most).map(b"".join)
    cut = st.builds(lambda raw, n: raw[: max(0, len(raw) - n)], joined, st.integers(1, size))
    fine = st.lists(item if good is None else good, min_size=1, max_size=most).map(b"".join)
    return mostly(fine, st.one_of(joined, cut, st.binary(max_size=3 * size)))


def packed(fmt: str, values: S[int], most: int = 8) -> S[bytes]:
    """Big-endian packed integers (partitions, terms, positions), or random bytes."""
    width = struct.calcsize(fmt)
    good = st.lists(values, max_size=most).map(lambda v: struct.pack(f">{len(v)}{fmt}", *v))
    return st.one_of(good, st.binary(max_size=3 * width + 1))


def mostly(good: S[Any], bad: S[Any]) -> S[Any]:
    """``good`` three times in four: a case with every field valid is common enough to
    reach the deep paths, while each field still gets its boundaries."""
    # (st.one_of would merge the three equal branches into one.)
    return st.sampled_from((True, True, True, False)).flatmap(lambda ok: good if ok else bad)


def _version() -> S[int]:
    return mostly(st.just(1), uint(32))


def _pop() -> S[int]:
    return mostly(st.integers(0, 3), uint(32))


def _peer_pop() -> S[int]:
    return mostly(st.sampled_from([2, 3]), uint(32))


def _num_partitions() -> S[int]:
    return mostly(st.just(4096), uint(32))


def _ttl() -> S[int]:
    return mostly(st.sampled_from([0, 5, 30, 60]), uint(32))


def _text() -> S[str]:
    return st.one_of(st.text(max_size=24), st.sampled_from(["", "fuzz-1", "ams-2", "x" * 300]))


def _address() -> S[str]:
    # Closed loopback ports answer fast; the rest is garbage the node must survive.
    closed = st.integers(1, 1023).map(lambda p: f"127.0.0.1:{p}")
    return st.one_of(closed, st.text(max_size=30), st.just("[::1]:0"))


def member() -> S[pb.MemberState]:
    return st.builds(
        pb.MemberState,
        node_id=_text(),
        address=_address(),
        admin_address=_address(),
        incarnation=uint(64),
        peer_address=_address(),
        status=st.one_of(st.integers(0, 4), uint(31)),
    )


def flow_request() -> S[pb.FlowBatchRequest]:
    return st.builds(
        pb.FlowBatchRequest,
        format_version=_version(),
        keys=records(key40(), 40, valid_key()),
        pop=_pop(),
        server=mostly(st.integers(0, 65535), uint(32)),
        ttl_s=_ttl(),
        epoch=uint(64),
        no_forward=st.booleans(),
        forwarded=st.booleans(),
    )


def affinity_request() -> S[pb.AffinityRequest]:
    return st.builds(
        pb.AffinityRequest,
        format_version=_version(),
        clients=records(_ip16(), 16),
        pop=_pop(),
        ttl_s=_ttl(),
        epoch=uint(64),
        no_forward=st.booleans(),
        forwarded=st.booleans(),
    )


def _entries() -> S[bytes]:
    good = st.builds(bytes.__add__, valid_key(), result32())
    return records(st.builds(bytes.__add__, key40(), result32()), 72, good)


def ship_batch() -> S[pb.ShipBatch]:
    return st.builds(
        pb.ShipBatch,
        format_version=_version(),
        seq=uint(64),
        entries=_entries(),
        from_pop=_peer_pop(),
        from_node=_text(),
        sent_hlc=st.one_of(st.just(hlc_pack(NOW_MS, 0)), uint(64)),
        num_partitions=_num_partitions(),
    )


def _undo_of(n: int) -> S[pb.UndoRequest]:
    """An undo of ``n`` keys, as written and as before (same keys, other records), with
    ``n`` terms: past the size and key checks, into the undo itself."""

    rows = st.lists(result32(), min_size=n, max_size=n)
    terms = st.lists(st.one_of(st.just(hlc_pack(NOW_MS, 0)), uint(64)), min_size=n, max_size=n).map(
        lambda t: struct.pack(f">{n}Q", *t)
    )
    return st.builds(
        lambda keys, w, b, from_node, t: pb.UndoRequest(
            from_node=from_node,
            written=b"".join(k + r for k, r in zip(keys, w, strict=True)),
            before=b"".join(k + r for k, r in zip(keys, b, strict=True)),
            terms=t,
        ),
        st.lists(valid_key(), min_size=n, max_size=n),
        rows,
        rows,
        _text(),
        terms,
    )


_parts = packed("H", st.one_of(st.integers(0, 4095), uint(16)))

# method -> (path, shape, request strategy); shape: uu, us (stream out), ss (stream both)
METHODS: dict[str, tuple[str, str, S[Any]]] = {
    **{
        m: (f"/dht.v1.FlowTable/{m}", "uu", flow_request())
        for m in ("Claim", "Confirm", "Lookup", "Refresh", "Release")
    },
    "GetAffinity": ("/dht.v1.FlowTable/GetAffinity", "uu", affinity_request()),
    "SetAffinity": ("/dht.v1.FlowTable/SetAffinity", "uu", affinity_request()),
    "GetPartitionTable": (
        "/dht.v1.FlowTable/GetPartitionTable",
        "uu",
        st.just(pb.PartitionTableRequest()),
    ),
    "Ping": (
        "/dht.v1.NodeInternal/Ping",
        "uu",
        st.builds(
            pb.PingRequest,
            from_node=_text(),
            epoch=uint(64),
            members=st.lists(member(), max_size=4),
        ),
    ),
    "PingReq": (
        "/dht.v1.NodeInternal/PingReq",
        "uu",
        st.builds(
            pb.PingReqRequest, from_node=_text(), target_node=_text(), target_address=_address()
        ),
    ),
    "Replicate": (
        "/dht.v1.NodeInternal/Replicate",
        "uu",
        st.builds(
            pb.EntryBatch,
            format_version=_version(),
            entries=_entries(),
            from_node=_text(),
            hinted=st.booleans(),
            issued_hlc=st.one_of(st.just(0), st.just(hlc_pack(NOW_MS, 0)), uint(64)),
            terms=packed("Q", uint(64)),
        ),
    ),
    "Promise": (
        "/dht.v1.NodeInternal/Promise",
        "uu",
        st.builds(pb.PromiseRequest, from_node=_text(), partitions=_parts, term=uint(64)),
    ),
    "Undo": (
        "/dht.v1.NodeInternal/Undo",
        "uu",
        mostly(
            st.integers(1, 4).flatmap(_undo_of),
            st.builds(
                pb.UndoRequest,
                from_node=_text(),
                written=_entries(),
                before=_entries(),
                terms=packed("Q", uint(64)),
            ),
        ),
    ),
    "ReadCopies": (
        "/dht.v1.NodeInternal/ReadCopies",
        "uu",
        st.builds(
            pb.CopiesRequest,
            format_version=_version(),
            keys=records(key40(), 40, valid_key()),
        ),
    ),
    "PartitionDigests": (
        "/dht.v1.NodeInternal/PartitionDigests",
        "uu",
        st.builds(pb.DigestRequest, partitions=_parts),
    ),
    "FetchPartitions": (
        "/dht.v1.NodeInternal/FetchPartitions",
        "us",
        st.builds(pb.FetchRequest, partitions=_parts, settled_only=st.booleans()),
    ),
    "Ship": ("/dht.v1.PopLink/Ship", "ss", st.lists(ship_batch(), min_size=1, max_size=3)),
    "PopDigests": (
        "/dht.v1.PopLink/PopDigests",
        "uu",
        st.builds(
            pb.PopDigestRequest,
            from_pop=_peer_pop(),
            partitions=_parts,
            num_partitions=_num_partitions(),
            cutoff_ms=st.one_of(st.just(NOW_MS), uint(64)),
        ),
    ),
    "PopFetch": (
        "/dht.v1.PopLink/PopFetch",
        "us",
        st.builds(
            pb.PopFetchRequest,
            from_pop=_peer_pop(),
            partitions=_parts,
            num_partitions=_num_partitions(),
            cutoff_ms=st.one_of(st.just(NOW_MS), uint(64)),
        ),
    ),
    "PopPush": ("/dht.v1.PopLink/PopPush", "uu", ship_batch()),
}


def _serialize(request: Any) -> bytes:
    if isinstance(request, bytes):
        return request
    if isinstance(request, list):
        raise TypeError("a stream is serialized message by message")
    out: bytes = request.SerializeToString()
    return out


def request_for(method: str) -> S[Any]:
    """A case for ``method``: its message (mostly), or bytes that may be no message."""
    _, shape, strategy = METHODS[method]
    noise = st.binary(min_size=1, max_size=64)
    if shape == "ss":
        return mostly(strategy, st.lists(noise, min_size=1, max_size=2))
    return mostly(strategy, noise)


def any_case() -> S[tuple[str, Any]]:
    return st.sampled_from(sorted(METHODS)).flatmap(lambda m: st.tuples(st.just(m), request_for(m)))


# ------------------------------------------------------------------ the target


@dataclass
class Counts:
    cases: int = 0
    crashes: int = 0  # the call or the probe did not complete (stuck, no answer, harness)
    internal: int = 0  # INTERNAL or UNKNOWN answers
    other_status: int = 0  # any status outside ALLOWED but INTERNAL/UNKNOWN
    dead_loops: int = 0  # cases after which node.failed_loops was not empty
    loop_errors: int = 0  # cases during which a background loop's step failed (skipped)
    unauthorised_changes: int = 0  # state changed by a call that was refused
    degraded: int = 0  # gossip target: a fresh key answered, but not CREATED/OK
    by_status: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def failures(self) -> int:
        return (
            self.crashes
            + self.internal
            + self.other_status
            + self.dead_loops
            + self.loop_errors
            + self.unauthorised_changes
        )


class FuzzTarget:
    """One node of the test profile in a background thread's event loop, and a blocking
    gRPC channel per plane. ``case(method, request)`` returns the problems it saw."""

    def __init__(self, strict: bool = True, counts: Counts | None = None) -> None:
        self.strict = strict
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-node", daemon=True)
        self._thread.start()
        values: dict[str, Any] = {
            "profile": "test",
            "node_id": "fuzz-1",
            "pop": "ams",
            "pops": {"ams": 1, "fra": 2, "lon": 3},
            "grpc_port": 0,
            "admin_port": -1,
            "udp_lookup_port": -1,
        }
        self.server = NodeServer(build_config(values), wall_ms=lambda: NOW_MS)
        self._call(self.server.start(), 30)
        self._call(self._ready(), 30)
        self.channel = grpc.insecure_channel(self.server.grpc_address)
        self.peer_channel = grpc.insecure_channel(self.server.peer_address)
        self._fresh = 0
        self.counts = counts or Counts()

    def _call(self, coro: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _ready(self) -> None:
        node = self.server.node
        for _ in range(1500):  # 30 s
            if node.in_sync and node.accepting:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("the fuzz node did not become ready")

    def close(self) -> None:
        self.channel.close()
        self.peer_channel.close()
        try:
            self._call(self.server.stop(leave=False), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    # ---------------------------------------------------------------- one case

    async def _fingerprint(self) -> bytes:
        """What a refused call must not change: records, affinity, promised terms."""
        node = self.server.node
        sums, counts = node.partition_digests()
        h = hashlib.blake2b(digest_size=16)
        for part in (sums.tobytes(), counts.tobytes(), node.terms.promised.tobytes()):
            h.update(part)
        h.update(str((len(node.store), len(node.affinity))).encode())
        return h.digest()

    def _method(self, path: str, shape: str) -> Any:
        """A raw-bytes callable on the method's plane (the case's bytes go out as they are)."""
        ch = self.channel if path.startswith(PUBLIC) else self.peer_channel
        if shape == "uu":
            return ch.unary_unary(path)
        return ch.unary_stream(path) if shape == "us" else ch.stream_stream(path)

    def _send(self, method: str, request: Any) -> grpc.StatusCode:
        path, shape, _ = METHODS[method]
        call = self._method(path, shape)
        try:
            if shape == "uu":
                call(_serialize(request), timeout=CALL_TIMEOUT_S)
            elif shape == "us":
                for _ in call(_serialize(request), timeout=CALL_TIMEOUT_S):
                    pass
            else:
                stream = request if isinstance(request, list) else [request]
                for _ in call(iter([_serialize(m) for m in stream]), timeout=CALL_TIMEOUT_S):
                    pass
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
        return grpc.StatusCode.OK

    def _fresh_key(self) -> bytes:
        # A client address of its own /24 per case: no prefix quota is ever reached.
        self._fresh += 1
        client = (0x01000000 + self._fresh * 256).to_bytes(4, "big")
        mapped = b"\0" * 10 + b"\xff\xff"
        return (
            bytes([1, 6])
            + mapped
            + client
            + (40000).to_bytes(2, "big")
            + mapped
            + bytes([192, 0, 2, 1])
            + (443).to_bytes(2, "big")
            + b"\0\0"
        )

    def _still_serves(self) -> str | None:
        key = self._fresh_key()
        req = pb.FlowBatchRequest(format_version=1, keys=key).SerializeToString()
        for name in ("Claim", "Lookup"):
            try:
                raw: bytes = self._method(f"/dht.v1.FlowTable/{name}", "uu")(
                    req, timeout=CALL_TIMEOUT_S
                )
            except grpc.RpcError as e:
                return f"fresh {name} answered {e.code().name}: {e.details()}"
            status = decode_results(pb.FlowBatchResponse.FromString(raw).results)[0].status
            want = "CREATED" if name == "Claim" else "OK"
            if status.name != want and not self.strict:
                self.counts.degraded += 1
                return None
            if status.name != want:
                return f"fresh {name} of a new key answered {status.name}, want {want}"
        return None

    def case(self, method: str, request: Any) -> list[str]:
        """Send one case and check the node after it; the problems seen (none: fine)."""
        c = self.counts
        c.cases += 1
        problems: list[str] = []
        tasks = self.server.node.tasks
        errors_before = sum(tasks.errors.values())
        try:
            before = self._call(self._fingerprint())
            code = self._send(method, request)
            after = self._call(self._fingerprint())
        except Exception as e:  # the harness or the node's loop is broken
            c.crashes += 1
            problems.append(f"crash: {type(e).__name__}: {e}")
            return self._note(method, request, problems)
        c.by_status[code.name] += 1
        c.by_method[f"{method} {code.name}"] += 1
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            c.internal += 1
            problems.append(f"answered {code.name}")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            c.crashes += 1
            problems.append(f"no answer within {CALL_TIMEOUT_S} s")
        elif code not in ALLOWED:
            c.other_status += 1
            problems.append(f"answered {code.name}")
        if code != grpc.StatusCode.OK and before != after:
            c.unauthorised_changes += 1
            problems.append(f"state changed by a call answered {code.name}")
        failed = self.server.node.failed_loops
        if failed or not self.server.node.live():
            c.dead_loops += 1
            problems.append(f"loops failed: {failed}")
        errors = sum(tasks.errors.values()) - errors_before
        if errors:
            c.loop_errors += 1
            problems.append(f"{errors} loop step(s) failed: {tasks.last_error}")
        broken = self._still_serves()
        if broken is not None:
            c.crashes += 1
            problems.append(broken)
        return self._note(method, request, problems)

    def _note(self, method: str, request: Any, problems: list[str]) -> list[str]:
        if problems and len(self.counts.examples) < 20:
            shown = repr(request)
            self.counts.examples.append(f"{method}: {'; '.join(problems)} <- {shown[:400]}")
        return problems


def report(counts: Counts) -> Iterator[str]:
    yield f"cases                  {counts.cases}"
    yield f"crashes                {counts.crashes}"
    yield f"INTERNAL/UNKNOWN       {counts.internal}"
    yield f"other bad status       {counts.other_status}"
    yield f"dead loops             {counts.dead_loops}"
    yield f"loop steps failed      {counts.loop_errors}"
    yield f"unauthorised changes   {counts.unauthorised_changes}"
    yield f"degraded (gossip node) {counts.degraded}"
    yield "answers: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.by_status.items()))
    yield "per method: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.by_method.items()))
    for example in counts.examples:
        yield f"  example: {example}"
