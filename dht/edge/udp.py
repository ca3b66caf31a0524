"""A lean binary Lookup over UDP, beside gRPC: the lowest-latency path for one forwarder
cache miss (docs/api.md#udp-lookup). Off unless ``udp_lookup_port`` is set.

Why: with one request in flight, a grpc.aio unary call costs ~0.3-0.7 ms here (HTTP/2
framing and the asyncio <-> C-core hand-off, docs/benchmarks.md#baselines), several times a loopback
round trip (~71 us). One datagram each way, handled inside the node's event loop and
answered from the store in pure Python, costs about what a Redis GET does.

Datagram layouts (big-endian; the same 40-byte key and 32-byte result records as the gRPC
batch calls, dht/wire.py)::

    request   version(1)=1 op(1)=1 count(2)=N request_id(4)  N x 40-byte key
    answer    version(1)=1 code(1) count(2)=N request_id(4)  N x 32-byte result  (code 0)
                                                              UTF-8 error text     (code != 0)

``1 <= N <= MAX_KEYS`` (32 keys: a request stays within a 1500-byte MTU). ``code`` is the
gRPC status number of the same failure over gRPC: 0 OK, 3 INVALID_ARGUMENT (the text
names the field, as gRPC's would), 8 RESOURCE_EXHAUSTED, 13 INTERNAL, 14 UNAVAILABLE.
``request_id`` is echoed so a client can drop late answers to requests it gave up on.

Semantics are the gRPC Lookup's: a key the node is the in-sync, authoritative primary of
is answered from its copy at once (:meth:`dht.node.node.Node.lookup_local`); any other key takes
the full path (:meth:`dht.node.node.Node.batch`: quorum read, one-hop forward), so a stale
client table costs a hop, never a wrong answer.

Safety: plaintext and unauthenticated (read-only), so the config refuses it together with
TLS; bind it only where forwarders live. An answer is never longer than the request it
answers (results are 32 bytes per 40-byte key, error text is cut to fit), so the listener
cannot amplify spoofed traffic; datagrams shorter than the 8-byte header are dropped (there
is no request id to answer) and counted as ``dht_requests_total{method="UdpLookup",
code="DROPPED"}``. So are datagrams that need the full path while ``udp_max_inflight`` of
them are already on it: a flood of keys this node cannot answer alone costs bounded memory
and leaves the event loop to the rest of the node (the client resends).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from typing import cast

import grpc
import numpy as np

from dht.core.errors import DhtError, InvalidArgument, Unavailable
from dht.core.ops import BatchCall, Op
from dht.core.placement import PartitionMap
from dht.core.record import State, Status
from dht.core.udp_wire import HEADER, MAX_KEYS, OP_LOOKUP, OP_LOOKUP_SECOND_CHANCE, OPS, VERSION
from dht.core.wire import (
    KEY_SIZE,
    RESULT_DTYPE,
    ResultArray,
    check_key,
    key_hash,
    key_hashes,
)
from dht.edge.status import grpc_status, udp_answer
from dht.node.node import Node

log = logging.getLogger(__name__)

METHOD = "UdpLookup"


def _grpc_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


class UdpLookupProtocol(asyncio.DatagramProtocol):
    """The server side, in the node's event loop. Keys that need the full path are
    answered by a task owned here (``stop`` waits for them, bounded)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = node.metrics.requests
        self._max_inflight = node.config.udp_max_inflight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if len(data) < HEADER.size:
            self._count.labels(METHOD, "DROPPED").inc()
            return
        version, op, count, rid = HEADER.unpack_from(data)
        try:
            keys = self._validate(data, version, op, count)
            self.node.overload.admit()  # shed while overloaded (docs/operations.md#overload)
            answers = [self.node.lookup_local(k) for k in keys]
        except DhtError as e:
            self._error(addr, rid, len(data), grpc_status(e), str(e))
            return
        except Exception:  # a bug, not bad input: answer INTERNAL, keep serving
            log.exception("UDP lookup failed")
            self._error(addr, rid, len(data), grpc.StatusCode.INTERNAL, "internal error")
            return
        if all(a is not None for a in answers) and (
            op == OP_LOOKUP or not any(_asks_elsewhere(a) for a in answers if a is not None)
        ):
            self._send(addr, 0, rid, b"".join(a for a in answers if a is not None), count)
            return
        # Some key is not this node's to answer alone: the full path, off the fast path.
        if len(self._tasks) >= self._max_inflight:
            self._count.labels(METHOD, "DROPPED").inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._full_path(addr, rid, data[HEADER.size :], count, len(data), op)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _validate(self, data: bytes, version: int, op: int, count: int) -> list[bytes]:
        if version != VERSION:
            raise InvalidArgument("version", f"{version} is not supported (want {VERSION})")
        if op not in OPS:
            raise InvalidArgument(
                "op", f"{op} is not a known operation (lookup=1, lookup with second chance=2)"
            )
        if not 1 <= count <= MAX_KEYS:
            raise InvalidArgument("count", f"{count} outside 1..{MAX_KEYS}")
        body = len(data) - HEADER.size
        if body != count * KEY_SIZE:
            raise InvalidArgument(
                "keys", f"length {body} is not count {count} x {KEY_SIZE}-byte records"
            )
        keys = [data[o : o + KEY_SIZE] for o in range(HEADER.size, len(data), KEY_SIZE)]
        for i, k in enumerate(keys):
            check_key(k, i)
        return keys

    async def _full_path(self, addr: tuple[str | object, ...], rid: int, keys: bytes, count: int,
                         size: int, op: int) -> None:  # fmt: skip
        try:
            call = BatchCall(Op.LOOKUP, keys, second_chance=op == OP_LOOKUP_SECOND_CHANCE)
            results = await self.node.batch(call)
        except DhtError as e:
            self._error(addr, rid, size, grpc_status(e), str(e))
            return
        except Exception:
            log.exception("UDP lookup failed")
            self._error(addr, rid, size, grpc.StatusCode.INTERNAL, "internal error")
            return
        self._send(addr, 0, rid, results, count)

    def _error(self, addr: tuple[str | object, ...], rid: int, size: int,
               code: grpc.StatusCode, text: str) -> None:  # fmt: skip
        # Never longer than the request: no amplification of spoofed traffic.
        room = max(0, size - HEADER.size)
        self._send(addr, _grpc_number(code), rid, text.encode()[:room], 0, code.name)

    def _send(self, addr: tuple[str | object, ...], code: int, rid: int, body: bytes, count: int,
              label: str = "OK") -> None:  # fmt: skip
        self._count.labels(METHOD, label).inc()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(HEADER.pack(VERSION, code, count, rid) + body, addr)

    async def stop(self, timeout_s: float) -> None:
        """Stop receiving; give full-path answers in flight ``timeout_s``, then cancel."""
        if self.transport is not None:
            self.transport.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def start_listener(node: Node, host: str, port: int) -> UdpLookupProtocol:
    """Bind the UDP lookup listener on ``host:port``; raises OSError if it cannot."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: UdpLookupProtocol(node), local_addr=(host, port)
    )
    return protocol


class UdpLookupClient:
    """Blocking client: each key goes to its partition's primary (from a partition table,
    e.g. ``dht.client.Client.table``) on the UDP port of that node. One request in flight;
    a lost datagram is resent after ``timeout_s`` (``retries`` times), and late answers to
    an earlier request are recognised by their id and dropped. Not thread-safe.

    ``port_of`` maps a member's gRPC address to its UDP lookup address; the default is
    the same host and port number (``udp_lookup_port = 0``)."""

    def __init__(
        self,
        table: PartitionMap,
        *,
        port_of: dict[str, tuple[str, int]] | None = None,
        timeout_s: float = 0.5,
        retries: int = 3,
    ) -> None:
        self.table = table
        self.timeout_s = timeout_s
        self.retries = retries
        self._addr: list[tuple[str, int]] = []
        for m in table.members:
            if port_of and m.address in port_of:
                self._addr.append(port_of[m.address])
            else:
                host, _, port = m.address.rpartition(":")
                self._addr.append((host.strip("[]"), int(port)))
        family = socket.AF_INET6 if ":" in self._addr[0][0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._ids = itertools.count(1)
        self.resends = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> UdpLookupClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, raw: bytes) -> ResultArray:
        """Packed 40-byte keys in, a RESULT_DTYPE array out (one request per primary and
        per MAX_KEYS keys). Raises the DhtError of an error answer, Unavailable after
        ``retries`` resends without an answer."""
        if not raw or len(raw) % KEY_SIZE:
            raise InvalidArgument("keys", f"length {len(raw)} is not a multiple of {KEY_SIZE}")
        hashes = key_hashes(raw)
        targets = self.table.primaries[self.table.partitions_of(hashes)]
        out = np.zeros(len(hashes), dtype=RESULT_DTYPE)
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE)
        for target in np.unique(targets).tolist():
            idx = np.flatnonzero(targets == target)
            for start in range(0, len(idx), MAX_KEYS):
                chunk = idx[start : start + MAX_KEYS]
                body = self.request(self._addr[target], rows[chunk].tobytes())
                out[chunk] = np.frombuffer(body, dtype=RESULT_DTYPE)
        return out

    def lookup_one(self, key: bytes) -> bytes:
        """One packed 40-byte key in, its packed 32-byte result out (the latency path)."""
        table = self.table
        target = int(table.primaries[key_hash(key) % table.num_partitions])
        return self.request(self._addr[target], key)

    def request(self, addr: tuple[str, int], keys: bytes) -> bytes:
        """One request to one node: its result records."""
        count = len(keys) // KEY_SIZE
        rid = next(self._ids) & 0xFFFFFFFF
        msg = HEADER.pack(VERSION, OP_LOOKUP, count, rid) + keys
        sock = self._sock
        for attempt in range(self.retries + 1):
            if attempt:
                self.resends += 1
            sock.sendto(msg, addr)
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    break
                if len(data) < HEADER.size:
                    continue
                version, _, _, got = HEADER.unpack_from(data)
                if got != rid or version != VERSION:
                    continue  # a late answer to an earlier request
                return udp_answer(data, count, f"{addr[0]}:{addr[1]}")
        raise Unavailable(f"no answer from {addr[0]}:{addr[1]} after {self.retries + 1} tries")


def _asks_elsewhere(answer: bytes) -> bool:
    """A local answer a second chance would ask the other PoPs about: nothing found, or
    only an embryonic claim (as over gRPC, dht.pops.hints)."""
    return answer[0] == Status.NOT_FOUND or (
        answer[0] == Status.OK and answer[1] == State.EMBRYONIC
    )
