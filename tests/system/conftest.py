"""Fixtures for system tests: local clusters of real ``dht node`` processes.

Every process a test starts (including the ones ``LocalCluster.restart`` spawns) is
recorded, and stopped at the end of the test whatever happened: resumed if it was left
SIGSTOPped, SIGTERMed, then SIGKILLed by PID if it did not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
import pytest

from dht.tools.cluster import LocalCluster, NodeProcess, NodeSpec, plan

# The fast timing profile (probes 0.2 s, failure timeout 2 s, anti-entropy every 1 s,
# pause threshold 1 s), quiet logs.
TEST_NODE_ARGS = ("--profile", "test", "--log-level", "warning")


class TrackedCluster(LocalCluster):
    """A LocalCluster that remembers every process it ever spawned (restarts too)."""

    def __init__(self, specs: Sequence[NodeSpec], extra_args: Sequence[str] = ()) -> None:
        super().__init__(specs, extra_args)
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
    """An HTTP session for the admin endpoints; every request is bounded."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        yield session
