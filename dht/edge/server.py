"""The I/O shell of a node: two gRPC servers, one per plane (docs/security.md#planes) -
the public one (FlowTable, grpc.health.v1, reflection) for forwarders, the peer one
(NodeInternal, PopLink, FlowTable for forwards, health, reflection) for other nodes - the
peer transport for replication and one-hop forwarding, the admin endpoint, the UDP lookup
listener, and the lifecycle around them.

The servicers are in :mod:`dht.edge.servicers` and :mod:`dht.edge.pop_grpc`, the peer
transport in :mod:`dht.edge.peer_grpc`. Errors are mapped to gRPC status in one place,
:func:`dht.edge.status.grpc_status`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.config import NodeConfig
from dht.core.errors import ConfigError
from dht.core.identity import Role
from dht.edge.admin import AdminServer
from dht.edge.authz import Authorizer
from dht.edge.channels import channel_credentials, open_channel, server_credentials
from dht.edge.decode import add_checked
from dht.edge.identity import identity_of_pem
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
from dht.node.tasks import CANCEL_BOUND_S
from dht.pops.extension import Pops

log = logging.getLogger(__name__)


class NodeServer:
    """A node with its gRPC server and admin endpoint. ``start()`` returns once both
    listen; ``stop()`` is graceful, bounded and safe to call twice."""

    def __init__(self, config: NodeConfig, wall_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._peer_server: grpc.aio.Server | None = None
        self.authz = Authorizer(config, _cluster_of(config))
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
            config.dial_via,
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
        if self.authz.enabled:
            self.node.metrics.add_gauges(self.authz.gauges)
        self._pop_service = PopLinkService(self.pops, self.authz)
        self._stopped = False

    @property
    def grpc_address(self) -> str:
        return f"{self.config.advertised}:{self.node.grpc_port}"

    @property
    def peer_address(self) -> str:
        return f"{self.config.advertised}:{self.node.peer_port}"

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

    def _bind(self, server: grpc.aio.Server, port: int, what: str) -> int:
        cfg = self.config
        bind = f"{cfg.host}:{port}"
        if cfg.tls:
            bound = server.add_secure_port(bind, server_credentials(cfg.tls))
        else:
            bound = server.add_insecure_port(bind)
        if bound == 0:
            raise OSError(f"cannot bind the {what} gRPC port to {bind}")
        return bound

    async def start(self) -> None:
        cfg = self.config
        options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        # The public plane. Requests that do not decode are answered INVALID_ARGUMENT
        # (dht.edge.decode).
        server = grpc.aio.server(options=options)
        add_checked(
            pb_grpc.add_FlowTableServicer_to_server,
            FlowTableService(self.node, self.authz),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = self._bind(server, cfg.grpc_port, "public")
        self._server = server
        # The peer plane: other nodes of this PoP, and other PoPs' nodes.
        peer = grpc.aio.server(options=options)
        add_checked(
            pb_grpc.add_FlowTableServicer_to_server,
            FlowTableService(self.node, self.authz, peer_plane=True),
            peer,
        )
        add_checked(
            pb_grpc.add_NodeInternalServicer_to_server,
            NodeInternalService(self.node, self.authz),
            peer,
        )
        add_checked(pb_grpc.add_PopLinkServicer_to_server, self._pop_service, peer)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, peer)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                INTERNAL_SERVICE_NAME,
                POP_SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            peer,
        )
        peer_port = self._bind(peer, cfg.peer_port, "peer")
        self._peer_server = peer
        admin_port = -1
        if cfg.admin_port >= 0:
            self._admin = AdminServer(self)
            admin_port = await self._admin.start(cfg.host, cfg.admin_port)
        self.node.init_membership(port, admin_port, peer_port)
        if cfg.udp_lookup_port >= 0:
            self._udp = await start_listener(self.node, cfg.host, cfg.udp_lookup_port or port)
        await peer.start()
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

    def stop_bound_s(self, leave: bool = True) -> float:
        """How long :meth:`stop` may take at most, whatever is in flight
        (docs/operations.md#stopping-a-node): the leave and its hand-off (with its writes'
        drain), the servers' grace, the UDP listener's grace, the writes' drain, the
        cancellation of the loops, and a second for closing channels."""
        cfg = self.config
        drain = 2 * cfg.rpc_timeout_ms / 1000
        leaving = cfg.leave_timeout_s + drain if leave else 0.0
        return leaving + 2 * cfg.shutdown_grace_s + drain + CANCEL_BOUND_S + 1.0

    async def stop(self, leave: bool = True) -> None:
        """Graceful stop: with ``leave``, announce the leave and hand the partitions off
        (bounded by leave_timeout_s) while still serving; then stop serving. Finishes
        within :meth:`stop_bound_s`."""
        if self._stopped:
            return
        self._stopped = True
        if leave:
            await self.node.leave(self.config.leave_timeout_s)
        self.node.accepting = False
        await self._health.enter_graceful_shutdown()
        # In-flight calls get the grace period, then are cancelled; the other PoPs'
        # Ship streams would hold it all (they end only when their sender stops).
        self._pop_service.end_streams()
        grace = self.config.shutdown_grace_s
        await asyncio.gather(
            *(s.stop(grace) for s in (self._server, self._peer_server) if s is not None)
        )
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


def _cluster_of(config: NodeConfig) -> str | None:
    """The trust domain this node's certificate names (None: TLS off). The certificate
    must name this very node: a node started with another node's certificate would be
    refused by every peer, so it is refused here first, with the reason."""
    if config.tls is None:
        return None
    with open(config.tls.cert_file, "rb") as f:
        me = identity_of_pem(f.read())
    if me is None:
        raise ConfigError(
            f"{config.tls.cert_file} names no dht identity (make one with `dht certs node`)"
        )
    if me.role is not Role.NODE or me.pop != config.pop or me.name != config.node_id:
        raise ConfigError(
            f"{config.tls.cert_file} is the certificate of {me.role} {me.pop}/{me.name}, "
            f"not of node {config.pop}/{config.node_id}"
        )
    return me.cluster
