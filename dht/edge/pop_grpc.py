"""The gRPC edge of cross-PoP shipping: the ``dht.v1.PopLink`` service and the transport
that calls it (dht.pops.transport.PopTransport). Errors are mapped to gRPC status here, with
the same mapping as the other services (dht.edge.status.grpc_status)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.errors import DhtError, InvalidArgument
from dht.core.packing import (
    pack_counts,
    pack_digests,
    pack_partitions,
    unpack_counts,
    unpack_digests,
    unpack_partitions,
)
from dht.core.wire import FORMAT_VERSION, check_batch_size
from dht.edge.authz import Authorizer
from dht.edge.status import grpc_status
from dht.pops.extension import Pops
from dht.pops.transport import Digests, PopUnreachable, ShipResult

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PopLink"].full_name

# What a broken or cancelled stream can raise besides an RPC error.
_STREAM_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def partitions_field(raw: bytes, num_partitions: int) -> npt.NDArray[np.intp]:
    check_batch_size(len(raw), 2, 65535, "partitions")
    parts = unpack_partitions(raw)
    if parts.size and int(parts.max()) >= num_partitions:
        raise InvalidArgument("partitions", f"partition {int(parts.max())} does not exist")
    return parts


def _check_version(version: int) -> None:
    if version != FORMAT_VERSION:
        raise InvalidArgument(
            "format_version", f"{version} is not supported (want {FORMAT_VERSION})"
        )


async def _next(batches: AsyncIterator[pb.ShipBatch]) -> pb.ShipBatch | None:
    """The next batch of a Ship stream, None at its end."""
    return await anext(batches, None)


class PopLinkService(pb_grpc.PopLinkServicer):
    """Calls from other PoPs' nodes."""

    def __init__(self, pops: Pops, authz: Authorizer) -> None:
        self.pops = pops
        self.authz = authz
        self._ending = asyncio.Event()  # a stopping node: Ship streams end

    def end_streams(self) -> None:
        """End every Ship stream being served, and each one that starts from now on (a
        stopping node): they never end on their own while the other PoP runs, and would
        hold the server's stop for its whole grace. Each sender sees its stream end and
        ships its unacknowledged batches again, later or to another node."""
        self._ending.set()

    async def _receive(self, b: pb.ShipBatch, context: Ctx) -> pb.ShipAck:
        self.authz.node_of_pop(context, b.from_pop)
        _check_version(b.format_version)
        res = await self.pops.receive(b.entries, b.from_pop, b.sent_hlc, b.num_partitions)
        return pb.ShipAck(
            seq=b.seq, ok=res.ok, applied=res.applied, rejected=res.rejected, error=res.error
        )

    async def Ship(
        self, request_iterator: AsyncIterator[pb.ShipBatch], context: Ctx
    ) -> AsyncIterator[pb.ShipAck]:
        # The stream ends (OK, no more acks) between batches once end_streams is called:
        # a batch being applied is finished and acknowledged first. Not by cancelling the
        # call's task: a cancel landing while gRPC sends an ack ends the handler without
        # a status, and the call would then last the server's whole grace.
        ending = asyncio.ensure_future(self._ending.wait())
        batches = aiter(request_iterator)
        try:
            while not self._ending.is_set():
                nxt = asyncio.ensure_future(_next(batches))
                await asyncio.wait((nxt, ending), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    return
                batch = nxt.result()
                if batch is None:  # the sender ended the stream
                    return
                try:
                    ack = await self._receive(batch, context)
                except DhtError as e:
                    await context.abort(grpc_status(e), str(e))
                yield ack
        finally:
            ending.cancel()

    async def PopPush(self, request: pb.ShipBatch, context: Ctx) -> pb.ShipAck:
        try:
            return await self._receive(request, context)
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))
            raise  # unreachable: abort raises

    async def PopDigests(self, request: pb.PopDigestRequest, context: Ctx) -> pb.PopDigestResponse:
        try:
            self.authz.node_of_pop(context, request.from_pop)
            self.pops.peer_pop_name(request.from_pop)
            d = self.pops.digests_for(
                partitions_field(request.partitions, request.num_partitions),
                request.num_partitions,
                request.cutoff_ms,
            )
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))
            raise
        return pb.PopDigestResponse(
            partitions=pack_partitions(d.partitions),
            digests=pack_digests(d.digests),
            counts=pack_counts(d.counts),
        )

    async def PopLookup(self, request: pb.PopLookupRequest, context: Ctx) -> pb.FlowBatchResponse:
        try:
            self.authz.node_of_pop(context, request.from_pop)
            _check_version(request.format_version)
            results = await self.pops.lookup_for(request.keys, request.from_pop)
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))
            raise  # unreachable: abort raises
        node = self.pops.node
        return pb.FlowBatchResponse(format_version=1, results=results, epoch=node.table.epoch)

    async def PopFetch(
        self, request: pb.PopFetchRequest, context: Ctx
    ) -> AsyncIterator[pb.ShipBatch]:
        try:
            self.authz.node_of_pop(context, request.from_pop)
            self.pops.peer_pop_name(request.from_pop)
            parts = partitions_field(request.partitions, request.num_partitions)
            chunks = self.pops.fetch_for(parts, request.num_partitions, request.cutoff_ms)
            node = self.pops.node
            async for raw in chunks:
                yield pb.ShipBatch(
                    format_version=FORMAT_VERSION,
                    entries=raw,
                    from_pop=node.pop_id,
                    from_node=node.config.node_id,
                    num_partitions=request.num_partitions,
                )
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))


class _Stream:
    """One bidirectional Ship call; a batch at a time, each acknowledged."""

    def __init__(self, transport: GrpcPopTransport, address: str) -> None:
        self._t = transport
        self._address = address
        self._call: Any = None

    async def send(self, seq: int, raw: bytes, sent_hlc: int) -> ShipResult:
        t = self._t
        if self._call is None:
            self._call = t.stub(self._address).Ship()
        try:
            async with asyncio.timeout(t.timeout_s):
                await self._call.write(t.batch(seq, raw, sent_hlc))
            async with asyncio.timeout(t.timeout_s):
                ack = await self._call.read()
        except _STREAM_ERRORS as e:
            raise PopUnreachable(f"{self._address}: {_describe(e)}") from None
        except TimeoutError:
            raise PopUnreachable(f"{self._address}: no acknowledgement in time") from None
        if not isinstance(ack, pb.ShipAck):  # grpc.aio.EOF
            raise PopUnreachable(f"{self._address}: stream closed")
        if ack.seq != seq:
            raise PopUnreachable(f"{self._address}: acknowledged {ack.seq}, sent {seq}")
        return ShipResult(ack.ok, ack.applied, ack.rejected, ack.error)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return repr(e)


class GrpcPopTransport:
    """dht.pops.transport.PopTransport over gRPC. One channel per address, opened on first use."""

    def __init__(
        self,
        open_channel: Callable[[str], grpc.aio.Channel],
        from_pop: int,
        from_node: str,
        num_partitions: int,
        timeout_s: float,
    ) -> None:
        self._open = open_channel
        self.from_pop = from_pop
        self.from_node = from_node
        self.num_partitions = num_partitions
        self.timeout_s = timeout_s
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.PopLinkAsyncStub]] = {}

    def stub(self, address: str) -> pb_grpc.PopLinkAsyncStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = self._open(address)
            entry = (channel, pb_grpc.PopLinkStub(channel))
            self._channels[address] = entry
        return entry[1]

    def batch(self, seq: int, raw: bytes, sent_hlc: int) -> pb.ShipBatch:
        return pb.ShipBatch(
            format_version=FORMAT_VERSION,
            seq=seq,
            entries=raw,
            from_pop=self.from_pop,
            from_node=self.from_node,
            sent_hlc=sent_hlc,
            num_partitions=self.num_partitions,
        )

    def stream(self, address: str) -> _Stream:
        return _Stream(self, address)

    async def digests(
        self, address: str, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> Digests:
        req = pb.PopDigestRequest(
            from_pop=self.from_pop,
            partitions=pack_partitions(partitions),
            num_partitions=num_partitions,
            cutoff_ms=cutoff_ms,
        )
        try:
            # Digests of a whole node's partitions take a moment to compute: slack.
            resp = await self.stub(address).PopDigests(req, timeout=self.timeout_s * 3)
        except grpc.aio.AioRpcError as e:
            raise PopUnreachable(f"{address}: {_describe(e)}") from None
        return Digests(
            unpack_partitions(resp.partitions),
            unpack_digests(resp.digests),
            unpack_counts(resp.counts),
        )

    async def fetch(
        self, address: str, partitions: npt.NDArray[np.intp], num_partitions: int, cutoff_ms: int
    ) -> AsyncIterator[bytes]:
        call = self.stub(address).PopFetch(
            pb.PopFetchRequest(
                from_pop=self.from_pop,
                partitions=pack_partitions(partitions),
                num_partitions=num_partitions,
                cutoff_ms=cutoff_ms,
            )
        )
        try:
            while True:
                # A bulk resync may stream for a while: bound each batch, not the stream.
                async with asyncio.timeout(self.timeout_s * 5):
                    batch = await call.read()
                if not isinstance(batch, pb.ShipBatch):  # grpc.aio.EOF
                    return
                yield batch.entries
        except grpc.aio.AioRpcError as e:
            raise PopUnreachable(f"{address}: {_describe(e)}") from None
        except TimeoutError:
            call.cancel()
            raise PopUnreachable(f"{address}: PopFetch stalled") from None

    async def push(self, address: str, raw: bytes, sent_hlc: int) -> ShipResult:
        try:
            ack = await self.stub(address).PopPush(
                self.batch(0, raw, sent_hlc), timeout=self.timeout_s * 3
            )
        except grpc.aio.AioRpcError as e:
            raise PopUnreachable(f"{address}: {_describe(e)}") from None
        return ShipResult(ack.ok, ack.applied, ack.rejected, ack.error)

    async def lookup(self, address: str, raw: bytes) -> bytes:
        req = pb.PopLookupRequest(
            format_version=FORMAT_VERSION,
            from_pop=self.from_pop,
            from_node=self.from_node,
            keys=raw,
        )
        try:
            # The caller's second-chance deadline is the real bound.
            resp = await self.stub(address).PopLookup(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise PopUnreachable(f"{address}: {_describe(e)}") from None
        return resp.results

    async def close(self) -> None:
        channels = [c for c, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
