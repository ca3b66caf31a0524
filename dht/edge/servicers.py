"""The gRPC servicers of a node: ``dht.v1.FlowTable`` (the public API, translated to
:meth:`Node.batch`) and ``dht.v1.NodeInternal`` (node-to-node calls).

Errors are mapped to gRPC status in exactly one place per service
(:meth:`FlowTableService._run`, :meth:`NodeInternalService._guard`), both through
:func:`dht.edge.status.grpc_status`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.errors import DhtError
from dht.core.ops import Op
from dht.core.packing import (
    pack_counts,
    pack_digests,
    pack_flags,
    pack_partitions,
    pack_positions,
    pack_terms,
    unpack_terms,
)
from dht.core.wire import ENTRY_SIZE, FORMAT_VERSION
from dht.edge import convert
from dht.edge.authz import Authorizer
from dht.edge.status import grpc_status
from dht.node.node import Node

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FlowTable"].full_name
INTERNAL_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeInternal"].full_name


class FlowTableService(pb_grpc.FlowTableServicer):
    """Translates protobuf calls to :meth:`Node.batch` and errors to gRPC status. Served
    on both planes: to forwarders and operators on the public one, and to the nodes of
    this PoP (forwards) on the peer one (``peer_plane``), each checked as its plane
    says (dht.edge.authz)."""

    def __init__(self, node: Node, authz: Authorizer, peer_plane: bool = False) -> None:
        self.node = node
        self.authz = authz
        self.peer_plane = peer_plane

    def _check(self, context: Ctx, op: Op, pop: int) -> None:
        if self.peer_plane:
            self.authz.node_of_my_pop(context)
        else:
            self.authz.public(context, op, pop)
            self.node.overload.admit()  # shed while overloaded (never between nodes)

    async def _run(
        self,
        method: str,
        context: Ctx,
        work: Callable[[], Awaitable[bytes]],
        check: Callable[[], None] = lambda: None,
    ) -> bytes:
        started = time.perf_counter()
        code = "OK"
        try:
            check()
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
            op.value,
            context,
            lambda: self.node.batch(convert.flow_call(op, req)),
            lambda: self._check(context, op, req.pop),
        )
        return pb.FlowBatchResponse(format_version=1, results=results, epoch=self.node.table.epoch)

    async def _affinity(self, op: Op, req: pb.AffinityRequest, context: Ctx) -> pb.AffinityResponse:
        results = await self._run(
            op.value,
            context,
            lambda: self.node.batch(convert.affinity_call(op, req)),
            lambda: self._check(context, op, req.pop),
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
        try:
            self._check(context, Op.LOOKUP, 0)
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))
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
    """Node-to-node calls: probes, replication, quorum reads, anti-entropy. Only from
    the nodes of this PoP, each the node it says it is (dht.edge.authz)."""

    def __init__(self, node: Node, authz: Authorizer) -> None:
        self.node = node
        self.authz = authz

    async def _guard(
        self, context: Ctx, work: Callable[[], Awaitable[Any]], from_node: str | None = None
    ) -> Any:
        try:
            self.authz.node_of_my_pop(context, from_node)
            return await work()
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))

    async def Ping(self, request: pb.PingRequest, context: Ctx) -> pb.PingResponse:
        async def work() -> pb.PingResponse:
            n = self.node
            n.view.heard_from(request.from_node)
            n.gossip_in(convert.members_from_pb(request.members))
            return pb.PingResponse(
                node_id=n.config.node_id,
                epoch=n.table.epoch,
                in_sync=n.in_sync,
                members=convert.members_to_pb(n.membership.view()),
            )

        result: pb.PingResponse = await self._guard(context, work, request.from_node)
        return result

    async def PingReq(self, request: pb.PingReqRequest, context: Ctx) -> pb.PingReqResponse:
        # Only a member of this node's view, at its address (docs/protocol.md#membership).
        async def work() -> pb.PingReqResponse:
            ok = await self.node.liveness.ping_req(request.target_node, request.target_address)
            return pb.PingReqResponse(ok=ok)

        result: pb.PingReqResponse = await self._guard(context, work, request.from_node)
        return result

    async def Replicate(self, request: pb.EntryBatch, context: Ctx) -> pb.ReplicateResponse:
        async def work() -> pb.ReplicateResponse:
            terms = unpack_terms(request.terms) if request.terms else None
            res = self.node.internal_replicate(
                request.entries, request.issued_hlc, terms, request.from_node
            )
            return pb.ReplicateResponse(
                applied=res.applied,
                refused=res.refused,
                stale=res.stale,
                fenced=pack_partitions(res.fenced),
                fenced_by=res.fenced_by,
                fenced_by_floor=res.fenced_by_floor,
                superseded=pack_positions(res.superseded),
            )

        result: pb.ReplicateResponse = await self._guard(context, work, request.from_node)
        return result

    async def Promise(self, request: pb.PromiseRequest, context: Ctx) -> pb.PromiseResponse:
        async def work() -> pb.PromiseResponse:
            self.node.view.heard_from(request.from_node)
            parts = self.node.partitions_arg(request.partitions)
            promised, incomplete = self.node.internal_promise(
                parts, request.term, request.from_node
            )
            return pb.PromiseResponse(
                promised=pack_terms(promised), incomplete=pack_flags(incomplete)
            )

        result: pb.PromiseResponse = await self._guard(context, work, request.from_node)
        return result

    async def Undo(self, request: pb.UndoRequest, context: Ctx) -> pb.UndoResponse:
        async def work() -> pb.UndoResponse:
            terms = unpack_terms(request.terms)
            kept = self.node.internal_undo(
                request.written, request.before, terms, request.from_node
            )
            undone = len(request.written) // ENTRY_SIZE - len(kept)
            return pb.UndoResponse(undone=undone, kept=pack_positions(kept))

        result: pb.UndoResponse = await self._guard(context, work, request.from_node)
        return result

    async def ReadCopies(self, request: pb.CopiesRequest, context: Ctx) -> pb.CopiesResponse:
        async def work() -> pb.CopiesResponse:
            results, incomplete = self.node.internal_copies(request.keys)
            return pb.CopiesResponse(results=results, incomplete=pack_flags(incomplete))

        result: pb.CopiesResponse = await self._guard(context, work)
        return result

    async def PartitionDigests(self, request: pb.DigestRequest, context: Ctx) -> pb.DigestResponse:
        async def work() -> pb.DigestResponse:
            digests, counts = self.node.internal_digests(
                self.node.partitions_arg(request.partitions)
            )
            return pb.DigestResponse(
                digests=pack_digests(digests),
                counts=pack_counts(counts),
                epoch=self.node.table.epoch,
            )

        result: pb.DigestResponse = await self._guard(context, work)
        return result

    async def FetchPartitions(
        self, request: pb.FetchRequest, context: Ctx
    ) -> AsyncIterator[pb.EntryBatch]:
        try:
            self.authz.node_of_my_pop(context)
            parts = self.node.partitions_arg(request.partitions)
        except DhtError as e:
            await context.abort(grpc_status(e), str(e))
        async for chunk in self.node.internal_fetch(parts, request.settled_only):
            yield pb.EntryBatch(
                format_version=FORMAT_VERSION, entries=chunk, from_node=self.node.config.node_id
            )
