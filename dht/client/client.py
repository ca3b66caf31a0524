"""Async client library: keeps the PoP's partition table and sends each key straight to
its partition's primary, in batches, concurrently per node.

    async with Client(["127.0.0.1:7101"]) as c:
        results = await c.claim([parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443")])

A stale table costs at most one hop (the node forwards) or a MOVED answer (with
``no_forward=True``), after which the client refreshes its table and resends the moved
keys; it never yields a wrong answer. Responses carry the node's epoch; a differing one
triggers a table refresh too. A node that fails a call (unreachable, timed out) is skipped
for ``down_s`` seconds and its keys go to the partition's next replica, which coordinates
after a quorum read. Not safe to share across event loops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.config import TlsConfig
from dht.core.errors import DhtError, InvalidArgument, Unavailable
from dht.core.placement import PartitionMap
from dht.core.record import Status
from dht.core.wire import (
    ADDR_SIZE,
    FORMAT_VERSION,
    KEY_SIZE,
    FlowKey,
    Result,
    ResultArray,
    U64Array,
    affinity_keys,
    decode_results,
    key_hashes,
    new_results,
    prefix_mask,
)
from dht.edge import convert
from dht.edge.channels import channel_credentials, close_later, open_channel
from dht.edge.status import from_grpc

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# A MOVED answer means nodes disagree on the table (a membership change under way, for
# some tens of ms): the n-th retry of MOVED keys waits n times this.
MOVED_BACKOFF_S = 0.05


def _addr16(addr: Address) -> bytes:
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


class Client:
    def __init__(
        self,
        targets: Sequence[str],
        *,
        tls: TlsConfig | None = None,
        timeout_s: float = 5.0,
        no_forward: bool = False,
        max_moved_retries: int = 3,
        down_s: float = 2.0,
    ) -> None:
        if not targets:
            raise InvalidArgument("targets", "at least one node address is needed")
        self.targets = list(targets)
        self.timeout_s = timeout_s
        self.no_forward = no_forward
        self.max_moved_retries = max_moved_retries
        # A node whose call failed is skipped for down_s seconds (then tried again).
        self.down_s = down_s
        self._down: dict[str, float] = {}
        # (monotonic time, address) of every failed call: how long a dead node was tried.
        self.failures: list[tuple[float, str]] = []
        self._creds = channel_credentials(tls) if tls else None
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.FlowTableAsyncStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._table: PartitionMap | None = None
        self._table_pb: pb.PartitionTable | None = None
        self.table_refreshes = 0
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        try:
            await self.refresh_table()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel at once: calls in flight end with Unavailable("client
        closed"), and so does every call made after."""
        self._closed = True
        channels = [c for c, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _reset(self, address: str) -> None:
        """Drop the channel to ``address`` after a call on it failed UNAVAILABLE: the
        next call dials afresh. A gRPC channel whose connection failed waits out its
        reconnect backoff (up to 2 s, dht.edge.channels) and fails every call meanwhile
        without trying, so a node that is back (a restart) would be skipped as down for
        that long; the same reason the nodes reset theirs (GrpcPeerTransport.reset).
        Calls still running on the old channel end on their own (closing it cancels them
        only past their deadline)."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            close_later(entry[0], self.timeout_s + 1.0, self._closing)

    def _closed_under(self, address: str) -> None:
        """A call ended in CancelledError: when close() cancelled it (our task was not
        cancelled), the caller gets Unavailable, not a cancellation it never asked for."""
        task = asyncio.current_task()
        if self._closed and (task is None or not task.cancelling()):
            raise Unavailable(f"{address}: client closed") from None

    def _stub(self, address: str) -> pb_grpc.FlowTableAsyncStub:
        entry = self._channels.get(address)
        if entry is None:
            if self._closed:
                raise Unavailable("client closed")
            channel = open_channel(address, self._creds)
            entry = (channel, pb_grpc.FlowTableStub(channel))
            self._channels[address] = entry
        return entry[1]

    # ------------------------------------------------------------------ table

    @property
    def table(self) -> PartitionMap:
        if self._table is None:
            raise Unavailable("no partition table yet: call refresh_table() or use 'async with'")
        return self._table

    def set_table(self, table: PartitionMap) -> None:
        """Replace the table (tests use it to make the client deliberately stale)."""
        self._table = table

    @property
    def pops(self) -> dict[str, int]:
        t = self._table_pb
        return {p.name: p.id for p in t.pops} if t else {}

    @property
    def pop(self) -> int:
        """The PoP of the nodes this client talks to."""
        return self._table_pb.pop if self._table_pb else 0

    async def refresh_table(self, address: str | None = None) -> PartitionMap:
        """Fetch the table from ``address`` or the first target that answers."""
        candidates = [address] if address else []
        candidates += [a for a in self.targets if a != address]
        if self._table is not None:
            candidates += [m.address for m in self._table.members if m.address not in candidates]
        last: Exception | None = None
        for addr in candidates:
            try:
                t = await self._stub(addr).GetPartitionTable(
                    pb.PartitionTableRequest(), timeout=self.timeout_s
                )
            except asyncio.CancelledError:
                self._closed_under(addr)
                raise
            except grpc.aio.AioRpcError as e:
                last = e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self._reset(addr)
                continue
            self._table_pb = t
            self._table = convert.table_from_pb(t)
            self.table_refreshes += 1
            return self._table
        raise Unavailable(f"no node answered GetPartitionTable ({candidates}): {last}")

    def pop_id(self, pop: int | str | None) -> int:
        """A PoP name or id as the wire id; None = 0 (the serving node's own PoP)."""
        if pop is None:
            return 0
        if isinstance(pop, int):
            return pop
        try:
            return self.pops[pop]
        except KeyError:
            raise InvalidArgument(
                "pop", f"unknown PoP {pop!r} (known: {sorted(self.pops)})"
            ) from None

    # ------------------------------------------------------------------ flow calls

    async def claim(
        self,
        keys: Sequence[FlowKey] | bytes,
        *,
        pop: int | str | None = None,
        server: int = 0,
        ttl_s: int = 0,
    ) -> list[Result]:
        return await self._flows("Claim", keys, pop=pop, server=server, ttl_s=ttl_s)

    async def confirm(
        self,
        keys: Sequence[FlowKey] | bytes,
        *,
        pop: int | str | None = None,
        server: int = 0,
        ttl_s: int = 0,
    ) -> list[Result]:
        return await self._flows("Confirm", keys, pop=pop, server=server, ttl_s=ttl_s)

    async def lookup(self, keys: Sequence[FlowKey] | bytes) -> list[Result]:
        return await self._flows("Lookup", keys)

    async def refresh(
        self, keys: Sequence[FlowKey] | bytes, *, pop: int | str | None = None, ttl_s: int = 0
    ) -> list[Result]:
        return await self._flows("Refresh", keys, pop=pop, ttl_s=ttl_s)

    async def release(
        self, keys: Sequence[FlowKey] | bytes, *, pop: int | str | None = None
    ) -> list[Result]:
        return await self._flows("Release", keys, pop=pop)

    async def _flows(
        self, method: str, keys: Sequence[FlowKey] | bytes, **kwargs: Any
    ) -> list[Result]:
        return decode_results((await self.flow_packed(method, _pack(keys), **kwargs)).tobytes())

    async def flow_packed(
        self,
        method: str,
        raw: bytes,
        *,
        pop: int | str | None = None,
        server: int = 0,
        ttl_s: int = 0,
        second_chance: bool = False,
    ) -> ResultArray:
        """The fast path: packed 40-byte keys in, a RESULT_DTYPE array out.
        ``second_chance`` (Lookup): flows this PoP does not know are asked of the other
        PoPs (docs/protocol.md#second-chance); such answers carry FLAG_SECOND_CHANCE."""
        if len(raw) % KEY_SIZE:
            raise InvalidArgument("keys", f"length {len(raw)} is not a multiple of {KEY_SIZE}")
        hashes = key_hashes(raw)
        pop_id = self.pop_id(pop)

        def request(idx: npt.NDArray[np.intp], epoch: int) -> pb.FlowBatchRequest:
            payload = raw if len(idx) == len(hashes) else _take(raw, idx, KEY_SIZE)
            return pb.FlowBatchRequest(
                format_version=FORMAT_VERSION,
                keys=payload,
                pop=pop_id,
                server=server,
                ttl_s=ttl_s,
                epoch=epoch,
                no_forward=self.no_forward,
                second_chance=second_chance,
            )

        return await self._routed(method, hashes, request)

    # ------------------------------------------------------------------ affinity

    async def get_affinity(self, clients: Sequence[Address]) -> list[Result]:
        return await self._affinity("GetAffinity", clients, 0, 0)

    async def set_affinity(
        self, clients: Sequence[Address], pop: int | str, ttl_s: int = 0
    ) -> list[Result]:
        return await self._affinity("SetAffinity", clients, self.pop_id(pop), ttl_s)

    async def _affinity(
        self, method: str, clients: Sequence[Address], pop: int, ttl_s: int
    ) -> list[Result]:
        if self._table_pb is None:
            await self.refresh_table()
        assert self._table_pb is not None
        raw = b"".join(_addr16(a) for a in clients)
        addrs = np.frombuffer(raw, dtype=np.uint8).reshape(-1, ADDR_SIZE)
        t = self._table_pb
        hashes = key_hashes(
            affinity_keys(prefix_mask(t.affinity_prefix_v4, t.affinity_prefix_v6, addrs))
        )

        def request(idx: npt.NDArray[np.intp], epoch: int) -> pb.AffinityRequest:
            payload = raw if len(idx) == len(hashes) else _take(raw, idx, ADDR_SIZE)
            return pb.AffinityRequest(
                format_version=FORMAT_VERSION,
                clients=payload,
                pop=pop,
                ttl_s=ttl_s,
                epoch=epoch,
                no_forward=self.no_forward,
            )

        return decode_results((await self._routed(method, hashes, request)).tobytes())

    # ------------------------------------------------------------------ routing

    async def _routed(self, method: str, hashes: U64Array, request: object) -> ResultArray:
        """Send every key to the first replica of its partition that is not marked down
        (the primary, normally); keys answered UNAVAILABLE (or whose call failed) go to
        the partition's next replica, MOVED keys again after a table refresh. Bounded:
        at most replication_factor + max_moved_retries rounds; MOVED rounds back off
        (MOVED_BACKOFF_S, 2x, 3x ...)."""
        if self._table is None:
            await self.refresh_table()
        out = new_results(len(hashes))
        pending = np.arange(len(hashes), dtype=np.intp)
        skip = np.zeros(len(hashes), dtype=np.intp)  # replicas already tried, per key
        moved_rounds = 0
        for _ in range(self.table.replication_factor + self.max_moved_retries + 1):
            table = self.table
            stale, failed = await self._send(method, table, hashes, pending, skip, request, out)
            status = out["status"][pending]
            moved = pending[status == Status.MOVED]
            retry = pending[(status == Status.UNAVAILABLE) & failed[pending]]
            if stale or moved.size:
                await self.refresh_table()
                moved_rounds += 1
                if moved.size and moved_rounds <= self.max_moved_retries:
                    # Nodes disagree on the table for a moment during a membership
                    # change: give them a little time before asking again.
                    await asyncio.sleep(MOVED_BACKOFF_S * moved_rounds)
            skip[retry] += 1
            retry = retry[skip[retry] < self.table.replication_factor]
            if moved_rounds > self.max_moved_retries:
                moved = moved[:0]
            pending = np.union1d(moved, retry).astype(np.intp)
            if not pending.size:
                break
        return out

    def _targets(
        self, table: PartitionMap, parts: npt.NDArray[np.uint16], skip: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.int32]:
        """Per key: the replica to try, skipping ``skip`` replicas and any marked down."""
        now = time.monotonic()
        up = np.array([self._down.get(m.address, 0.0) <= now for m in table.members])
        reps = table.replicas[parts]  # (n, rf)
        usable = up[reps]
        usable &= np.arange(reps.shape[1]) >= np.minimum(skip, reps.shape[1] - 1)[:, None]
        first = np.argmax(usable, axis=1)
        # Every replica marked down: try the next one in order anyway (it may be back).
        fallback = np.minimum(skip, reps.shape[1] - 1)
        col = np.where(usable.any(axis=1), first, fallback)
        targets: npt.NDArray[np.int32] = reps[np.arange(len(reps)), col].astype(np.int32)
        return targets

    async def _send(
        self,
        method: str,
        table: PartitionMap,
        hashes: U64Array,
        pending: npt.NDArray[np.intp],
        skip: npt.NDArray[np.intp],
        request: object,
        out: ResultArray,
    ) -> tuple[bool, npt.NDArray[np.bool_]]:
        """Send ``pending`` keys to their replicas; fill ``out``. Returns whether any
        node answered with another epoch (our table is stale), and per key whether it
        is worth trying another replica (UNAVAILABLE)."""
        targets = self._targets(table, table.partitions_of(hashes[pending]), skip[pending])
        limit = self._table_pb.max_batch_keys if self._table_pb else 10_000
        calls = []
        for target in np.unique(targets):
            idx = pending[targets == target]
            address = table.members[int(target)].address
            for start in range(0, len(idx), limit):
                chunk = idx[start : start + limit]
                calls.append(self._call(method, address, chunk, table.epoch, request, out))
        epochs = await asyncio.gather(*calls)
        failed = out["status"] == Status.UNAVAILABLE
        return any(e not in (0, table.epoch) for e in epochs), failed

    async def _call(
        self,
        method: str,
        address: str,
        idx: npt.NDArray[np.intp],
        epoch: int,
        request: object,
        out: ResultArray,
    ) -> int:
        req = request(idx, epoch)  # type: ignore[operator]
        try:
            resp = await getattr(self._stub(address), method)(req, timeout=self.timeout_s)
        except asyncio.CancelledError:
            self._closed_under(address)
            raise
        except grpc.aio.AioRpcError as e:
            err = from_grpc(e.code(), e.details() or "")
            if isinstance(err, Unavailable):
                # Route around this node for a while; the keys go to the next replica.
                self._down[address] = time.monotonic() + self.down_s
                self._reset(address)
                self.failures.append((time.monotonic(), address))
                out["status"][idx] = Status.UNAVAILABLE
                return 0
            raise err from None
        self._down.pop(address, None)
        res = np.frombuffer(resp.results, dtype=out.dtype)
        if len(res) != len(idx):
            raise DhtError(f"{address} answered {len(res)} results for {len(idx)} keys")
        out[idx] = res
        return int(resp.epoch)


def _pack(keys: Sequence[FlowKey] | bytes) -> bytes:
    if isinstance(keys, bytes | bytearray | memoryview):
        return bytes(keys)
    return b"".join(k.to_bytes() for k in keys)


def _take(raw: bytes, idx: npt.NDArray[np.intp], size: int) -> bytes:
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
    return rows[idx].tobytes()
