"""Packed binary records of the v1 API (layouts documented in protos/dht/v1/dht.proto).

This module turns the ``bytes`` fields of batch calls into validated numpy arrays and
back, and parses/prints the human FLOW grammar used by the CLI. It never touches the
generated ``*_pb2`` classes: that is :mod:`dht.edge.convert`'s job.

FLOW grammar (case-insensitive protocol, canonical output shown by :func:`format_flow`)::

    FLOW    := PROTO "/" ENDPOINT "/" ENDPOINT          client first, then service
    PROTO   := "tcp" | "udp"
    ENDPOINT:= IPV4 ":" PORT | "[" IPV6 "]" ":" PORT     PORT is 1..65535
    e.g.  tcp/198.51.100.7:51000/192.0.2.1:443
          udp/[2001:db8::7]:51000/[2001:db8::1]:443

An IPv4-mapped IPv6 address (``[::ffff:192.0.2.1]``) is the same key as the plain IPv4
address and is printed as plain IPv4. Both endpoints must be of one family.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from dht.core.errors import InvalidArgument, LimitExceeded
from dht.core.record import TCP, UDP, Record, State, Status

FORMAT_VERSION = 1
KEY_SIZE = 40
RESULT_SIZE = 32
ADDR_SIZE = 16

KIND_FLOW = 1
KIND_AFFINITY = 2

PROTOCOLS = {"tcp": TCP, "udp": UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}

KEY_DTYPE = np.dtype(
    [
        ("kind", "u1"),
        ("proto", "u1"),
        ("caddr", "u1", (16,)),
        ("cport", ">u2"),
        ("saddr", "u1", (16,)),
        ("sport", ">u2"),
        ("reserved", ">u2"),
    ]
)
assert KEY_DTYPE.itemsize == KEY_SIZE

RESULT_DTYPE = np.dtype(
    [
        ("status", "u1"),
        ("state", "u1"),
        ("owner_pop", ">u2"),
        ("owner_server", ">u2"),
        ("birth_pop", ">u2"),
        ("generation", ">u4"),
        ("partition", ">u2"),
        ("flags", ">u2"),
        ("birth_hlc", ">u8"),
        ("expiry_ms", ">u8"),
    ]
)
assert RESULT_DTYPE.itemsize == RESULT_SIZE
# The same layout for one result at a time (the scalar fast paths): status, state,
# owner_pop, owner_server, birth_pop, generation, partition, flags, birth_hlc, expiry_ms.
RESULT_STRUCT = struct.Struct(">BBHHHIHHQQ")
assert RESULT_STRUCT.size == RESULT_SIZE

FLAG_AFFINITY_FALLBACK = 1
# Result flags bit 1: the record is another PoP's copy, found by a second chance.
FLAG_SECOND_CHANCE = 2

# A record copy as nodes exchange it (replication, hints, anti-entropy, refill): the
# 40-byte canonical key followed by the 32-byte result layout (status OK).
ENTRY_DTYPE = np.dtype([("key", KEY_DTYPE), ("rec", RESULT_DTYPE)])
ENTRY_SIZE = ENTRY_DTYPE.itemsize
assert ENTRY_SIZE == KEY_SIZE + RESULT_SIZE

_MAPPED_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)

KeyArray = npt.NDArray[np.void]
ResultArray = npt.NDArray[np.void]
EntryArray = npt.NDArray[np.void]
U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------- text form


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow 5-tuple. Addresses are kept as given; :meth:`to_bytes` canonicalises."""

    protocol: int
    client: ipaddress.IPv4Address | ipaddress.IPv6Address
    client_port: int
    service: ipaddress.IPv4Address | ipaddress.IPv6Address
    service_port: int

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_NAMES:
            raise InvalidArgument("protocol", f"unknown protocol {self.protocol} (tcp=6, udp=17)")
        for name, port in (("client_port", self.client_port), ("service_port", self.service_port)):
            if not 1 <= port <= 65535:
                raise InvalidArgument(name, f"port {port} outside 1..65535")
        c4 = _as_v4(self.client)
        s4 = _as_v4(self.service)
        if (c4 is None) != (s4 is None):
            raise InvalidArgument(
                "key", "mixed address families (client and service must both be IPv4 or IPv6)"
            )
        # Canonical form: plain IPv4 rather than IPv4-mapped IPv6.
        if c4 is not None and s4 is not None:
            object.__setattr__(self, "client", c4)
            object.__setattr__(self, "service", s4)

    def to_bytes(self) -> bytes:
        return (
            bytes((KIND_FLOW, self.protocol))
            + _addr16(self.client)
            + self.client_port.to_bytes(2, "big")
            + _addr16(self.service)
            + self.service_port.to_bytes(2, "big")
            + b"\0\0"
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> FlowKey:
        arr = decode_keys(raw, max_keys=1, kind=KIND_FLOW)
        return flow_from_record(arr[0])

    def __str__(self) -> str:
        return format_flow(self)


def _as_v4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(addr, ipaddress.IPv4Address):
        return addr
    return addr.ipv4_mapped


def _addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def addr_from16(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped or v6


def parse_address(
    text: str, field: str = "address"
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 or IPv6 address (no brackets); IPv4-mapped IPv6 comes back as IPv4."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidArgument(field, f"{text!r} is not an IPv4 or IPv6 address") from None
    return _as_v4(addr) or addr


def _parse_endpoint(
    text: str, field: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise InvalidArgument(field, f"{text!r}: want [IPV6]:PORT")
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgument(field, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise InvalidArgument(field, f"{text!r}: want IPV4:PORT or [IPV6]:PORT")
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidArgument(
                field, f"{host!r} is not an IPv4 address (write IPv6 as [addr]:port)"
            ) from None
    if not port_text.isdigit():
        raise InvalidArgument(f"{field}.port", f"{port_text!r} is not a port number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{field}.port", f"port {port} outside 1..65535")
    return addr, port


def parse_flow(text: str) -> FlowKey:
    """Parse ``PROTO/CLIENT/SERVICE``; raises InvalidArgument naming the bad part."""
    parts = text.strip().split("/")
    if len(parts) != 3:
        raise InvalidArgument("flow", f"{text!r}: want PROTO/CLIENT/SERVICE")
    proto_text, client_text, service_text = parts
    proto = PROTOCOLS.get(proto_text.lower())
    if proto is None:
        raise InvalidArgument("flow.protocol", f"{proto_text!r}: want tcp or udp")
    client, cport = _parse_endpoint(client_text, "flow.client")
    service, sport = _parse_endpoint(service_text, "flow.service")
    return FlowKey(proto, client, cport, service, sport)


def _fmt_endpoint(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    if isinstance(addr, ipaddress.IPv4Address):
        return f"{addr}:{port}"
    return f"[{addr.compressed}]:{port}"


def format_flow(key: FlowKey) -> str:
    return (
        f"{PROTOCOL_NAMES[key.protocol]}/{_fmt_endpoint(key.client, key.client_port)}"
        f"/{_fmt_endpoint(key.service, key.service_port)}"
    )


def flow_from_record(rec: np.void) -> FlowKey:
    return FlowKey(
        int(rec["proto"]),
        addr_from16(bytes(rec["caddr"])),
        int(rec["cport"]),
        addr_from16(bytes(rec["saddr"])),
        int(rec["sport"]),
    )


# --------------------------------------------------------------------------- packed keys


def _first(mask: npt.NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0])


def is_mapped_v4(addrs: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Row-wise: is this 16-byte address IPv4-mapped? ``addrs`` has shape (n, 16)."""
    mapped: npt.NDArray[np.bool_] = np.all(addrs[:, :12] == _MAPPED_PREFIX, axis=1)
    return mapped


def check_batch_size(nbytes: int, record_size: int, max_keys: int, field: str) -> int:
    if nbytes % record_size:
        raise InvalidArgument(
            field,
            f"length {nbytes} is not a multiple of the {record_size}-byte record size",
        )
    n = nbytes // record_size
    if n > max_keys:
        raise LimitExceeded(f"{field}: batch of {n} records exceeds the limit of {max_keys}")
    return n


def key_faults(arr: KeyArray, kind: int = KIND_FLOW) -> Iterator[tuple[str, BoolArray]]:
    """The checks of a packed key, in order, lazily: (reason, the rows failing it). One
    definition for the public API (:func:`decode_keys` raises on the first failing row)
    and for every internal ingress (:mod:`dht.core.ingress` refuses failing rows one by
    one). Reasons: ``kind``, ``protocol``, ``client_port``, ``service_port``,
    ``family``, ``reserved``."""
    yield "kind", arr["kind"] != kind
    yield "protocol", (arr["proto"] != TCP) & (arr["proto"] != UDP)
    yield "client_port", arr["cport"] == 0
    yield "service_port", arr["sport"] == 0
    yield "family", is_mapped_v4(arr["caddr"]) != is_mapped_v4(arr["saddr"])
    yield "reserved", arr["reserved"] != 0


def affinity_key_faults(arr: KeyArray) -> Iterator[tuple[str, BoolArray]]:
    """The checks of a kind-2 (affinity) key as :func:`affinity_keys` makes it: the
    prefix in ``caddr``, every other field zero. Reasons as :func:`key_faults`."""
    yield "kind", arr["kind"] != KIND_AFFINITY
    yield "protocol", arr["proto"] != 0
    yield "client_port", arr["cport"] != 0
    yield "service_port", (arr["sport"] != 0) | np.any(arr["saddr"] != 0, axis=1)
    yield "reserved", arr["reserved"] != 0


def _key_error(reason: str, i: int, arr: KeyArray, kind: int) -> InvalidArgument:
    if reason == "kind":
        return InvalidArgument(
            f"keys[{i}].kind", f"unknown or unexpected key kind {int(arr['kind'][i])} (want {kind})"
        )
    if reason == "protocol":
        return InvalidArgument(
            f"keys[{i}].protocol", f"unknown protocol {int(arr['proto'][i])} (tcp=6, udp=17)"
        )
    if reason in ("client_port", "service_port"):
        return InvalidArgument(f"keys[{i}].{reason}", "port 0 is not allowed")
    if reason == "family":
        return InvalidArgument(
            f"keys[{i}]",
            "mixed address families (client and service must both be IPv4-mapped or both IPv6)",
        )
    return InvalidArgument(f"keys[{i}].reserved", "must be zero")


def decode_keys(raw: bytes, max_keys: int, kind: int = KIND_FLOW) -> KeyArray:
    """Validate a packed key field and view it as a KEY_DTYPE array (no copy).

    Raises InvalidArgument naming the first bad key and field (the first failing check
    of :func:`key_faults`), or LimitExceeded."""
    n = check_batch_size(len(raw), KEY_SIZE, max_keys, "keys")
    arr = np.frombuffer(raw, dtype=KEY_DTYPE)
    if arr.size == 0:
        return arr
    if n <= _SMALL_BATCH:
        # A handful of keys (a forwarder's miss, a SYN's claim): the scalar checks, at a
        # fraction of the vectorised ones' fixed cost. A bad key falls through to them, so
        # the error is the same whatever the batch size.
        try:
            for i in range(n):
                check_key(raw[i * KEY_SIZE : (i + 1) * KEY_SIZE], i, kind)
        except InvalidArgument:
            pass
        else:
            return arr
    for reason, bad in key_faults(arr, kind):
        if bad.any():
            raise _key_error(reason, _first(bad), arr, kind)
    return arr


_MAPPED_BYTES = bytes(_MAPPED_PREFIX)
_SMALL_BATCH = 4  # decode_keys checks at most this many keys one by one


def check_key(raw: bytes, i: int = 0, kind: int = KIND_FLOW) -> None:
    """Validate one 40-byte key record ``keys[i]`` in pure Python: :func:`decode_keys`'s
    checks and messages at a fraction of its cost for a handful of keys (the scalar fast
    paths). Raises InvalidArgument naming the field."""
    if len(raw) != KEY_SIZE:
        raise InvalidArgument(f"keys[{i}]", f"length {len(raw)}: want {KEY_SIZE} bytes")
    if raw[0] != kind:
        raise InvalidArgument(
            f"keys[{i}].kind", f"unknown or unexpected key kind {raw[0]} (want {kind})"
        )
    if raw[1] != TCP and raw[1] != UDP:
        raise InvalidArgument(f"keys[{i}].protocol", f"unknown protocol {raw[1]} (tcp=6, udp=17)")
    if raw[18:20] == b"\0\0":
        raise InvalidArgument(f"keys[{i}].client_port", "port 0 is not allowed")
    if raw[36:38] == b"\0\0":
        raise InvalidArgument(f"keys[{i}].service_port", "port 0 is not allowed")
    if (raw[2:14] == _MAPPED_BYTES) != (raw[20:32] == _MAPPED_BYTES):
        raise InvalidArgument(
            f"keys[{i}]",
            "mixed address families (client and service must both be IPv4-mapped or both IPv6)",
        )
    if raw[38:40] != b"\0\0":
        raise InvalidArgument(f"keys[{i}].reserved", "must be zero")


def key_hash(raw: bytes) -> int:
    """xxh3_64 of one 40-byte key record (the same as :func:`key_hashes`' element)."""
    return xxhash.xxh3_64_intdigest(raw)


def key_hashes(raw: bytes) -> U64Array:
    """xxh3_64 of each 40-byte key record: the partition and store hash."""
    n = len(raw) // KEY_SIZE
    h = xxhash.xxh3_64_intdigest
    view = memoryview(raw)
    return np.fromiter(
        (h(view[i : i + KEY_SIZE]) for i in range(0, n * KEY_SIZE, KEY_SIZE)),
        dtype=np.uint64,
        count=n,
    )


# --------------------------------------------------------------------------- affinity keys


def prefix_mask(
    prefix_v4: int, prefix_v6: int, addrs: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """Mask (n, 16) addresses to the client prefix: IPv4-mapped ones to /prefix_v4 of the
    IPv4 part, the rest to /prefix_v6. Returns a new array."""
    v4 = is_mapped_v4(addrs)
    out = addrs.copy()
    m4 = mask_bits(96 + prefix_v4)
    m6 = mask_bits(prefix_v6)
    out[v4] &= m4
    out[~v4] &= m6
    return out


def mask_bits(bits: int, nbytes: int = 16) -> npt.NDArray[np.uint8]:
    """A byte mask keeping the first ``bits`` bits of an ``nbytes``-byte address."""
    mask = np.zeros(nbytes, dtype=np.uint8)
    full, rest = divmod(bits, 8)
    mask[:full] = 0xFF
    if rest:
        mask[full] = (0xFF << (8 - rest)) & 0xFF
    return mask


def decode_clients(raw: bytes, max_keys: int) -> npt.NDArray[np.uint8]:
    n = check_batch_size(len(raw), ADDR_SIZE, max_keys, "clients")
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, ADDR_SIZE)


def affinity_keys(prefixes: npt.NDArray[np.uint8]) -> bytes:
    """Masked (n, 16) prefixes -> packed kind-2 key records (the routing key)."""
    arr = np.zeros(len(prefixes), dtype=KEY_DTYPE)
    arr["kind"] = KIND_AFFINITY
    arr["caddr"] = prefixes
    return arr.tobytes()


# --------------------------------------------------------------------------- results


def new_results(n: int) -> ResultArray:
    return np.zeros(n, dtype=RESULT_DTYPE)


def put_result(out: ResultArray, i: int, status: Status, rec: Record | None) -> None:
    """Write one result row (scalar path, used by the mutating calls)."""
    row = out[i]
    row["status"] = status
    if rec is not None:
        row["state"] = rec.state
        row["owner_pop"] = rec.owner_pop
        row["owner_server"] = rec.owner_server
        row["birth_pop"] = rec.birth_pop
        row["generation"] = rec.generation
        row["birth_hlc"] = rec.birth_hlc
        row["expiry_ms"] = rec.expiry_ms


@dataclass(frozen=True, slots=True)
class Result:
    """One decoded result record (client side)."""

    status: Status
    state: State
    owner_pop: int
    owner_server: int
    birth_pop: int
    generation: int
    partition: int
    flags: int
    birth_hlc: int
    expiry_ms: int

    @property
    def affinity_fallback(self) -> bool:
        return bool(self.flags & FLAG_AFFINITY_FALLBACK)


def decode_results(raw: bytes) -> list[Result]:
    if len(raw) % RESULT_SIZE:
        raise InvalidArgument("results", f"length {len(raw)} is not a multiple of {RESULT_SIZE}")
    arr = np.frombuffer(raw, dtype=RESULT_DTYPE)
    return [
        Result(
            Status(int(r[0])),
            State(int(r[1])),
            int(r[2]),
            int(r[3]),
            int(r[4]),
            int(r[5]),
            int(r[6]),
            int(r[7]),
            int(r[8]),
            int(r[9]),
        )
        for r in arr.tolist()
    ]


def result_to_dict(result: Result, pop_names: Mapping[int, str]) -> dict[str, object]:
    """A result as a JSON-able dict (CLI output, admin endpoint). Record fields only when
    there is a record."""
    out: dict[str, object] = {"status": result.status.name.lower(), "partition": result.partition}
    if (
        result.status in (Status.NOT_FOUND, Status.MOVED, Status.UNAVAILABLE)
        or result.owner_pop == 0
    ):
        if result.affinity_fallback and result.owner_pop:
            # A lookup miss that names the client's preferred PoP
            # (docs/protocol.md#client-affinity).
            out["affinity_fallback"] = True
            out["preferred_pop"] = pop_names.get(result.owner_pop, str(result.owner_pop))
        return out
    out.update(
        owner_pop=pop_names.get(result.owner_pop, str(result.owner_pop)),
        owner_pop_id=result.owner_pop,
        state=result.state.name.lower(),
        expiry_ms=result.expiry_ms,
        birth_hlc=result.birth_hlc,
        birth_pop=pop_names.get(result.birth_pop, str(result.birth_pop)),
        generation=result.generation,
    )
    if result.owner_server:
        out["owner_server"] = result.owner_server
    if result.affinity_fallback:
        out["affinity_fallback"] = True
    return out
