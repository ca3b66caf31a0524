"""The I/O shell of a node: gRPC server (FlowTable, grpc.health.v1, reflection), peer
channels for one-hop forwarding, the admin endpoint, and the lifecycle around them.

Errors are mapped to gRPC status in exactly one place (:meth:`FlowTableService._run`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dht import convert
from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.admin import AdminServer
from dht.config import NodeConfig, TlsConfig
from dht.errors import DhtError, grpc_status
from dht.node import BatchCall, Node, Op
from dht.placement import Member

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FlowTable"].full_name


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    ca = _read(tls.ca_file) if tls.ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: verify the server against the CA, present our cert."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file) if tls.ca_file else None,
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


def open_channel(address: str, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if creds is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, creds)


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


class Peers:
    """Channels to the other nodes of the PoP, opened on first use, closed on stop."""

    def __init__(self, creds: grpc.ChannelCredentials | None, timeout_s: float) -> None:
        self._creds = creds
        self._timeout_s = timeout_s
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.FlowTableAsyncStub]] = {}

    def stub(self, member: Member) -> pb_grpc.FlowTableAsyncStub:
        entry = self._stubs.get(member.address)
        if entry is None:
            channel = open_channel(member.address, self._creds)
            entry = (channel, pb_grpc.FlowTableStub(channel))
            self._stubs[member.address] = entry
        return entry[1]

    async def forward(self, member: Member, call: BatchCall) -> bytes:
        stub = self.stub(member)
        method = getattr(stub, call.op.value)
        if call.op in (Op.GET_AFFINITY, Op.SET_AFFINITY):
            aresp: pb.AffinityResponse = await method(
                convert.affinity_request(call), timeout=self._timeout_s
            )
            return aresp.results
        fresp: pb.FlowBatchResponse = await method(
            convert.flow_request(call), timeout=self._timeout_s
        )
        return fresp.results

    async def close(self) -> None:
        channels = [c for c, _ in self._stubs.values()]
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


class NodeServer:
    """A node with its gRPC server and admin endpoint. ``start()`` returns once both
    listen; ``stop()`` is graceful, bounded and safe to call twice."""

    def __init__(self, config: NodeConfig, wall_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self.node = Node(config, wall_ms)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._admin: AdminServer | None = None
        creds = channel_credentials(config.tls) if config.tls else None
        self.peers = Peers(creds, config.forward_timeout_ms / 1000)
        self.node.forwarder = self.peers.forward
        self._stopped = False

    @property
    def grpc_address(self) -> str:
        return f"{self.config.advertised}:{self.node.grpc_port}"

    @property
    def admin_address(self) -> str:
        return f"{self.config.advertised}:{self.node.admin_port}"

    async def start(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)],
        )
        pb_grpc.add_FlowTableServicer_to_server(FlowTableService(self.node), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
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
        self.node.set_membership(port, admin_port)
        await server.start()
        self.node.start_loops()
        self.node.accepting = True
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "node %s serving gRPC on %s, admin on %s",
            cfg.node_id,
            self.grpc_address,
            self.admin_address,
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.node.accepting = False
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            # In-flight calls get the grace period, then are cancelled.
            await self._server.stop(self.config.shutdown_grace_s)
        await self.node.stop_loops()
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
