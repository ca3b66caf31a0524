"""HTTP admin endpoint (aiohttp), run inside the node's own event loop with AppRunner +
TCPSite.

    GET    /livez                 200 while the process and its loops are healthy
    GET    /readyz                200 when serving and holding its partitions, else 503 + reasons
    GET    /metrics               Prometheus text format
    GET    /partitions            the partition table (epoch, members, counts; ?full=1 adds
                                  every partition's replicas)
    GET    /flow?flow=FLOW        look a flow up through the normal routing (JSON)
    DELETE /flow?flow=FLOW[&pop=NAME]  force-release a flow (needs the admin token)
    GET    /affinity?client=ADDR  the client's preferred PoP
    GET    /members               this node's membership view (SWIM states, incarnations)
    GET    /digests[?partitions=1,2]  per-partition digests and record counts of the
                                  partitions this node replicates (anti-entropy compares
                                  these; equal digests = identical copies)

With TLS configured the endpoint is HTTPS with the node's certificate; a client
certificate of the cluster's CA is asked for but not required (probes and scrapers read
without one). Mutating calls need an operator's certificate (docs/security.md#roles) or
``Authorization: Bearer <admin_token>``; with neither configured they are disabled (403).
"""

from __future__ import annotations

import hmac
import ssl
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from aiohttp import web

from dht.core.config import NodeConfig
from dht.core.errors import DhtError, InvalidArgument, PermissionDenied
from dht.core.identity import Role, parse_identity_uri
from dht.core.ops import BatchCall, Op
from dht.core.peers import replica_mask
from dht.core.wire import decode_results, parse_address, parse_flow, result_to_dict
from dht.edge.status import http_status
from dht.node.node import Node


class AdminHost(Protocol):
    """What the admin endpoint serves (:class:`dht.edge.server.NodeServer` is one): a
    node and its configuration."""

    @property
    def node(self) -> Node: ...

    @property
    def config(self) -> NodeConfig: ...


NODE = web.AppKey[AdminHost]("node_server")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except DhtError as e:
        return _json({"error": str(e)}, status=http_status(e))


def _pop_names(srv: AdminHost) -> dict[int, str]:
    return {i: n for n, i in srv.config.pops.items()}


def _operator(request: web.Request) -> bool:
    """The caller presented an operator's certificate (the TLS handshake checked it
    against the cluster's CA)."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        return False
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1:
        return False
    try:
        who = parse_identity_uri(uris[0])
    except ValueError:
        return False
    return who.role is Role.OPERATOR


def _require_token(srv: AdminHost, request: web.Request) -> None:
    if srv.config.tls is not None and _operator(request):
        return
    token = srv.config.admin_token
    if token is None:
        raise PermissionDenied(
            "mutating admin calls need an operator certificate (docs/security.md#roles) "
            "or the admin token; no admin_token is configured"
        )
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise PermissionDenied("missing or wrong admin token (Authorization: Bearer TOKEN)")


def _query(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise InvalidArgument(name, "query parameter is required")
    return value


async def livez(request: web.Request) -> web.Response:
    node = request.app[NODE].node
    if node.live():
        return _json({"live": True})
    return _json({"live": False, "failed_loops": node.failed_loops}, status=500)


async def readyz(request: web.Request) -> web.Response:
    ready, reasons = request.app[NODE].node.readiness()
    return _json({"ready": ready, "reasons": reasons}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE].node.metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def partitions(request: web.Request) -> web.Response:
    srv = request.app[NODE]
    pmap = srv.node.table
    data: dict[str, Any] = {
        "epoch": pmap.epoch,
        "pop": srv.config.pop,
        "num_partitions": pmap.num_partitions,
        "replication_factor": pmap.replication_factor,
        "members": [
            {
                "index": i,
                "node_id": mb.node_id,
                "address": mb.address,
                "admin_address": mb.admin_address,
                "primary_partitions": pmap.partition_counts(0)[i],
                "replica_partitions": pmap.partition_counts(None)[i],
            }
            for i, mb in enumerate(pmap.members)
        ],
    }
    if request.query.get("full"):
        data["replicas"] = pmap.replicas.tolist()
    return _json(data)


async def _flow_call(srv: AdminHost, op: Op, flow_text: str, pop: int = 0) -> dict[str, Any]:
    key = parse_flow(flow_text)
    raw = await srv.node.batch(BatchCall(op=op, payload=key.to_bytes(), pop=pop))
    return {"flow": str(key), **result_to_dict(decode_results(raw)[0], _pop_names(srv))}


async def get_flow(request: web.Request) -> web.Response:
    return _json(await _flow_call(request.app[NODE], Op.LOOKUP, _query(request, "flow")))


async def delete_flow(request: web.Request) -> web.Response:
    srv = request.app[NODE]
    _require_token(srv, request)
    pop_name = request.query.get("pop", srv.config.pop)
    if pop_name not in srv.config.pops:
        raise InvalidArgument("pop", f"unknown PoP {pop_name!r}")
    flow = _query(request, "flow")
    return _json(await _flow_call(srv, Op.RELEASE, flow, srv.config.pops[pop_name]))


async def get_affinity(request: web.Request) -> web.Response:
    srv = request.app[NODE]
    addr = parse_address(_query(request, "client"), "client")
    packed = addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed
    raw = await srv.node.batch(BatchCall(op=Op.GET_AFFINITY, payload=packed))
    return _json({"client": str(addr), **result_to_dict(decode_results(raw)[0], _pop_names(srv))})


async def members(request: web.Request) -> web.Response:
    node = request.app[NODE].node
    return _json(
        {
            "node_id": node.config.node_id,
            "epoch": node.table.epoch,
            "members": [
                {
                    "node_id": s.node_id,
                    "address": s.address,
                    "admin_address": s.admin_address,
                    "incarnation": s.incarnation,
                    "status": s.status.name.lower(),
                }
                for s in sorted(node.membership.view(), key=lambda s: s.node_id)
            ],
        }
    )


def _partition_ids(wanted: str, num_partitions: int) -> npt.NDArray[np.intp]:
    """``?partitions=1,2``: ids in 0..num_partitions-1, else InvalidArgument (400)."""
    items = wanted.split(",")
    if len(items) > num_partitions:
        raise InvalidArgument("partitions", f"{len(items)} ids, more than {num_partitions}")
    ids: set[int] = set()
    for item in items:
        text = item.strip()
        # Partition ids have at most 5 digits: longer text is refused before int() parses it.
        if not (text.isascii() and text.isdigit() and len(text) <= 5):
            raise InvalidArgument(
                "partitions", f"{item[:20]!r}: want comma-separated ids 0..{num_partitions - 1}"
            )
        p = int(text)
        if p >= num_partitions:
            raise InvalidArgument("partitions", f"{p} outside 0..{num_partitions - 1}")
        ids.add(p)
    return np.array(sorted(ids), dtype=np.intp)


async def digests(request: web.Request) -> web.Response:
    node = request.app[NODE].node
    wanted = request.query.get("partitions")
    mine = np.flatnonzero(replica_mask(node.table, node.self_index))
    if wanted:
        parts = _partition_ids(wanted, node.table.num_partitions)
        mine = np.intersect1d(mine, parts)
    sums, counts = node.partition_digests()
    return _json(
        {
            "node_id": node.config.node_id,
            "epoch": node.table.epoch,
            "in_sync": node.in_sync,
            "partitions": {
                str(p): {"digest": f"{int(sums[p]):016x}", "records": int(counts[p])} for p in mine
            },
        }
    )


class AdminServer:
    def __init__(self, srv: AdminHost) -> None:
        self.app = web.Application(middlewares=[_errors])
        self.app[NODE] = srv
        self.app.router.add_get("/livez", livez)
        self.app.router.add_get("/readyz", readyz)
        self.app.router.add_get("/metrics", metrics)
        self.app.router.add_get("/partitions", partitions)
        self.app.router.add_get("/flow", get_flow)
        self.app.router.add_delete("/flow", delete_flow)
        self.app.router.add_get("/affinity", get_affinity)
        self.app.router.add_get("/digests", digests)
        self.app.router.add_get("/members", members)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl())
        await site.start()
        # TCPSite does not expose the bound port (port 0 = a free one); its server does.
        sockets = getattr(site._server, "sockets", None)
        if not sockets:
            raise OSError(f"admin endpoint did not bind {host}:{port}")
        bound: int = sockets[0].getsockname()[1]
        return bound

    def _ssl(self) -> ssl.SSLContext | None:
        tls = self.app[NODE].config.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
