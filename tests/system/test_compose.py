"""docker-compose.yml, exercised without a Docker engine.

The static tests check that the services are wired to each other (each node lists its own
PoP's other nodes as --peers with their public gRPC, admin and peer addresses, and every
other PoP's nodes as --pop-peers with their peer-plane addresses; ids, hosts and ports
agree with the other services; health check and published ports point at the ports the
node listens on), that every node runs with mutual TLS from the certificates volume
(mounted read-only, after the one-shot ``certs`` service has exited 0), and that the
``certs`` service makes exactly the certificates the nodes name, so the file cannot drift.

The process tests run the ``certs`` service's own script locally first (its mount paths
mapped to a temporary directory; the host names it writes into the certificates kept),
then each node service's exact ``command`` as a real local ``python -m dht`` process, with
the service hostnames mapped to 127.0.0.1, every container port mapped to a free local
port (consistently, including inside the other services' ``--peers`` and
``--pop-peers``) and the certificate paths mapped to that directory; they keep the docker
profile but force ``--host 127.0.0.1`` (never 0.0.0.0), and add ``--announce``: the
announce line, not a sleep, says a node is serving. Then: /readyz over HTTPS, the compose
health check command itself, plaintext and certificate-less callers refused, forwarders
held to their own PoP, claims and look-ups through different nodes with the forwarder
certificates, and a SIGTERM stop with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.client import Client
from dht.core.config import TlsConfig
from dht.core.errors import PermissionDenied, Unavailable
from dht.core.identity import Role
from dht.core.record import Status
from dht.core.wire import parse_flow
from dht.edge.channels import channel_credentials
from dht.tools.certs import FORWARDER_NAME, OPERATOR_NAME, client_tls, describe
from dht.tools.cluster import free_ports

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
VALIDATE_SCRIPT = ROOT / "scripts" / "validate_compose.sh"
LOOPBACK = "127.0.0.1"
# The one-shot service that makes the CA and the certificates.
CERTS_SERVICE = "certs"
START_TIMEOUT_S = 30.0
# The node's graceful stop is bounded by shutdown_grace_s (5 s by default); slack on top.
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 5.0
HEALTHCHECK_TIMEOUT_S = 15.0
VALIDATE_TIMEOUT_S = 120.0
CERTS_TIMEOUT_S = 120.0
# How long a caller that should be refused gets to fail (it fails at the handshake).
REFUSED_TIMEOUT_S = 3.0

FLOWS = [
    "tcp/198.51.100.7:51000/192.0.2.1:443",
    "tcp/198.51.100.8:51001/192.0.2.1:443",
    "udp/198.51.100.9:5353/192.0.2.2:53",
    "tcp/[2001:db8::7]:51000/[2001:db8::1]:443",
    "udp/[2001:db8::8]:40000/[2001:db8::1]:4433",
    "tcp/203.0.113.50:33333/192.0.2.3:80",
]

# host:port as it appears in a command line or URL (the host is a name or IPv4 address).
HOST_PORT = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d+)(?!\d)")


# --------------------------------------------------------------------------- the file


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and data.get("services"), "docker-compose.yml has no services"
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(load_compose()["services"])


def node_services() -> dict[str, dict[str, Any]]:
    """Every service but the one-shot ``certs``: the nodes."""
    nodes = {name: svc for name, svc in services().items() if name != CERTS_SERVICE}
    for name, svc in nodes.items():
        assert command(svc)[0] == "node", f"{name}: command must start with `node`"
    return nodes


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert isinstance(cmd, list), f"command must be an exec-form list, got {cmd!r}"
    return [str(a) for a in cmd]


def flag_values(cmd: list[str], flag: str) -> list[str]:
    """The values after ``flag`` up to the next ``--option`` (``--peers`` takes several)."""
    if flag not in cmd:
        return []
    out = []
    for arg in cmd[cmd.index(flag) + 1 :]:
        if arg.startswith("--"):
            break
        out.append(arg)
    return out


def flag_value(cmd: list[str], flag: str) -> str:
    values = flag_values(cmd, flag)
    assert len(values) == 1, f"{flag} wants one value in {cmd}, got {values}"
    return values[0]


def flag_names(cmd: list[str]) -> list[str]:
    return [a for a in cmd if a.startswith("--")]


def hostname(name: str, svc: dict[str, Any]) -> str:
    return str(svc.get("hostname", name))


def container_port(spec: Any) -> int:
    """The container side of a ``ports`` entry (short or long syntax)."""
    if isinstance(spec, dict):
        return int(spec["target"])
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def service_ports(svc: dict[str, Any]) -> set[int]:
    cmd = command(svc)
    ports = {int(flag_value(cmd, f)) for f in ("--grpc-port", "--admin-port", "--peer-port")}
    ports |= {container_port(p) for p in svc.get("ports", [])}
    return ports


def parse_peer(text: str) -> tuple[str, str, str, str]:
    """``ID=HOST:PORT,ADMIN_HOST:PORT,PEER_HOST:PORT``: all three, in the file."""
    node_id, sep, rest = text.partition("=")
    parts = rest.split(",")
    assert sep and len(parts) == 3, f"peer {text!r}: want ID=HOST:PORT,ADMIN:PORT,PEER:PORT"
    return node_id, parts[0], parts[1], parts[2]


def healthcheck_argv(svc: dict[str, Any]) -> list[str]:
    test = svc.get("healthcheck", {}).get("test")
    assert isinstance(test, list) and test and test[0] == "CMD", (
        f"healthcheck.test should be an exec-form ['CMD', ...] list, got {test!r}"
    )
    return [str(a) for a in test[1:]]


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(svc: dict[str, Any]) -> list[Mount]:
    """A service's ``volumes`` (short or long syntax)."""
    out = []
    for spec in svc.get("volumes", []):
        if isinstance(spec, dict):
            ro = bool(spec.get("read_only", False))
            out.append(Mount(str(spec.get("source", "")), str(spec["target"]), ro))
        else:
            parts = str(spec).split(":")
            mode = parts[2].split(",") if len(parts) > 2 else []
            out.append(Mount(parts[0], parts[1], "ro" in mode))
    return out


def certs_volume() -> Mount:
    """The named volume the ``certs`` service writes into, where it mounts it."""
    data = load_compose()
    svc = data["services"].get(CERTS_SERVICE)
    assert svc is not None, f"no `{CERTS_SERVICE}` service makes the certificates"
    (mount,) = mounts(svc)
    assert mount.source in (data.get("volumes") or {}), f"{mount.source}: not a named volume"
    assert not mount.read_only, f"{CERTS_SERVICE} must write into {mount.source}"
    return mount


def certs_argv() -> list[str]:
    """The ``certs`` service's command line: ``sh -c SCRIPT``."""
    svc = services()[CERTS_SERVICE]
    entrypoint = svc.get("entrypoint")
    assert isinstance(entrypoint, list), f"{CERTS_SERVICE}: entrypoint must be a list"
    argv = [str(a) for a in [*entrypoint, *command(svc)]]
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, f"{CERTS_SERVICE}: want sh -c SCRIPT"
    # Compose interpolates $VAR (and wants $$ for a literal $): keep the script free of it.
    assert "$" not in argv[2], f"{CERTS_SERVICE}: the script uses $: compose interpolates it"
    return argv


def certs_commands() -> list[list[str]]:
    """The script's commands, one per line (``A || B`` as two), ``set -e`` left out."""
    out = []
    for line in certs_argv()[2].splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[:1] == ["set"]:
            continue
        while "||" in words:
            i = words.index("||")
            out.append(words[:i])
            words = words[i + 1 :]
        out.append(words)
    return out


def option(words: list[str], flag: str) -> list[str]:
    """Every value of a repeatable ``--flag VALUE`` in a `dht certs` command."""
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == flag]


# --------------------------------------------------------------------------- static checks


def test_services_run_the_same_command_shape() -> None:
    nodes = node_services()
    assert len(nodes) >= 2
    cmds = {name: command(svc) for name, svc in nodes.items()}
    first = next(iter(cmds.values()))
    for name, cmd in cmds.items():
        assert flag_names(cmd) == flag_names(first), f"{name}: flags differ from the others"
        for flag in ("--profile", "--pops", "--grpc-port", "--admin-port", "--peer-port"):
            assert flag_value(cmd, flag) == flag_value(first, flag), f"{name}: {flag} differs"
        assert flag_value(cmd, "--profile") == "docker"
        assert "--insecure" not in cmd, f"{name}: runs plaintext"
        pops = [p.split("=")[0] for p in flag_value(cmd, "--pops").split(",")]
        assert flag_value(cmd, "--pop") in pops, f"{name}: --pop not in --pops"
    per_pop: dict[str, int] = {}
    for cmd in cmds.values():
        per_pop[flag_value(cmd, "--pop")] = per_pop.get(flag_value(cmd, "--pop"), 0) + 1
    assert len(per_pop) == 3 and set(per_pop.values()) == {2}, f"services per PoP: {per_pop}"
    node_ids = [flag_value(cmd, "--node-id") for cmd in cmds.values()]
    assert len(set(node_ids)) == len(node_ids), f"node ids not unique: {node_ids}"
    # The certs service runs the same image (it has `dht certs`).
    for name, svc in services().items():
        assert svc.get("image") == "dht:latest", f"{name}: image"
        assert svc.get("build") == ".", f"{name}: build"


def pop_of(svc: dict[str, Any]) -> str:
    return flag_value(command(svc), "--pop")


def test_peer_lists_name_exactly_the_other_services() -> None:
    svcs = node_services()
    by_id = {flag_value(command(svc), "--node-id"): name for name, svc in svcs.items()}
    for name, svc in svcs.items():
        cmd = command(svc)
        me = flag_value(cmd, "--node-id")
        pop = pop_of(svc)
        same_pop = {i for i, n in by_id.items() if pop_of(svcs[n]) == pop}
        assert flag_value(cmd, "--advertise-host") == hostname(name, svc), (
            f"{name}: --advertise-host must be the name the other services dial"
        )
        peers = [parse_peer(p) for p in flag_values(cmd, "--peers")]
        peer_ids = {node_id for node_id, _, _, _ in peers}
        assert peer_ids == same_pop - {me}, f"{name}: --peers {sorted(peer_ids)}"
        assert len(peers) == len(peer_ids), f"{name}: duplicate peers"
        for node_id, grpc_addr, admin, peer in peers:
            other = svcs[by_id[node_id]]
            ocmd = command(other)
            host = hostname(by_id[node_id], other)
            want = [f"{host}:{flag_value(ocmd, f)}" for f in ("--grpc-port", "--admin-port")]
            assert [grpc_addr, admin] == want, f"{name}: peer {node_id}"
            assert peer == f"{host}:{flag_value(ocmd, '--peer-port')}", f"{name}: peer {node_id}"
        # Every other PoP, with exactly its services' peer-plane addresses.
        expected: dict[str, set[str]] = {}
        for other_name, other in svcs.items():
            if pop_of(other) != pop:
                addr = f"{hostname(other_name, other)}:{flag_value(command(other), '--peer-port')}"
                expected.setdefault(pop_of(other), set()).add(addr)
        listed = {}
        for spec in flag_values(cmd, "--pop-peers"):
            other_pop, _, addrs = spec.partition("=")
            assert other_pop not in listed, f"{name}: --pop-peers names {other_pop} twice"
            listed[other_pop] = set(addrs.split(","))
        assert listed == expected, f"{name}: --pop-peers {listed}, want {expected}"


def test_published_ports_and_healthcheck_match_the_node() -> None:
    published: list[str] = []
    volume = certs_volume()
    for name, svc in node_services().items():
        cmd = command(svc)
        grpc_port, admin = int(flag_value(cmd, "--grpc-port")), int(flag_value(cmd, "--admin-port"))
        targets = {container_port(p) for p in svc.get("ports", [])}
        assert {grpc_port, admin} <= targets, f"{name}: ports {svc.get('ports')} miss {grpc_port}"
        # The peer plane admits node certificates only and every node is in the compose
        # network: nothing on the host has a call there (see the file's header).
        assert int(flag_value(cmd, "--peer-port")) not in targets, f"{name}: peer port published"
        published += [str(p).rsplit(":", 1)[0] for p in svc.get("ports", [])]
        check = " ".join(healthcheck_argv(svc))
        urls = re.findall(r"https?://[^'\"\s]+", check)
        assert urls == [f"https://127.0.0.1:{admin}/readyz"], f"{name}: healthcheck URLs {urls}"
        # It verifies the node's certificate against the CA the node itself uses.
        cas = re.findall(r"cafile=['\"]([^'\"]+)['\"]", check)
        assert cas == [flag_value(cmd, "--tls-ca")], f"{name}: healthcheck CA {cas}"
        assert cas[0].startswith(f"{volume.target}/"), f"{name}: healthcheck CA {cas}"
    assert len(set(published)) == len(published), f"host ports published twice: {published}"


def test_nodes_run_tls_from_the_certs_volume() -> None:
    volume = certs_volume()
    for name, svc in node_services().items():
        cmd = command(svc)
        pop, node_id = flag_value(cmd, "--pop"), flag_value(cmd, "--node-id")
        depends = svc.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on must be the long form"
        assert depends.get(CERTS_SERVICE) == {"condition": "service_completed_successfully"}, (
            f"{name}: must start only once {CERTS_SERVICE} has exited 0, got {depends}"
        )
        mine = [m for m in mounts(svc) if m.source == volume.source]
        assert len(mine) == 1 and mine[0].read_only, f"{name}: mount {volume.source} read-only"
        at = mine[0].target
        assert flag_value(cmd, "--tls-cert") == f"{at}/node-{pop}-{node_id}.pem", name
        assert flag_value(cmd, "--tls-key") == f"{at}/node-{pop}-{node_id}.key", name
        assert flag_value(cmd, "--tls-ca") == f"{at}/ca.pem", name
    svc = services()[CERTS_SERVICE]
    assert not svc.get("ports"), f"{CERTS_SERVICE} publishes nothing"
    assert str(svc.get("restart", "no")) == "no", f"{CERTS_SERVICE} is one-shot"


def test_certs_service_makes_every_certificate() -> None:
    volume = certs_volume()
    cmds = certs_commands()
    at = volume.target
    # Idempotent: the CA is made only when there is none (init refuses to replace one).
    assert cmds[:2] == [
        ["test", "-f", f"{at}/ca.pem"],
        ["dht", "certs", "init", "--dir", at, "--cluster", cmds[1][-1]],
    ], f"{CERTS_SERVICE}: want `test -f {at}/ca.pem || dht certs init --dir {at} ...` first"
    made: dict[tuple[str, ...], list[str]] = {}
    for words in cmds[2:]:
        assert words[:2] == ["dht", "certs"], f"{CERTS_SERVICE}: {shlex.join(words)}"
        assert option(words, "--dir") == [at], f"{CERTS_SERVICE}: {shlex.join(words)}"
        role = words[2]
        if role == "node":
            key: tuple[str, ...] = (role, *option(words, "--pop"), *option(words, "--id"))
        elif role == "forwarder":
            key = (role, *option(words, "--pop"), *option(words, "--name"))
        else:
            key = (role, *option(words, "--name"))
        assert key not in made, f"{CERTS_SERVICE}: {key} made twice"
        made[key] = option(words, "--host")
    nodes = node_services()
    want: set[tuple[str, ...]] = {
        ("node", pop_of(svc), flag_value(command(svc), "--node-id")) for svc in nodes.values()
    }
    pops = {pop_of(svc) for svc in nodes.values()}
    # The names dht.tools.certs.client_tls and `dht ctl --certs-dir` look for.
    want |= {("forwarder", pop, FORWARDER_NAME) for pop in pops}
    want.add(("operator", OPERATOR_NAME))
    assert set(made) == want, f"{CERTS_SERVICE} makes {sorted(made)}, want {sorted(want)}"
    for name, svc in nodes.items():
        hosts = made[("node", pop_of(svc), flag_value(command(svc), "--node-id"))]
        # The name peers dial, and the address the health check dials.
        assert {hostname(name, svc), LOOPBACK} <= set(hosts), f"{name}: cert hosts {hosts}"


def test_validate_compose_script_passes() -> None:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": bindir + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(
        ["bash", str(VALIDATE_SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=VALIDATE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "compose-spec" in proc.stdout


# --------------------------------------------------------------------------- local processes


def localize_paths(text: str, dirs: dict[str, Path]) -> str:
    """Paths under a mount target (``/certs``, ``/certs/ca.pem``) -> under its local dir."""
    for target, local in dirs.items():
        pattern = re.compile(rf"(?<![\w./-]){re.escape(target)}(?![\w.-])")
        text = pattern.sub(str(local).replace("\\", "\\\\"), text)
    return text


def local_mounts(svc: dict[str, Any], volumes: dict[str, Path]) -> dict[str, Path]:
    """A service's mount targets -> the local directories standing in for the volumes."""
    return {m.target: volumes[m.source] for m in mounts(svc)}


def run_certs_service(volumes: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    """The ``certs`` service's script, with its mount paths mapped to ``volumes``. The
    host names stay: they are only names in the certificates (never resolved), and a
    certificate without 127.0.0.1 must fail here (the local nodes dial each other there)
    as it would fail the health check in a container."""
    dirs = local_mounts(services()[CERTS_SERVICE], volumes)
    argv = [localize_paths(a, dirs) for a in certs_argv()]
    for target in dirs:
        assert not re.search(rf"(?<![\w./-]){re.escape(target)}(?![\w.-])", argv[2]), argv
    bindir = str(Path(sys.executable).parent)
    assert (Path(bindir) / "dht").exists(), f"no dht entry point next to {sys.executable}"
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]}
    env.pop("DHT_CERTS_DIR", None)
    return subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CERTS_TIMEOUT_S,
        check=False,
    )


@dataclass
class LocalCerts:
    """The certificates volume, made locally by the ``certs`` service's script."""

    volumes: dict[str, Path]
    dir: Path

    def forwarder(self, pop: str) -> TlsConfig:
        tls = client_tls(self.dir, Role.FORWARDER, pop)
        assert tls is not None, f"no forwarder certificate for {pop} in {self.dir}"
        return tls

    def operator(self) -> TlsConfig:
        tls = client_tls(self.dir, Role.OPERATOR)
        assert tls is not None, f"no operator certificate in {self.dir}"
        return tls

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "ca.pem"))

    def grpc_credentials(self, tls: TlsConfig | None) -> grpc.ChannelCredentials:
        """Verify the node against the CA; present tls's certificate (None: none)."""
        if tls is not None:
            return channel_credentials(tls)
        return grpc.ssl_channel_credentials(root_certificates=(self.dir / "ca.pem").read_bytes())


def make_certs(tmp: Path) -> LocalCerts:
    volume = certs_volume()
    volumes = {}
    for name in load_compose().get("volumes") or {}:
        volumes[name] = tmp / name
        # As in the image: the mount point exists, owned by the user, mode 0700.
        volumes[name].mkdir(mode=0o700)
    proc = run_certs_service(volumes)
    assert proc.returncode == 0, f"{CERTS_SERVICE}:\n{proc.stdout}\n{proc.stderr}"
    return LocalCerts(volumes, volumes[volume.source])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> LocalCerts:
    return make_certs(tmp_path_factory.mktemp("compose-volumes"))


@dataclass
class LocalNode:
    service: str
    node_id: str
    pop: str
    argv: list[str]
    grpc: str
    peer: str
    admin: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    announced: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"


PortMap = dict[tuple[str, int], int]


def localize(
    svcs: dict[str, dict[str, Any]], volumes: dict[str, Path]
) -> tuple[dict[str, list[str]], PortMap]:
    """Each node service's command for a local process, and the port map (service, port)
    -> local port.

    Service hostnames become 127.0.0.1; every container port of a service becomes a free
    local port, the same one wherever ``HOST:PORT`` of that service appears; paths under a
    mount become paths under the local directory standing in for its volume."""
    hosts = {hostname(name, svc): name for name, svc in svcs.items()} | {n: n for n in svcs}
    wanted = [(name, port) for name, svc in svcs.items() for port in sorted(service_ports(svc))]
    ports = dict(zip(wanted, free_ports(LOOPBACK, len(wanted)), strict=True))

    def sub_host_port(m: re.Match[str]) -> str:
        host, port = m.group(1), int(m.group(2))
        assert host in hosts, f"{m.group(0)}: {host} is not a service of the compose file"
        key = (hosts[host], port)
        assert key in ports, f"{m.group(0)}: service {hosts[host]} does not listen on {port}"
        return f"{LOOPBACK}:{ports[key]}"

    out: dict[str, list[str]] = {}
    for name, svc in svcs.items():
        dirs = local_mounts(svc, volumes)
        argv = [localize_paths(HOST_PORT.sub(sub_host_port, a), dirs) for a in command(svc)]
        for flag in ("--grpc-port", "--admin-port", "--peer-port"):
            i = argv.index(flag) + 1
            argv[i] = str(ports[(name, int(argv[i]))])
        i = argv.index("--advertise-host") + 1
        assert argv[i] in hosts, f"{name}: --advertise-host {argv[i]} is not a service"
        argv[i] = LOOPBACK
        # Keep the docker profile, but never listen on 0.0.0.0 here.
        if "--host" in argv:
            argv[argv.index("--host") + 1] = LOOPBACK
        else:
            argv[1:1] = ["--host", LOOPBACK]
        argv.append("--announce")
        for _, port in HOST_PORT.findall(" ".join(argv)):
            assert int(port) in ports.values(), f"{name}: unmapped port {port} in {argv}"
        assert all(h == LOOPBACK for h, _ in HOST_PORT.findall(" ".join(argv))), argv
        for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
            assert Path(flag_value(argv, flag)).is_file(), f"{name}: {flag} not made: {argv}"
        out[name] = argv
    return out, ports


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """One line from the process's stdout, or b'' on EOF; TimeoutError past ``deadline``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return buf
            buf += chunk
    return buf.split(b"\n", 1)[0]


def start_nodes(tmp: Path, certs: LocalCerts) -> list[LocalNode]:
    svcs = node_services()
    argvs, ports = localize(svcs, certs.volumes)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    nodes: list[LocalNode] = []
    try:
        for name, argv in argvs.items():
            svc_cmd = command(svcs[name])

            def local(flag: str, name: str = name, svc_cmd: list[str] = svc_cmd) -> str:
                return f"{LOOPBACK}:{ports[(name, int(flag_value(svc_cmd, flag)))]}"

            log_path = tmp / f"{name}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "dht", *argv],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            nodes.append(
                LocalNode(
                    service=name,
                    node_id=flag_value(svc_cmd, "--node-id"),
                    pop=flag_value(svc_cmd, "--pop"),
                    argv=argv,
                    grpc=local("--grpc-port"),
                    peer=local("--peer-port"),
                    admin=local("--admin-port"),
                    proc=proc,
                    log_path=log_path,
                )
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        for n in nodes:
            try:
                line = read_line(n.proc, deadline)
            except TimeoutError:
                pytest.fail(f"{n.service} did not announce in {START_TIMEOUT_S} s:\n{n.log_tail()}")
            if not line:
                code = n.proc.wait(timeout=STOP_TIMEOUT_S)
                pytest.fail(f"{n.service} exited with {code} before serving:\n{n.log_tail()}")
            n.announced = json.loads(line)
            assert n.announced["node_id"] == n.node_id
            assert n.announced["grpc"] == n.grpc, (n.announced, n.argv)
            assert n.announced["peer"] == n.peer, (n.announced, n.argv)
            assert n.announced["admin"] == n.admin, (n.announced, n.argv)
            assert n.announced["pid"] == n.proc.pid
        return nodes
    except BaseException:
        kill_leftovers(nodes)
        raise


def stop_nodes(nodes: list[LocalNode], timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int | None]:
    """SIGTERM every live node by PID; their exit statuses (None: still running)."""
    for n in nodes:
        if n.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for n in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            n.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        codes[n.service] = n.proc.returncode
    return codes


def kill_leftovers(nodes: list[LocalNode]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                n.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=5)
        if n.proc.stdout is not None:
            n.proc.stdout.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, certs: LocalCerts
) -> Iterator[list[LocalNode]]:
    nodes = start_nodes(tmp_path_factory.mktemp("compose"), certs)
    try:
        yield nodes
    finally:
        try:
            stop_nodes(nodes)
        finally:
            kill_leftovers(nodes)


def https_get(url: str, context: ssl.SSLContext) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_certs_service_is_idempotent(certs: LocalCerts, tmp_path: Path) -> None:
    # A second run over a volume that already holds the CA (say `docker compose up` again).
    volumes = {name: tmp_path / name for name in certs.volumes}
    for name, src in certs.volumes.items():
        shutil.copytree(src, volumes[name])
    proc = run_certs_service(volumes)
    assert proc.returncode == 0, f"second run:\n{proc.stdout}\n{proc.stderr}"
    again = volumes[certs_volume().source]
    for ca in ("ca.pem", "ca.key"):
        assert (again / ca).read_bytes() == (certs.dir / ca).read_bytes(), f"{ca} replaced"
    issuer = describe(again / "ca.pem")["subject"]
    for name, svc in node_services().items():
        cmd = command(svc)
        pop, node_id = flag_value(cmd, "--pop"), flag_value(cmd, "--node-id")
        info = describe(again / f"node-{pop}-{node_id}.pem")
        assert info["identity"].endswith(f"/node/{pop}/{node_id}"), (name, info)
        assert info["issuer"] == issuer, (name, info)
        sans = set(info["sans"].split(", "))
        assert {f"DNS:{hostname(name, svc)}", f"IP:{LOOPBACK}"} <= sans, (name, info)


def test_localized_commands_listen_on_loopback_only(
    cluster: list[LocalNode], certs: LocalCerts
) -> None:
    for n in cluster:
        assert "0.0.0.0" not in " ".join(n.argv)
        assert n.argv[n.argv.index("--host") + 1] == LOOPBACK
        assert n.argv[n.argv.index("--profile") + 1] == "docker"
        assert flag_value(n.argv, "--tls-ca") == str(certs.dir / "ca.pem")
        cert = flag_value(n.argv, "--tls-cert")
        assert describe(cert)["identity"].endswith(f"/node/{n.pop}/{n.node_id}"), cert


def test_every_node_is_ready(cluster: list[LocalNode], certs: LocalCerts) -> None:
    ctx = certs.ssl_context()
    for n in cluster:
        status, body = https_get(f"https://{n.admin}/readyz", ctx)
        assert (status, body.get("ready")) == (200, True), f"{n.service}: {status} {body}"
        status, body = https_get(f"https://{n.admin}/partitions", ctx)
        assert status == 200
        members = {m["node_id"]: m["address"] for m in body["members"]}
        same = {m.node_id: m.grpc for m in cluster if m.pop == n.pop}
        assert members == same, f"{n.service}: {members}"


def test_compose_healthcheck_command_passes(cluster: list[LocalNode], certs: LocalCerts) -> None:
    svcs = node_services()
    for n in cluster:
        argv = healthcheck_argv(svcs[n.service])
        assert argv[0] in ("python", "python3"), f"healthcheck runs {argv[0]}"
        admin_port = flag_value(command(svcs[n.service]), "--admin-port")
        local_port = n.admin.rsplit(":", 1)[1]
        dirs = local_mounts(svcs[n.service], certs.volumes)
        # Inside the container the check dials 127.0.0.1:<admin port> and reads the CA
        # from the volume; here the node's admin port is a local one, the CA a local file.
        args = [
            localize_paths(a.replace(f"127.0.0.1:{admin_port}/", f"127.0.0.1:{local_port}/"), dirs)
            for a in argv
        ]
        assert str(certs.dir / "ca.pem") in " ".join(args), f"{n.service}: no CA in {args}"
        assert f"https://127.0.0.1:{local_port}/" in " ".join(args), f"{n.service}: {args}"
        proc = subprocess.run(
            [sys.executable, *args[1:]],
            capture_output=True,
            text=True,
            timeout=HEALTHCHECK_TIMEOUT_S,
            check=False,
        )
        assert proc.returncode == 0, f"{n.service}: {proc.stdout}{proc.stderr}"


async def health_check(address: str, creds: grpc.ChannelCredentials | None) -> None:
    """grpc.health.v1 Check on ``address``; raises grpc.aio.AioRpcError when refused."""
    if creds is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, creds)
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=REFUSED_TIMEOUT_S)


def plaintext_http_get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=REFUSED_TIMEOUT_S):
        pass


async def test_tls_is_on_every_plane(cluster: list[LocalNode], certs: LocalCerts) -> None:
    for n in cluster:
        node_tls = TlsConfig(
            *(flag_value(n.argv, f) for f in ("--tls-cert", "--tls-key", "--tls-ca"))
        )
        # A plaintext client gets nothing from the public plane, the peer plane or the
        # admin endpoint: the node closes the connection.
        with pytest.raises(Unavailable):
            async with Client([n.grpc], timeout_s=REFUSED_TIMEOUT_S) as c:
                await c.lookup([parse_flow(FLOWS[0])])
        with pytest.raises((OSError, http.client.HTTPException)):
            await asyncio.to_thread(plaintext_http_get, f"http://{n.admin}/readyz")
        for address, tls in ((n.grpc, certs.operator()), (n.peer, node_tls)):
            # Plaintext, and TLS that verifies the node but presents no client
            # certificate (mutual TLS): both refused at the handshake.
            for creds in (None, certs.grpc_credentials(None)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health_check(address, creds)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            # With a certificate of the cluster's CA the same call works.
            await health_check(address, certs.grpc_credentials(tls))


async def test_forwarders_act_only_for_their_pop(
    cluster: list[LocalNode], certs: LocalCerts
) -> None:
    keys = [parse_flow("tcp/198.51.100.99:40000/192.0.2.9:443")]
    first = cluster[0]
    other = next(p for p in (m.pop for m in cluster) if p != first.pop)
    async with Client([first.grpc], tls=certs.forwarder(first.pop), timeout_s=HTTP_TIMEOUT_S) as c:
        with pytest.raises(PermissionDenied):
            await c.claim(keys, pop=other)
        # Look-ups are for any forwarder; nothing was claimed.
        assert [r.status for r in await c.lookup(keys)] == [Status.NOT_FOUND]
    # A forwarder's certificate does not open the peer plane.
    creds = certs.grpc_credentials(certs.forwarder(first.pop))
    async with grpc.aio.secure_channel(first.peer, creds) as channel:
        stub = pb_grpc.FlowTableStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetPartitionTable(pb.PartitionTableRequest(), timeout=HTTP_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value


async def test_claims_are_visible_through_every_node(
    cluster: list[LocalNode], certs: LocalCerts
) -> None:
    keys = [parse_flow(f) for f in FLOWS]
    first = cluster[0]
    same_pop = [n for n in cluster if n.pop == first.pop]
    fw = certs.forwarder(first.pop)
    async with Client([first.grpc], tls=fw, timeout_s=HTTP_TIMEOUT_S) as c:
        owner = c.pops[first.pop]
        claimed = await c.claim(keys, pop=first.pop)
        assert [r.status for r in claimed] == [Status.CREATED] * len(keys), claimed
        assert {r.owner_pop for r in claimed} == {owner}
        again = await c.claim(keys, pop=first.pop)
        assert {r.status for r in again} == {Status.ALREADY_OWNED}, again
    for n in same_pop:
        async with Client([n.grpc], tls=fw, timeout_s=HTTP_TIMEOUT_S) as c:
            found = await c.lookup(keys)
            assert [r.status for r in found] == [Status.OK] * len(keys), (n.service, found)
            assert {r.owner_pop for r in found} == {owner}
    # Confirmed (established), the flows are shipped to the other PoPs.
    async with Client([first.grpc], tls=fw, timeout_s=HTTP_TIMEOUT_S) as c:
        confirmed = await c.confirm(keys, pop=first.pop)
        assert {r.status for r in confirmed} == {Status.OK}, confirmed
    other = next(p for p in (m.pop for m in cluster) if p != first.pop)
    for n in cluster:
        # Each node through its own PoP's forwarder.
        async with Client([n.grpc], tls=certs.forwarder(n.pop), timeout_s=HTTP_TIMEOUT_S) as c:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                found = await c.lookup(keys)
                if [r.status for r in found] == [Status.OK] * len(keys):
                    break
                assert time.monotonic() < deadline, (n.service, found)
                await asyncio.sleep(0.05)
            assert {r.owner_pop for r in found} == {owner}
        # Another PoP's forwarder, claiming for its own PoP, finds them owned.
        async with Client([n.grpc], tls=certs.forwarder(other), timeout_s=HTTP_TIMEOUT_S) as c:
            contested = await c.claim(keys[:2], pop=other)
            assert {r.status for r in contested} == {Status.OWNED_ELSEWHERE}, contested
            assert {r.owner_pop for r in contested} == {owner}
    # The admin endpoint asks the node it is on, which forwards to the owner if need be.
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    ctx = certs.ssl_context()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for n in cluster:
            for flow in FLOWS:
                url = f"https://{n.admin}/flow"
                async with session.get(url, params={"flow": flow}, ssl=ctx) as resp:
                    body = await resp.json()
                    assert resp.status == 200, (n.service, body)
                    assert (body["status"], body["owner_pop"]) == ("ok", first.pop), body


def test_sigterm_stops_every_node_with_status_0(tmp_path: Path, certs: LocalCerts) -> None:
    nodes = start_nodes(tmp_path, certs)
    try:
        ctx = certs.ssl_context()
        for n in nodes:
            assert https_get(f"https://{n.admin}/readyz", ctx)[0] == 200
        t0 = time.monotonic()
        codes = stop_nodes(nodes)
        elapsed = time.monotonic() - t0
        logs = "\n".join(f"--- {n.service}\n{n.log_tail(15)}" for n in nodes)
        assert codes == dict.fromkeys(codes, 0), f"exit statuses {codes}\n{logs}"
        assert elapsed < STOP_TIMEOUT_S
    finally:
        kill_leftovers(nodes)
