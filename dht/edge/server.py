"""The I/O shell of a node: the gRPC server (FlowTable, NodeInternal, PopLink,
grpc.health.v1, reflection), the peer transport for replication and one-hop forwarding,
the admin endpoint, the UDP lookup listener, and the lifecycle around them.

The servicers are in :mod:`dht.edge.servicers` and :mod:`dht.edge.pop_grpc`, the peer
transport in :mod:`dht.edge.peer_grpc`. Errors are mapped to gRPC status in one place,
:func:`dht.edge.status.grpc_status`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.config import NodeConfig
from dht.edge.admin import AdminServer
from dht.edge.channels import channel_credentials, open_channel, server_credentials
from dht.edge.decode import add_checked
from dht.edge.peer_grpc import GrpcPeerTransport
from dht.edge.pop_grpc import SERVICE_NAME as POP_SERVICE_NAME
from dht.edge.pop_grpc import GrpcPopTransport, PopLinkService
from dht.edge.servicers import (
    INTERNAL_SERVICE_NAME,
    SERVICE_NAME,
    FlowTableService,
    NodeInternalService,
)
from dht.edge.udp import UdpLookupProtocol, start_listener
from dht.node.node import Node
from dht.pops.extension import Pops

log = logging.getLogger(__name__)


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
        self.peers = GrpcPeerTransport(
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
        # Requests that do not decode are answered INVALID_ARGUMENT (dht.edge.decode).
        add_checked(pb_grpc.add_FlowTableServicer_to_server, FlowTableService(self.node), server)
        add_checked(
            pb_grpc.add_NodeInternalServicer_to_server, NodeInternalService(self.node), server
        )
        add_checked(pb_grpc.add_PopLinkServicer_to_server, PopLinkService(self.pops), server)
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
