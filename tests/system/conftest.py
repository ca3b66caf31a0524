"""Fixtures for system tests: local clusters of real ``dht node`` processes.

Every process a test starts (including the ones ``LocalCluster.restart`` spawns) is
recorded, and stopped at the end of the test whatever happened: resumed if it was left
SIGSTOPped, SIGTERMed, then SIGKILLed by PID if it did not exit in time.

With ``DHT_TEST_TLS=1`` every cluster runs with mutual TLS (docs/security.md): the nodes
with certificates made in one directory for the session, the tests' clients and admin
requests as the operator, their direct node-to-node calls as a node of the PoP. The
tests read the mode through :func:`connect`, :func:`admin_url`, :func:`node_channel` and the
``http`` fixture, so one test body runs either way (scripts/test.sh runs the fault,
membership and PoP modules both ways).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from dht.client import Client
from dht.core.config import TlsConfig
from dht.core.identity import Identity, Role
from dht.edge.channels import channel_credentials, open_channel
from dht.tools.certs import ca_cluster, cert_paths, client_tls, ensure_cluster_certs
from dht.tools.cluster import CLUSTER, LocalCluster, NodeProcess, NodeSpec, plan

TLS = os.environ.get("DHT_TEST_TLS", "") == "1"
# Under scripts/with_hog.py (a CPU hog on every core) the nodes get a fraction of a
# core: waits for progress (claims acknowledged again, a node back in sync) get this
# many times their quiet-machine bound. What the tests check of the answers is the same.
PROGRESS_SLACK = 3.0 if os.environ.get("DHT_TEST_HOG", "") == "1" else 1.0
CERTS: Path | None = None
if TLS:
    CERTS = Path(tempfile.mkdtemp(prefix="dht-test-certs-"))
    atexit.register(shutil.rmtree, CERTS, True)
    # The CA and the operator now; each cluster adds its nodes' certificates at start.
    ensure_cluster_certs(CERTS, CLUSTER, [], [])


def operator_tls() -> TlsConfig | None:
    """The operator's TLS settings (None without TLS)."""
    if CERTS is None:
        return None
    tls = client_tls(CERTS, Role.OPERATOR)
    assert tls is not None, f"no operator certificate in {CERTS}"
    return tls


def node_tls(pop: str, node_id: str) -> TlsConfig | None:
    """A node's own TLS settings, for a test's direct calls on the peer plane."""
    if CERTS is None:
        return None
    cert, key = cert_paths(CERTS, Identity(Role.NODE, ca_cluster(CERTS), pop, node_id))
    return TlsConfig(str(cert), str(key), str(CERTS / "ca.pem"))


def connect(targets: Sequence[str], **kwargs: Any) -> Client:
    """A Client of the test (as the operator, with TLS)."""
    return Client(list(targets), tls=operator_tls(), **kwargs)


def admin_url(address: str, path: str) -> str:
    return f"{'https' if TLS else 'http'}://{address}{path}"


def node_channel(address: str, tls: TlsConfig | None) -> grpc.aio.Channel:
    """A gRPC channel to one node (``tls``: whose certificate to present, if TLS)."""
    return open_channel(address, channel_credentials(tls) if tls is not None else None)


# The fast timing profile (probes 0.2 s, failure timeout 2 s, anti-entropy every 1 s,
# pause threshold 1 s), quiet logs.
TEST_NODE_ARGS = ("--profile", "test", "--log-level", "warning")


class TrackedCluster(LocalCluster):
    """A LocalCluster that remembers every process it ever spawned (restarts too)."""

    def __init__(self, specs: Sequence[NodeSpec], extra_args: Sequence[str] = ()) -> None:
        super().__init__(specs, extra_args, tls_dir=CERTS)
        self.started: list[NodeProcess] = []

    async def _exec(self, spec: NodeSpec, args: list[str]) -> NodeProcess:
        # Every start goes through here: start(), restart() and add_node().
        node = await super()._exec(spec, args)
        self.started.append(node)
        return node


MakeCluster = Callable[..., Awaitable[TrackedCluster]]


async def shutdown(cluster: TrackedCluster) -> None:
    """Stop every process the cluster started: SIGCONT (a stopped process cannot act
    on SIGTERM), graceful stop, then SIGKILL by PID whatever is still running."""
    for n in cluster.started:
        if n.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.pid, signal.SIGCONT)
    try:
        await cluster.stop(timeout_s=10)
    finally:
        for n in cluster.started:
            if n.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.pid, signal.SIGKILL)
                await n.proc.wait()


@pytest.fixture
async def make_cluster() -> AsyncIterator[MakeCluster]:
    """``await make_cluster(nodes=3, extra=())``: a started one-PoP cluster."""
    clusters: list[TrackedCluster] = []

    async def make(nodes: int = 3, extra: Sequence[str] = ()) -> TrackedCluster:
        cluster = TrackedCluster(plan(1, nodes), [*TEST_NODE_ARGS, *extra])
        clusters.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            await shutdown(cluster)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session for the admin endpoints (HTTPS as the operator with TLS); every
    request is bounded."""
    connector = None
    tls = operator_tls()
    if tls is not None:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        connector = aiohttp.TCPConnector(ssl=ctx)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=3), connector=connector
    ) as session:
        yield session
