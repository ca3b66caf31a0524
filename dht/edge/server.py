"""The I/O shell of a node: gRPC server (FlowTable, grpc.health.v1, reflection), peer
channels for one-hop forwarding, the admin endpoint, and the lifecycle around them.

Errors are mapped to gRPC status in exactly one place (:meth:`FlowTableService._run`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.config import NodeConfig
from dht.core.errors import DhtError
from dht.core.membership import MemberState
from dht.core.ops import BatchCall, Op
from dht.core.placement import Member
from dht.core.wire import ENTRY_SIZE, FORMAT_VERSION, U64Array
from dht.edge import convert
from dht.edge.admin import AdminServer
from dht.edge.channels import channel_credentials, open_channel, server_credentials
from dht.edge.pop_grpc import SERVICE_NAME as POP_SERVICE_NAME
from dht.edge.pop_grpc import GrpcPopTransport, PopLinkService
from dht.edge.status import grpc_status
from dht.edge.udp import UdpLookupProtocol, start_listener
from dht.node.node import Node
from dht.node.replication import MergeResult, PeerUnreachable
from dht.pops.extension import Pops

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FlowTable"].full_name
INTERNAL_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeInternal"].full_name


def _unreachable(member: Member, e: grpc.aio.AioRpcError) -> PeerUnreachable:
    details = e.details() or ""
    # Only a refused connection proves the process is gone; a timeout may be a stall.
    refused = e.code() == grpc.StatusCode.UNAVAILABLE and "connection refused" in details.lower()
    return PeerUnreachable(member.node_id, f"{e.code().name}: {details}", refused=refused)


def _partitions(parts: npt.NDArray[np.intp]) -> bytes:
    return parts.astype(">u2").tobytes()


class FlowTableService(pb_grpc.FlowTableServicer):
    """Translates protobuf calls to :meth:`Node.batch` and errors to gRPC status."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def _run(self, method: str, context: Ctx, work: Callable[[], Awaitable[bytes]]) -> bytes:
        started = time.perf_counter()
        code = "OK"
        try:
            return await work()
        except DhtError as e:
            status = grpc_status(e)
            code = status.name
            await context.abort(status, str(e))
            raise  # unreachable: abort raises
        except (asyncio.CancelledError, grpc.aio.AbortError):
            code = "CANCELLED"
            raise
        except Exception:
            # A bug, not bad input: log it, answer INTERNAL, keep serving.
            log.exception("%s failed", method)
            code = "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error")
            raise
        finally:
            self.node.metrics.requests.labels(method, code).inc()
            self.node.metrics.latency.labels(method).observe(time.perf_counter() - started)

    async def _flow(self, op: Op, req: pb.FlowBatchRequest, context: Ctx) -> pb.FlowBatchResponse:
        results = await self._run(
            op.value, context, lambda: self.node.batch(convert.flow_call(op, req))
        )
        return pb.FlowBatchResponse(format_version=1, results=results, epoch=self.node.table.epoch)

    async def _affinity(self, op: Op, req: pb.AffinityRequest, context: Ctx) -> pb.AffinityResponse:
        results = await self._run(
            op.value, context, lambda: self.node.batch(convert.affinity_call(op, req))
        )
        return pb.AffinityResponse(format_version=1, results=results, epoch=self.node.table.epoch)

    async def Claim(self, request: pb.FlowBatchRequest, context: Ctx) -> pb.FlowBatchResponse:
        return await self._flow(Op.CLAIM, request, context)

    async def Confirm(self, request: pb.FlowBatchRequest, context: Ctx) -> pb.FlowBatchResponse:
        return await self._flow(Op.CONFIRM, request, context)

    async def Lookup(self, request: pb.FlowBatchRequest, context: Ctx) -> pb.FlowBatchResponse:
        return await self._flow(Op.LOOKUP, request, context)

    async def Refresh(self, request: pb.FlowBatchRequest, context: Ctx) -> pb.FlowBatchResponse:
        return await self._flow(Op.REFRESH, request, context)

    async def Release(self, request: pb.FlowBatchRequest, context: Ctx) -> pb.FlowBatchResponse:
        return await self._flow(Op.RELEASE, request, context)

    async def GetAffinity(self, request: pb.AffinityRequest, context: Ctx) -> pb.AffinityResponse:
        return await self._affinity(Op.GET_AFFINITY, request, context)

    async def SetAffinity(self, request: pb.AffinityRequest, context: Ctx) -> pb.AffinityResponse:
        return await self._affinity(Op.SET_AFFINITY, request, context)

    async def GetPartitionTable(
        self, request: pb.PartitionTableRequest, context: Ctx
    ) -> pb.PartitionTable:
        cfg = self.node.config
        return convert.table_to_pb(
            self.node.table,
            self.node.pop_id,
            cfg.pops,
            cfg.max_batch_keys,
            cfg.limits.prefix_v4,
            cfg.limits.prefix_v6,
        )


class NodeInternalService(pb_grpc.NodeInternalServicer):
    """Node-to-node calls: probes, replication, quorum reads, anti-entropy."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def _guard(self, context: Ctx, work: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await work()
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))

    async def Ping(self, request: pb.PingRequest, context: Ctx) -> pb.PingResponse:
        n = self.node
        n.replicator.heard_from(request.from_node)
        n.gossip_in(convert.members_from_pb(request.members))
        return pb.PingResponse(
            node_id=n.config.node_id,
            epoch=n.table.epoch,
            in_sync=n.in_sync,
            members=convert.members_to_pb(n.membership.view()),
        )

    async def PingReq(self, request: pb.PingReqRequest, context: Ctx) -> pb.PingReqResponse:
        target = Member(request.target_node, request.target_address)
        try:
            _, view = await self.node.peers_transport.ping(target, self.node.membership.view())
        except PeerUnreachable:
            return pb.PingReqResponse(ok=False)
        self.node.gossip_in(view)
        return pb.PingReqResponse(ok=True)

    async def Replicate(self, request: pb.EntryBatch, context: Ctx) -> pb.ReplicateResponse:
        async def work() -> pb.ReplicateResponse:
            res = self.node.internal_replicate(
                request.entries, request.issued_hlc, request.terms, request.from_node
            )
            return pb.ReplicateResponse(
                applied=res.applied,
                refused=res.refused,
                stale=res.stale,
                fenced=res.fenced,
                fenced_by=res.fenced_by,
                superseded=res.superseded,
            )

        result: pb.ReplicateResponse = await self._guard(context, work)
        return result

    async def Promise(self, request: pb.PromiseRequest, context: Ctx) -> pb.PromiseResponse:
        async def work() -> pb.PromiseResponse:
            self.node.replicator.heard_from(request.from_node)
            return pb.PromiseResponse(
                promised=self.node.internal_promise(
                    request.partitions, request.term, request.from_node
                )
            )

        result: pb.PromiseResponse = await self._guard(context, work)
        return result

    async def Undo(self, request: pb.UndoRequest, context: Ctx) -> pb.UndoResponse:
        async def work() -> pb.UndoResponse:
            kept = self.node.internal_undo(request.written, request.before, request.terms)
            undone = len(request.written) // ENTRY_SIZE - len(kept)
            return pb.UndoResponse(undone=undone, kept=kept.astype(">u4").tobytes())

        result: pb.UndoResponse = await self._guard(context, work)
        return result

    async def ReadCopies(self, request: pb.CopiesRequest, context: Ctx) -> pb.CopiesResponse:
        async def work() -> pb.CopiesResponse:
            return pb.CopiesResponse(results=self.node.internal_copies(request.keys))

        result: pb.CopiesResponse = await self._guard(context, work)
        return result

    async def PartitionDigests(self, request: pb.DigestRequest, context: Ctx) -> pb.DigestResponse:
        async def work() -> pb.DigestResponse:
            digests, counts = self.node.internal_digests(
                self.node.partitions_arg(request.partitions)
            )
            return pb.DigestResponse(
                digests=digests.astype(">u8").tobytes(),
                counts=counts.astype(">u4").tobytes(),
                epoch=self.node.table.epoch,
            )

        result: pb.DigestResponse = await self._guard(context, work)
        return result

    async def FetchPartitions(
        self, request: pb.FetchRequest, context: Ctx
    ) -> AsyncIterator[pb.EntryBatch]:
        try:
            parts = self.node.partitions_arg(request.partitions)
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))
        async for chunk in self.node.internal_fetch(parts, request.settled_only):
            yield pb.EntryBatch(
                format_version=FORMAT_VERSION, entries=chunk, from_node=self.node.config.node_id
            )


class Peers:
    """gRPC transport to the other nodes of the PoP (dht.node.replication.PeerTransport, plus
    one-hop forwarding). Channels are opened on first use and closed on stop; every call
    is bounded by its timeout, and every failure becomes PeerUnreachable."""

    def __init__(
        self,
        node_id: str,
        creds: grpc.ChannelCredentials | None,
        rpc_timeout_s: float,
        forward_timeout_s: float,
        probe_timeout_s: float,
    ) -> None:
        self._node_id = node_id
        self._creds = creds
        self._rpc_timeout_s = rpc_timeout_s
        self._forward_timeout_s = forward_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._channels: dict[
            str, tuple[grpc.aio.Channel, pb_grpc.FlowTableAsyncStub, pb_grpc.NodeInternalAsyncStub]
        ] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _stubs(
        self, member: Member
    ) -> tuple[pb_grpc.FlowTableAsyncStub, pb_grpc.NodeInternalAsyncStub]:
        entry = self._channels.get(member.address)
        if entry is None:
            channel = open_channel(member.address, self._creds)
            entry = (channel, pb_grpc.FlowTableStub(channel), pb_grpc.NodeInternalStub(channel))
            self._channels[member.address] = entry
        return entry[1], entry[2]

    async def forward(self, member: Member, call: BatchCall) -> bytes:
        stub = self._stubs(member)[0]
        method = getattr(stub, call.op.value)
        try:
            if call.op in (Op.GET_AFFINITY, Op.SET_AFFINITY):
                aresp: pb.AffinityResponse = await method(
                    convert.affinity_request(call), timeout=self._forward_timeout_s
                )
                return aresp.results
            fresp: pb.FlowBatchResponse = await method(
                convert.flow_request(call), timeout=self._forward_timeout_s
            )
            return fresp.results
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None

    async def ping(
        self, member: Member, view: Sequence[MemberState]
    ) -> tuple[int, list[MemberState]]:
        req = pb.PingRequest(from_node=self._node_id, members=convert.members_to_pb(list(view)))
        try:
            resp = await self._stubs(member)[1].Ping(req, timeout=self._probe_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        return resp.epoch, convert.members_from_pb(resp.members)

    async def ping_req(self, via: Member, target: Member) -> bool:
        req = pb.PingReqRequest(
            from_node=self._node_id, target_node=target.node_id, target_address=target.address
        )
        try:
            # The helper's own probe is bounded by the probe timeout; allow for it.
            resp = await self._stubs(via)[1].PingReq(req, timeout=2 * self._probe_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(via, e) from None
        return resp.ok

    async def replicate(
        self,
        member: Member,
        entries: bytes,
        hinted: bool,
        issued_hlc: int = 0,
        terms: bytes = b"",
    ) -> MergeResult:
        req = pb.EntryBatch(
            format_version=FORMAT_VERSION,
            entries=entries,
            from_node=self._node_id,
            hinted=hinted,
            issued_hlc=issued_hlc,
            terms=terms,
        )
        try:
            resp = await self._stubs(member)[1].Replicate(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        return MergeResult(
            resp.applied, resp.refused, resp.stale, resp.fenced, resp.fenced_by, resp.superseded
        )

    async def promise(
        self, member: Member, partitions: npt.NDArray[np.intp], term: int
    ) -> npt.NDArray[np.uint64]:
        req = pb.PromiseRequest(
            from_node=self._node_id,
            partitions=partitions.astype(">u2").tobytes(),
            term=term,
        )
        try:
            resp = await self._stubs(member)[1].Promise(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        promised = np.frombuffer(resp.promised, dtype=">u8").astype(np.uint64)
        if len(promised) != len(partitions):
            raise PeerUnreachable(member.node_id, f"answered {len(promised)} promises")
        return promised

    async def undo(
        self, member: Member, written: bytes, before: bytes, terms: bytes
    ) -> npt.NDArray[np.intp]:
        req = pb.UndoRequest(from_node=self._node_id, written=written, before=before, terms=terms)
        try:
            resp = await self._stubs(member)[1].Undo(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        kept: npt.NDArray[np.intp] = np.frombuffer(resp.kept, dtype=">u4").astype(np.intp)
        return kept

    async def read_copies(self, member: Member, keys: bytes) -> bytes:
        req = pb.CopiesRequest(format_version=FORMAT_VERSION, keys=keys)
        try:
            resp = await self._stubs(member)[1].ReadCopies(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        return resp.results

    async def digests(
        self, member: Member, partitions: npt.NDArray[np.intp]
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        req = pb.DigestRequest(partitions=_partitions(partitions))
        try:
            resp = await self._stubs(member)[1].PartitionDigests(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        digests = np.frombuffer(resp.digests, dtype=">u8").astype(np.uint64)
        counts = np.frombuffer(resp.counts, dtype=">u4").astype(np.uint32)
        return digests, counts

    async def fetch(
        self, member: Member, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> AsyncIterator[bytes]:
        # A whole-node refill may stream for a while: bound each batch, not the stream.
        call = self._stubs(member)[1].FetchPartitions(
            pb.FetchRequest(partitions=_partitions(partitions), settled_only=settled_only)
        )
        try:
            while True:
                batch = await asyncio.wait_for(call.read(), self._rpc_timeout_s * 5)
                if not isinstance(batch, pb.EntryBatch):  # grpc.aio.EOF
                    return
                yield batch.entries
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        except TimeoutError:
            call.cancel()
            raise PeerUnreachable(member.node_id, "FetchPartitions stalled") from None

    def reset(self, member: Member) -> None:
        entry = self._channels.pop(member.address, None)
        if entry is not None:
            # Closing is async; calls still on the old channel finish or fail on their own.
            task = asyncio.get_running_loop().create_task(entry[0].close(grace=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._closing, return_exceptions=True)
        channels = [c for c, _, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


class NodeServer:
    """A node with its gRPC server and admin endpoint. ``start()`` returns once both
    listen; ``stop()`` is graceful, bounded and safe to call twice."""

    def __init__(self, config: NodeConfig, wall_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._admin: AdminServer | None = None
        self._udp: UdpLookupProtocol | None = None
        creds = channel_credentials(config.tls) if config.tls else None
        self.peers = Peers(
            config.node_id,
            creds,
            config.rpc_timeout_ms / 1000,
            config.forward_timeout_ms / 1000,
            config.probe_timeout_ms / 1000,
        )
        pop_transport = GrpcPopTransport(
            lambda address: open_channel(address, creds),
            config.pop_id,
            config.node_id,
            config.num_partitions,
            config.rpc_timeout_ms / 1000,
        )

        def pops(node: Node) -> Pops:
            # Cross-PoP shipping, affinity and sizing (dht.pops): hooks into the node.
            self.pops = Pops(node, pop_transport)
            return self.pops

        self.node = Node(
            config, self.peers, forward=self.peers.forward, extension=pops, wall_ms=wall_ms
        )
        self._stopped = False

    @property
    def grpc_address(self) -> str:
        return f"{self.config.advertised}:{self.node.grpc_port}"

    @property
    def udp_lookup_port(self) -> int:
        """The UDP lookup listener's port, -1 when it is off."""
        if self._udp is None or self._udp.transport is None:
            return -1
        port: int = self._udp.transport.get_extra_info("sockname")[1]
        return port

    @property
    def admin_address(self) -> str:
        return f"{self.config.advertised}:{self.node.admin_port}"

    async def start(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)],
        )
        pb_grpc.add_FlowTableServicer_to_server(FlowTableService(self.node), server)
        pb_grpc.add_NodeInternalServicer_to_server(NodeInternalService(self.node), server)
        pb_grpc.add_PopLinkServicer_to_server(PopLinkService(self.pops), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                INTERNAL_SERVICE_NAME,
                POP_SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        bind = f"{cfg.host}:{cfg.grpc_port}"
        if cfg.tls:
            port = server.add_secure_port(bind, server_credentials(cfg.tls))
        else:
            port = server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"cannot bind gRPC to {bind}")
        self._server = server
        admin_port = -1
        if cfg.admin_port >= 0:
            self._admin = AdminServer(self)
            admin_port = await self._admin.start(cfg.host, cfg.admin_port)
        self.node.init_membership(port, admin_port)
        if cfg.udp_lookup_port >= 0:
            self._udp = await start_listener(self.node, cfg.host, cfg.udp_lookup_port or port)
        await server.start()
        self.node.start_loops()
        self.pops.start()
        # A node joining through seeds accepts calls once it has joined and synced.
        self.node.accepting = self.node.joined
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "node %s serving gRPC on %s, admin on %s",
            cfg.node_id,
            self.grpc_address,
            self.admin_address,
        )

    async def stop(self, leave: bool = True) -> None:
        """Graceful stop: with ``leave``, announce the leave and hand the partitions off
        (bounded by leave_timeout_s) while still serving; then stop serving."""
        if self._stopped:
            return
        self._stopped = True
        if leave:
            await self.node.leave(self.config.leave_timeout_s)
        self.node.accepting = False
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # In-flight calls get the grace period, then are cancelled.
            await self._server.stop(self.config.shutdown_grace_s)
        if self._udp is not None:
            await self._udp.stop(self.config.shutdown_grace_s)
        await self.node.stop_loops()
        await self.pops.close()
        await self.peers.close()
        if self._admin is not None:
            await self._admin.stop()
        log.info("node %s stopped", self.config.node_id)

    async def __aenter__(self) -> NodeServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
