"""A local cluster of real ``dht node`` processes on this machine.

Used by ``dht cluster``, ``dht demo`` and the system tests. Library code: it raises and
never exits; signals belong to the CLI.

Each node process is started with ``--announce``: once ready, it prints one JSON line
(``{"node_id", "grpc", "peer", "admin", "pid"}``) on stdout, and that line, not a sleep,
is what the cluster waits for.

With ``tls_dir`` the cluster runs with mutual TLS (docs/security.md): it makes (or reuses)
a CA and a certificate per node, per PoP's forwarder and for an operator there
(dht.tools.certs), and every node serves and calls with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dht.core.errors import ConfigError, DhtError

# The trust domain of the certificates a local cluster makes (docs/security.md).
CLUSTER = "dht.local"

POP_NAMES = ("ams", "fra", "lon", "nyc", "sfo", "sin", "syd", "tyo", "gru", "jnb")


def pop_names(n: int) -> list[str]:
    return [POP_NAMES[i] if i < len(POP_NAMES) else f"pop{i + 1}" for i in range(n)]


def free_ports(host: str, n: int) -> list[int]:
    """n distinct ports the kernel reports free now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NodeSpec:
    pop: str
    node_id: str
    host: str
    grpc_port: int
    admin_port: int
    peer_port: int

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.peer_port}"

    @property
    def admin(self) -> str:
        return f"{self.host}:{self.admin_port}"


@dataclass
class NodeProcess:
    spec: NodeSpec
    proc: asyncio.subprocess.Process
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def endpoint(self) -> dict[str, object]:
        s = self.spec
        return {
            "pop": s.pop,
            "node_id": s.node_id,
            "grpc": s.grpc,
            "peer": s.peer,
            "admin": s.admin,
            "pid": self.pid,
        }


def plan(
    pops: int, nodes_per_pop: int, host: str = "127.0.0.1", base_port: int | None = None
) -> list[NodeSpec]:
    if pops < 1 or nodes_per_pop < 1:
        raise ConfigError("--pops and --nodes-per-pop must be >= 1")
    total = pops * nodes_per_pop
    if base_port is None:
        ports = free_ports(host, 3 * total)
    else:
        if not 1 <= base_port <= 65535 - 3 * total:
            raise ConfigError(f"--base-port {base_port} leaves no room for {3 * total} ports")
        ports = list(range(base_port, base_port + 3 * total))
    specs = []
    for p, pop in enumerate(pop_names(pops)):
        for n in range(nodes_per_pop):
            i = p * nodes_per_pop + n
            grpc_port, admin_port, peer_port = ports[3 * i : 3 * i + 3]
            specs.append(NodeSpec(pop, f"{pop}-{n + 1}", host, grpc_port, admin_port, peer_port))
    return specs


def node_args(spec: NodeSpec, specs: Sequence[NodeSpec], extra: Sequence[str] = ()) -> list[str]:
    """The ``dht node`` arguments for one node of a planned cluster: its PoP's other
    nodes as ``--peers``, every other PoP's nodes as ``--pop-peers``."""
    pops = {s.pop for s in specs}
    pop_ids = ",".join(
        f"{name}={i + 1}" for i, name in enumerate(sorted(pops, key=pop_names_order))
    )
    peers = [
        f"{s.node_id}={s.grpc},{s.admin},{s.peer}"
        for s in specs
        if s.pop == spec.pop and s is not spec
    ]
    args = [
        "node",
        "--node-id",
        spec.node_id,
        "--pop",
        spec.pop,
        "--pops",
        pop_ids,
        "--host",
        spec.host,
        "--grpc-port",
        str(spec.grpc_port),
        "--peer-port",
        str(spec.peer_port),
        "--admin-port",
        str(spec.admin_port),
    ]
    if peers:
        args += ["--peers", *peers]
    others: dict[str, list[str]] = {}
    for s in specs:
        if s.pop != spec.pop:
            others.setdefault(s.pop, []).append(s.peer)
    if others:
        args += ["--pop-peers", *(f"{pop}={','.join(a)}" for pop, a in others.items())]
    return [*args, *extra]


def pop_names_order(name: str) -> int:
    return POP_NAMES.index(name) if name in POP_NAMES else len(POP_NAMES) + int(name[3:])


class LocalCluster:
    """Start, describe and stop a planned set of node processes."""

    def __init__(
        self,
        specs: Sequence[NodeSpec],
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 30.0,
        pop_args: Mapping[str, Sequence[str]] | None = None,
        tls_dir: str | Path | None = None,
        per_node_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.specs = list(specs)
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self.extra_args = list(extra_args)
        # Extra `dht node` flags for the nodes of one PoP (say, its --dial-via proxies).
        self.pop_args = {k: list(v) for k, v in (pop_args or {}).items()}
        # ... and for one node, by node id (say, its clock offset or its --dial-via).
        self.per_node_args = {k: list(v) for k, v in (per_node_args or {}).items()}
        self.start_timeout_s = start_timeout_s
        self.nodes: list[NodeProcess] = []

    def _certs(self, specs: Sequence[NodeSpec]) -> None:
        """Make (or reuse) the certificates of ``specs``' nodes, PoPs and an operator."""
        if self.tls_dir is None:
            return
        from dht.tools.certs import ensure_cluster_certs

        ensure_cluster_certs(
            self.tls_dir,
            CLUSTER,
            [(s.pop, s.node_id) for s in specs],
            sorted({s.pop for s in specs}, key=pop_names_order),
        )

    def tls_args(self, spec: NodeSpec) -> list[str]:
        """The ``dht node`` flags of a node's certificate (none without ``tls_dir``)."""
        if self.tls_dir is None:
            return []
        from dht.core.identity import Identity, Role
        from dht.tools.certs import cert_paths

        cert, key = cert_paths(self.tls_dir, Identity(Role.NODE, CLUSTER, spec.pop, spec.node_id))
        ca = self.tls_dir / "ca.pem"
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]

    async def start(self) -> None:
        self._certs(self.specs)
        try:
            for spec in self.specs:
                self.nodes.append(await self.spawn(spec))
            await asyncio.gather(*(self.wait_ready(n) for n in self.nodes))
        except BaseException:
            await self.stop()
            raise

    async def spawn(self, spec: NodeSpec) -> NodeProcess:
        extra = [
            *self.extra_args,
            *self.pop_args.get(spec.pop, ()),
            *self.per_node_args.get(spec.node_id, ()),
            *self.tls_args(spec),
            "--announce",
        ]
        args = node_args(spec, self.specs, extra)
        return await self._exec(spec, args)

    async def _exec(self, spec: NodeSpec, args: list[str]) -> NodeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dht",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        return NodeProcess(spec, proc, args)

    async def wait_ready(self, node: NodeProcess) -> None:
        assert node.proc.stdout is not None
        try:
            line = await asyncio.wait_for(node.proc.stdout.readline(), self.start_timeout_s)
        except TimeoutError:
            raise DhtError(
                f"node {node.spec.node_id} not ready after {self.start_timeout_s} s"
            ) from None
        if not line:
            code = await node.proc.wait()
            raise DhtError(
                f"node {node.spec.node_id} exited with status {code} before it was ready"
            )
        info = json.loads(line)
        if info.get("grpc") != node.spec.grpc:
            raise DhtError(f"node {node.spec.node_id} announced {info}, expected {node.spec.grpc}")

    async def add_node(self, pop: str | None = None) -> NodeProcess:
        """Start one more node in ``pop`` (default: the first PoP) that joins the running
        ones through ``--seeds`` (their peer-plane addresses) rather than a static peer
        list."""
        pop = pop or self.specs[0].pop
        same = [s for s in self.specs if s.pop == pop]
        host = same[0].host
        grpc_port, admin_port, peer_port = free_ports(host, 3)
        spec = NodeSpec(pop, f"{pop}-{len(same) + 1}", host, grpc_port, admin_port, peer_port)
        self._certs([*self.specs, spec])
        pop_ids = ",".join(
            f"{name}={i + 1}"
            for i, name in enumerate(sorted({s.pop for s in self.specs}, key=pop_names_order))
        )
        args = [
            "node", "--node-id", spec.node_id, "--pop", pop, "--pops", pop_ids,
            "--host", host, "--grpc-port", str(grpc_port), "--admin-port", str(admin_port),
            "--peer-port", str(peer_port), "--seeds", *(s.peer for s in same),
            *self.extra_args, *self.tls_args(spec), "--announce",
        ]  # fmt: skip
        node = await self._exec(spec, args)
        self.specs.append(spec)
        self.nodes.append(node)
        await self.wait_ready(node)
        return node

    async def restart(self, node: NodeProcess) -> NodeProcess:
        """Start a stopped node again with the same arguments."""
        fresh = await self._exec(node.spec, node.args)
        self.nodes[self.nodes.index(node)] = fresh  # stop() owns it from here on
        await self.wait_ready(fresh)
        return fresh

    def endpoints(self) -> dict[str, object]:
        return {"nodes": [n.endpoint() for n in self.nodes]}

    def write_endpoints(self, path: str | Path) -> None:
        """Atomically: write a temporary file beside it, then rename over it."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.endpoints(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node (graceful), then SIGKILL whatever is left after the timeout."""
        live = [n for n in self.nodes if n.proc.returncode is None]
        for n in live:
            with contextlib.suppress(ProcessLookupError):
                n.proc.send_signal(signal.SIGTERM)
        if live:
            _, pending = await asyncio.wait(
                [asyncio.create_task(n.proc.wait()) for n in live], timeout=timeout_s
            )
            for n in live:
                if n.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        n.proc.kill()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
