"""docker-compose.yml, exercised without a Docker engine.

The static tests check that the services are wired to each other (each lists its own PoP's
other services as --peers and every other PoP's services as --pop-peers; ids, hosts and
ports agree with the other services; health check and published ports point at the
ports the node listens on), so the file cannot drift. The process tests run each service's
exact ``command`` as a real local ``python -m dht`` process, with the service hostnames
mapped to 127.0.0.1 and every container port mapped to a free local port (consistently,
including inside the other services' ``--peers``), keep the docker profile but force
``--host 127.0.0.1`` (never 0.0.0.0), and add ``--announce``: the announce line, not a
sleep, says a node is serving. Then: /readyz, the compose health check command itself,
claims and look-ups through different nodes, and a SIGTERM stop with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
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
import pytest
import yaml

from dht.client import Client
from dht.core.record import Status
from dht.core.wire import parse_flow
from dht.tools.cluster import free_ports

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
VALIDATE_SCRIPT = ROOT / "scripts" / "validate_compose.sh"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
# The node's graceful stop is bounded by shutdown_grace_s (5 s by default); slack on top.
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 5.0
HEALTHCHECK_TIMEOUT_S = 15.0
VALIDATE_TIMEOUT_S = 120.0

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
    ports = {int(flag_value(cmd, "--grpc-port")), int(flag_value(cmd, "--admin-port"))}
    ports |= {container_port(p) for p in svc.get("ports", [])}
    return ports


def parse_peer(text: str) -> tuple[str, str, str]:
    node_id, sep, rest = text.partition("=")
    assert sep, f"peer {text!r}: want ID=HOST:PORT,ADMIN_HOST:PORT"
    grpc, _, admin = rest.partition(",")
    return node_id, grpc, admin


def healthcheck_argv(svc: dict[str, Any]) -> list[str]:
    test = svc.get("healthcheck", {}).get("test")
    assert isinstance(test, list) and test and test[0] == "CMD", (
        f"healthcheck.test should be an exec-form ['CMD', ...] list, got {test!r}"
    )
    return [str(a) for a in test[1:]]


# --------------------------------------------------------------------------- static checks


def test_services_run_the_same_command_shape() -> None:
    svcs = services()
    assert len(svcs) >= 2
    cmds = {name: command(svc) for name, svc in svcs.items()}
    first = next(iter(cmds.values()))
    for name, cmd in cmds.items():
        assert cmd[0] == "node", f"{name}: command must start with the `node` subcommand"
        assert flag_names(cmd) == flag_names(first), f"{name}: flags differ from the others"
        for flag in ("--profile", "--pops", "--grpc-port", "--admin-port"):
            assert flag_value(cmd, flag) == flag_value(first, flag), f"{name}: {flag} differs"
        assert flag_value(cmd, "--profile") == "docker"
        pops = [p.split("=")[0] for p in flag_value(cmd, "--pops").split(",")]
        assert flag_value(cmd, "--pop") in pops, f"{name}: --pop not in --pops"
    per_pop: dict[str, int] = {}
    for cmd in cmds.values():
        per_pop[flag_value(cmd, "--pop")] = per_pop.get(flag_value(cmd, "--pop"), 0) + 1
    assert len(per_pop) == 3 and set(per_pop.values()) == {2}, f"services per PoP: {per_pop}"
    node_ids = [flag_value(cmd, "--node-id") for cmd in cmds.values()]
    assert len(set(node_ids)) == len(node_ids), f"node ids not unique: {node_ids}"
    for name, svc in svcs.items():
        assert svc.get("image") == "dht:latest", f"{name}: image"
        assert svc.get("build") == ".", f"{name}: build"


def pop_of(svc: dict[str, Any]) -> str:
    return flag_value(command(svc), "--pop")


def test_peer_lists_name_exactly_the_other_services() -> None:
    svcs = services()
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
        peer_ids = {node_id for node_id, _, _ in peers}
        assert peer_ids == same_pop - {me}, f"{name}: --peers {sorted(peer_ids)}"
        assert len(peers) == len(peer_ids), f"{name}: duplicate peers"
        for node_id, grpc, admin in peers:
            other = svcs[by_id[node_id]]
            ocmd = command(other)
            host = hostname(by_id[node_id], other)
            assert grpc == f"{host}:{flag_value(ocmd, '--grpc-port')}", f"{name}: peer {node_id}"
            assert admin == f"{host}:{flag_value(ocmd, '--admin-port')}", f"{name}: peer {node_id}"
        # Every other PoP, with exactly its services' gRPC addresses.
        expected = {}
        for other_name, other in svcs.items():
            if pop_of(other) != pop:
                addr = f"{hostname(other_name, other)}:{flag_value(command(other), '--grpc-port')}"
                expected.setdefault(pop_of(other), set()).add(addr)
        listed = {}
        for spec in flag_values(cmd, "--pop-peers"):
            other_pop, _, addrs = spec.partition("=")
            assert other_pop not in listed, f"{name}: --pop-peers names {other_pop} twice"
            listed[other_pop] = set(addrs.split(","))
        assert listed == expected, f"{name}: --pop-peers {listed}, want {expected}"


def test_published_ports_and_healthcheck_match_the_node() -> None:
    published: list[str] = []
    for name, svc in services().items():
        cmd = command(svc)
        grpc, admin = int(flag_value(cmd, "--grpc-port")), int(flag_value(cmd, "--admin-port"))
        targets = {container_port(p) for p in svc.get("ports", [])}
        assert {grpc, admin} <= targets, f"{name}: ports {svc.get('ports')} miss {grpc}/{admin}"
        published += [str(p).rsplit(":", 1)[0] for p in svc.get("ports", [])]
        urls = re.findall(r"https?://[^'\"\s]+", " ".join(healthcheck_argv(svc)))
        assert urls == [f"http://127.0.0.1:{admin}/readyz"], f"{name}: healthcheck URLs {urls}"
    assert len(set(published)) == len(published), f"host ports published twice: {published}"


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


@dataclass
class LocalNode:
    service: str
    node_id: str
    argv: list[str]
    grpc: str
    admin: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    announced: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"


PortMap = dict[tuple[str, int], int]


def localize(svcs: dict[str, dict[str, Any]]) -> tuple[dict[str, list[str]], PortMap]:
    """Each service's command for a local process, and the port map (service, port) -> local.

    Service hostnames become 127.0.0.1; every container port of a service becomes a free
    local port, the same one wherever ``HOST:PORT`` of that service appears."""
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
        argv = [HOST_PORT.sub(sub_host_port, a) for a in command(svc)]
        for flag in ("--grpc-port", "--admin-port"):
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


def start_nodes(tmp: Path) -> list[LocalNode]:
    svcs = services()
    argvs, ports = localize(svcs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    nodes: list[LocalNode] = []
    try:
        for name, argv in argvs.items():
            svc_cmd = command(svcs[name])
            grpc_port = ports[(name, int(flag_value(svc_cmd, "--grpc-port")))]
            admin_port = ports[(name, int(flag_value(svc_cmd, "--admin-port")))]
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
                    argv=argv,
                    grpc=f"{LOOPBACK}:{grpc_port}",
                    admin=f"{LOOPBACK}:{admin_port}",
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
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalNode]]:
    nodes = start_nodes(tmp_path_factory.mktemp("compose"))
    try:
        yield nodes
    finally:
        try:
            stop_nodes(nodes)
        finally:
            kill_leftovers(nodes)


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_localized_commands_listen_on_loopback_only(cluster: list[LocalNode]) -> None:
    for n in cluster:
        assert "0.0.0.0" not in " ".join(n.argv)
        assert n.argv[n.argv.index("--host") + 1] == LOOPBACK
        assert n.argv[n.argv.index("--profile") + 1] == "docker"


def test_every_node_is_ready(cluster: list[LocalNode]) -> None:
    for n in cluster:
        status, body = http_get(f"http://{n.admin}/readyz")
        assert (status, body.get("ready")) == (200, True), f"{n.service}: {status} {body}"
        status, body = http_get(f"http://{n.admin}/partitions")
        assert status == 200
        members = {m["node_id"]: m["address"] for m in body["members"]}
        pop = n.node_id.split("-")[0]
        same = {m.node_id: m.grpc for m in cluster if m.node_id.startswith(f"{pop}-")}
        assert members == same, f"{n.service}: {members}"


def test_compose_healthcheck_command_passes(cluster: list[LocalNode]) -> None:
    svcs = services()
    for n in cluster:
        argv = healthcheck_argv(svcs[n.service])
        assert argv[0] in ("python", "python3"), f"healthcheck runs {argv[0]}"
        admin_port = flag_value(command(svcs[n.service]), "--admin-port")
        local_port = n.admin.rsplit(":", 1)[1]
        # Inside the container the check dials 127.0.0.1:<admin port>; here the node's
        # admin port is a local one.
        args = [a.replace(f"127.0.0.1:{admin_port}/", f"127.0.0.1:{local_port}/") for a in argv]
        assert args != argv, f"{n.service}: healthcheck does not dial the admin port"
        proc = subprocess.run(
            [sys.executable, *args[1:]],
            capture_output=True,
            text=True,
            timeout=HEALTHCHECK_TIMEOUT_S,
            check=False,
        )
        assert proc.returncode == 0, f"{n.service}: {proc.stdout}{proc.stderr}"


async def test_claims_are_visible_through_every_node(cluster: list[LocalNode]) -> None:
    keys = [parse_flow(f) for f in FLOWS]
    first = cluster[0]
    same_pop = [n for n in cluster if n.node_id.startswith("ams-")]
    async with Client([first.grpc], timeout_s=HTTP_TIMEOUT_S) as c:
        ams = c.pops["ams"]
        claimed = await c.claim(keys, pop="ams")
        assert [r.status for r in claimed] == [Status.CREATED] * len(keys), claimed
        assert {r.owner_pop for r in claimed} == {ams}
        again = await c.claim(keys, pop="ams")
        assert {r.status for r in again} == {Status.ALREADY_OWNED}, again
    for n in same_pop:
        async with Client([n.grpc], timeout_s=HTTP_TIMEOUT_S) as c:
            found = await c.lookup(keys)
            assert [r.status for r in found] == [Status.OK] * len(keys), (n.service, found)
            assert {r.owner_pop for r in found} == {ams}
    # Confirmed (established), the flows are shipped to the other PoPs.
    async with Client([first.grpc], timeout_s=HTTP_TIMEOUT_S) as c:
        confirmed = await c.confirm(keys, pop="ams")
        assert {r.status for r in confirmed} == {Status.OK}, confirmed
    for n in cluster:
        async with Client([n.grpc], timeout_s=HTTP_TIMEOUT_S) as c:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                found = await c.lookup(keys)
                if [r.status for r in found] == [Status.OK] * len(keys):
                    break
                assert time.monotonic() < deadline, (n.service, found)
                await asyncio.sleep(0.05)
            assert {r.owner_pop for r in found} == {ams}
            contested = await c.claim(keys[:2], pop="fra")
            assert {r.status for r in contested} == {Status.OWNED_ELSEWHERE}, contested
            assert {r.owner_pop for r in contested} == {ams}
    # The admin endpoint asks the node it is on, which forwards to the owner if need be.
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for n in cluster:
            for flow in FLOWS:
                async with http.get(f"http://{n.admin}/flow", params={"flow": flow}) as resp:
                    body = await resp.json()
                    assert resp.status == 200, (n.service, body)
                    assert (body["status"], body["owner_pop"]) == ("ok", "ams"), (n.service, body)


def test_sigterm_stops_every_node_with_status_0(tmp_path: Path) -> None:
    nodes = start_nodes(tmp_path)
    try:
        for n in nodes:
            assert http_get(f"http://{n.admin}/readyz")[0] == 200
        t0 = time.monotonic()
        codes = stop_nodes(nodes)
        elapsed = time.monotonic() - t0
        logs = "\n".join(f"--- {n.service}\n{n.log_tail(15)}" for n in nodes)
        assert codes == dict.fromkeys(codes, 0), f"exit statuses {codes}\n{logs}"
        assert elapsed < STOP_TIMEOUT_S
    finally:
        kill_leftovers(nodes)
