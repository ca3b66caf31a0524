"""The forwarder's look-ups over the nodes' UDP listeners (docs/api.md#udp-lookup): one
datagram each way instead of a gRPC call, for the misses a packet waits on.

Keys go to their partition's primary (from the client's table), 32 to a datagram; all
of a batch's datagrams are in flight at once. An error answer raises its DhtError; no
answer within ``timeout_s`` raises Unavailable, and the forwarder then asks over gRPC
(the datagram may be lost, the listener off, the node shedding or gone). Late answers
to requests given up on are recognised by their id and dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from dht.core.errors import InvalidArgument, Unavailable
from dht.core.placement import PartitionMap
from dht.core.udp_wire import HEADER, MAX_KEYS, OP_LOOKUP, OP_LOOKUP_SECOND_CHANCE, VERSION
from dht.core.wire import KEY_SIZE, RESULT_DTYPE, ResultArray, key_hashes
from dht.edge.status import udp_answer

if TYPE_CHECKING:
    from dht.client.client import Client

Address = tuple[str, int]


class UdpCounters(Protocol):
    udp_lookups: int
    udp_fallbacks: int


async def udp_first(
    udp: UdpLookups | None, client: Client, raw: bytes, second_chance: bool, n: UdpCounters
) -> ResultArray:
    """A forwarder's look-up: over UDP when it is on, over gRPC when UDP got no answer
    (lost, no listener, the node gone: gRPC also tries the other replicas)."""
    if udp is not None:
        try:
            rows = await udp.lookup(raw, second_chance)
            n.udp_lookups += len(raw) // KEY_SIZE
            return rows
        except Unavailable:
            n.udp_fallbacks += 1
    return await client.flow_packed("Lookup", raw, second_chance=second_chance)


def same_port(grpc_address: str) -> Address:
    """The default: a node's UDP listener on its gRPC address (``udp_lookup_port = 0``)."""
    host, _, port = grpc_address.rpartition(":")
    return host.strip("[]"), int(port)


class _Answers(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpLookups) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.owner.answer(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable and the like: the request times out and goes to gRPC


class UdpLookups:
    def __init__(
        self,
        table: Callable[[], PartitionMap],
        *,
        port_of: Callable[[str], Address] = same_port,
        timeout_s: float = 0.3,
    ) -> None:
        if not timeout_s > 0:
            raise InvalidArgument("udp_timeout_s", f"{timeout_s}: want seconds > 0")
        self._table = table
        self._port_of = port_of
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._transports: dict[int, asyncio.DatagramTransport] = {}  # by address family

    async def _transport(self, host: str) -> asyncio.DatagramTransport:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        t = self._transports.get(family)
        if t is None or t.is_closing():
            loop = asyncio.get_running_loop()
            t, _ = await loop.create_datagram_endpoint(lambda: _Answers(self), family=family)
            self._transports[family] = t
        return t

    def answer(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            return
        version, _, _, rid = HEADER.unpack_from(data)
        fut = self._waiting.get(rid)
        if version == VERSION and fut is not None and not fut.done():
            fut.set_result(data)

    async def lookup(self, raw: bytes, second_chance: bool = False) -> ResultArray:
        """Packed 40-byte keys in, their results out (as ``Client.flow_packed``)."""
        table = self._table()
        hashes = key_hashes(raw)
        targets = table.primaries[table.partitions_of(hashes)]
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, KEY_SIZE)
        out = np.zeros(len(hashes), dtype=RESULT_DTYPE)
        op = OP_LOOKUP_SECOND_CHANCE if second_chance else OP_LOOKUP
        parts = []
        for target in np.unique(targets).tolist():
            idx = np.flatnonzero(targets == target)
            addr = self._port_of(table.members[target].address)
            for start in range(0, len(idx), MAX_KEYS):
                chunk = idx[start : start + MAX_KEYS]
                parts.append((chunk, self._request(addr, op, rows[chunk].tobytes())))
        bodies = await asyncio.gather(*(p for _, p in parts))
        for (chunk, _), body in zip(parts, bodies, strict=True):
            out[chunk] = np.frombuffer(body, dtype=RESULT_DTYPE)
        return out

    async def _request(self, addr: Address, op: int, keys: bytes) -> bytes:
        count = len(keys) // KEY_SIZE
        rid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            (await self._transport(addr[0])).sendto(
                HEADER.pack(VERSION, op, count, rid) + keys, addr
            )
            async with asyncio.timeout(self.timeout_s):
                data = await fut
        except TimeoutError:
            raise Unavailable(f"UDP lookup: no answer from {addr[0]}:{addr[1]}") from None
        except OSError as e:
            raise Unavailable(f"UDP lookup to {addr[0]}:{addr[1]}: {e}") from None
        finally:
            self._waiting.pop(rid, None)
        return udp_answer(data, count, f"{addr[0]}:{addr[1]}")

    def close(self) -> None:
        for t in self._transports.values():
            t.close()
        self._transports.clear()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(Unavailable("UDP lookups closed"))
