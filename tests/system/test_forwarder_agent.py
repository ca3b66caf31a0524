"""``dht forwarder`` in network namespaces the test makes (docs/forwarder.md): a real
``dht node`` and the agent inside a PoP namespace, a client namespace beside it.

- READY once the nft table, the NFQUEUE chains, the fwmark rules and the owner tables
  are there; SIGTERM removes all of it and exits 0;
- SIGKILL leaves it; a restart sets up again over it (idempotent); ``--cleanup`` removes
  it;
- real TCP connections (IPv4 and IPv6) through the SYN upcall: claimed for the PoP,
  confirmed once conntrack says the handshake completed, pinned here in the map, kept
  alive past the established TTL (4 s here) while they live, and counted in /metrics;
- two PoPs: a connection whose client route moves to the other PoP and back is steered
  to its owner over the backbone and lives on.

Root only (namespaces, netfilter); needs the ``forwarder`` extra (NetfilterQueue) and
the nft, iptables, ip6tables and conntrack tools. Every namespace and process it makes
is removed by name and PID at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

TOOLS = ("ip", "nft", "iptables", "ip6tables", "conntrack")
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, netfilter)"),
    pytest.mark.skipif(
        importlib.util.find_spec("netfilterqueue") is None,
        reason="needs the forwarder extra (pip install -e '.[forwarder]')",
    ),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS), reason=f"needs the tools {TOOLS}"
    ),
]

SERVICE4, SERVICE6 = "192.0.2.1", "2001:db8::1"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:c::7"
# The single PoP's established TTL: shorter than the connection test, so its flows
# live only if the agent keeps them alive.
TTL_S = 4
# Ports inside the test's own namespace: nothing else can hold them there.
GRPC, PEER, ADMIN, METRICS, ECHO = 7801, 7802, 7803, 9109, 8080
NODE = ["--profile", "test", "--log-level", "warning", "--node-id", "ams-1", "--pop", "ams",
        "--pops", "ams=1,fra=2", "--host", "127.0.0.1", "--grpc-port", str(GRPC),
        "--peer-port", str(PEER), "--admin-port", str(ADMIN), "--announce"]  # fmt: skip
AGENT = ["--pop", "ams", "--nodes", f"127.0.0.1:{GRPC}", "--service", SERVICE4,
         "--service", SERVICE6, "--next-hop", "fra=10.99.0.2", "--next-hop", "fra=fd99::2",
         "--backbone-if", "bb0", "--insecure", "--log-level", "warning"]  # fmt: skip


def sh(*args: str, check: bool = True) -> str:
    p = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(args)}: {p.returncode} {p.stderr.strip()}")
    return p.stdout


@dataclass
class Lab:
    pop: str  # the PoP namespace
    client: str  # the client namespace
    procs: list[subprocess.Popen[str]]

    def run(self, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.pop, *args, check=check)

    def start(self, ns: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def agent(self, *extra: str) -> subprocess.Popen[str]:
        p = self.start(self.pop, sys.executable, "-m", "dht", "forwarder", *AGENT, *extra)
        while (line := readline(p, 30)) != "READY":
            assert line.startswith("METRICS"), f"agent said {line!r} before READY"
        return p

    def leftovers(self) -> list[str]:
        code = (
            "import json; from dht.tools.forwarder import system; "
            "print(json.dumps(system.leftovers()))"
        )
        out: list[str] = json.loads(self.run(sys.executable, "-c", code))
        return out


def readline(p: subprocess.Popen[str], timeout_s: float) -> str:
    """One line of a child's stdout, or fail after timeout_s (the child is not waited on
    forever: its stdout is read by a helper thread)."""
    import threading

    box: list[str] = []
    assert p.stdout is not None
    t = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout_s)
    if not box:
        raise AssertionError(f"no line from {p.args} within {timeout_s} s")
    if not box[0]:
        raise AssertionError(f"{p.args} exited with {p.wait()} before saying anything")
    return box[0].strip()


def stop(p: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout_s: float = 15) -> int:
    if p.poll() is None:
        p.send_signal(sig)
    return p.wait(timeout_s)


def teardown(lab: Lab, namespaces: list[str]) -> None:
    """Stop every process the lab started (SIGTERM, then SIGKILL by PID), newest first,
    then delete the namespaces it made."""
    for p in reversed(lab.procs):
        with contextlib.suppress(subprocess.TimeoutExpired):
            stop(p, timeout_s=10)
        if p.poll() is None:
            p.kill()
            p.wait()
    for ns in namespaces:
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    pop, client = f"dhtf-{tag}", f"dhtf-{tag}c"
    made: list[str] = []
    made_files: list[str] = []
    lab = Lab(pop, client, [])
    try:
        for ns in (pop, client):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w",
               "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")  # fmt: skip
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # The backbone (its far end unused) and the client's link.
        sh("ip", "link", "add", "bb0", "netns", pop, "type", "veth", "peer", "bb1", "netns", pop)
        sh("ip", "link", "add", "e0", "netns", pop, "type", "veth", "peer", "c0", "netns", client)
        for ns, dev, addrs in (
            (pop, "lo", [f"{SERVICE4}/32", f"{SERVICE6}/128"]),
            (pop, "bb0", ["10.99.0.1/24", "fd99::1/64"]),
            (pop, "e0", ["198.51.100.1/24", "2001:db8:c::1/64"]),
            (client, "c0", [f"{CLIENT4}/24", f"{CLIENT6}/64"]),
        ):
            for a in addrs:
                sh("ip", "-n", ns, "addr", "add", a, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", pop, "link", "set", "bb1", "up")
        sh("ip", "-n", client, "route", "add", f"{SERVICE4}/32", "via", "198.51.100.1")
        sh("ip", "-n", client, "-6", "route", "add", f"{SERVICE6}/128", "via", "2001:db8:c::1")
        conf = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
        made_files.append(conf.name)
        with conf:
            conf.write(f"[ttl]\nestablished_tcp_s = {TTL_S}\n")
        node = lab.start(pop, sys.executable, "-m", "dht", "node", *NODE, "--config", conf.name)
        assert json.loads(readline(node, 30))["grpc"] == f"127.0.0.1:{GRPC}"
        yield lab
    finally:
        teardown(lab, made)
        for f in made_files:
            os.unlink(f)


def test_sigterm_removes_everything(lab: Lab) -> None:
    assert lab.leftovers() == []
    agent = lab.agent()
    left = lab.leftovers()
    assert "nft table inet dht_fwd" in left
    assert {"iptables chain DHT_FWD", "ip6tables chain DHT_FWD"} <= set(left)
    assert {"iptables jump to DHT_FWD", "ip6tables jump to DHT_FWD"} <= set(left)
    for v in ("-4", "-6"):
        rules = lab.run("ip", v, "rule")
        assert "500:\tfrom all fwmark 0x2/0xffff lookup 102" in rules
        assert "900:\tfrom all lookup local" in rules
        assert not rules.startswith("0:")  # local delivery moved behind the fwmark rules
    assert f"{SERVICE4} via 10.99.0.2 dev bb0" in lab.run("ip", "route", "show", "table", "102")
    assert SERVICE6 in lab.run("ip", "-6", "route", "show", "table", "102")
    # Early demux off: a socket here for a steered flow's 4-tuple (a half-open one) must
    # not get the flow's packets dropped on their way to the owner (docs/forwarder.md).
    assert lab.run("sysctl", "-n", "net.ipv4.ip_early_demux").strip() == "0"
    assert stop(agent) == 0
    assert lab.leftovers() == []
    for v in ("-4", "-6"):
        assert lab.run("ip", v, "rule").startswith("0:\tfrom all lookup local")


def test_sigkill_then_restart_then_cleanup(lab: Lab) -> None:
    agent = lab.agent()
    assert stop(agent, signal.SIGKILL) == -signal.SIGKILL
    assert "nft table inet dht_fwd" in lab.leftovers()
    # Setting up over a crashed agent's state: idempotent.
    agent = lab.agent()
    assert lab.run("ip", "rule").count("lookup 102") == 1
    assert lab.run("iptables", "-t", "mangle", "-S", "PREROUTING").count("DHT_FWD") == 1
    assert stop(agent, signal.SIGKILL) == -signal.SIGKILL
    lab.run(sys.executable, "-m", "dht", "forwarder", "--cleanup")
    assert lab.leftovers() == []
    for v in ("-4", "-6"):
        assert lab.run("ip", v, "rule").startswith("0:\tfrom all lookup local")


ECHO_SERVER = f"""
import socket, threading
def serve(fam, addr):
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, {ECHO})); s.listen()
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    while (d := c.recv(4096)):
        c.sendall(d)
for fam, addr in ((socket.AF_INET, "{SERVICE4}"), (socket.AF_INET6, "{SERVICE6}")):
    threading.Thread(target=serve, args=(fam, addr), daemon=True).start()
print("LISTENING", flush=True)
import sys; sys.stdin.read()
"""

CLIENT = f"""
import json, socket, sys
out = []
conns = []
for addr in ("{SERVICE4}", "{SERVICE6}"):
    c = socket.create_connection((addr, {ECHO}), timeout=5)
    c.sendall(b"hello"); assert c.recv(5) == b"hello"
    conns.append(c)
    out.append(c.getsockname()[1])
print(json.dumps(out), flush=True)
sys.stdin.readline()
for c in conns:
    c.sendall(b"again"); assert c.recv(5) == b"again"
print("OK", flush=True)
sys.stdin.read()
"""


def test_connections_are_claimed_confirmed_and_pinned_here(lab: Lab) -> None:
    agent = lab.agent("--metrics-port", str(METRICS))
    server = lab.start(lab.pop, sys.executable, "-c", ECHO_SERVER)
    assert readline(server, 10) == "LISTENING"
    client = lab.start(lab.client, sys.executable, "-c", CLIENT)
    port4, port6 = json.loads(readline(client, 15))
    # FLOW text (dht ctl) -> the map element's key (nft).
    c6, s6 = f"[{CLIENT6}]", f"[{SERVICE6}]"
    flows = {
        f"tcp/{CLIENT4}:{port4}/{SERVICE4}:{ECHO}": f"{CLIENT4} . {port4} . {SERVICE4} . {ECHO}",
        f"tcp/{c6}:{port6}/{s6}:{ECHO}": f"{CLIENT6} . {port6} . {SERVICE6} . {ECHO}",
    }
    ctl = [sys.executable, "-m", "dht", "ctl", "--insecure", "--target", f"127.0.0.1:{GRPC}"]
    deadline = time.monotonic() + 10
    for flow, element in flows.items():
        # Confirmed from conntrack's ESTABLISHED event, pinned here (mark 0x10000).
        while True:
            rec = json.loads(lab.run(*ctl, "lookup", flow))
            maps = lab.run("nft", "list", "table", "inet", "dht_fwd")
            if rec.get("state") == "established" and f"tcp . {element} timeout" in maps:
                break
            assert time.monotonic() < deadline, (rec, maps)
            time.sleep(0.1)
        assert rec["owner_pop"] == "ams"
        line = next(x for x in maps.splitlines() if element in x)
        assert line.rstrip(" ,}").endswith("0x00010000")
    # Kept alive: past twice the TTL, the records are still there, established.
    time.sleep(2 * TTL_S + 0.5)
    for flow in flows:
        rec = json.loads(lab.run(*ctl, "lookup", flow))
        assert rec.get("state") == "established", rec
        assert rec["expiry_ms"] > time.time() * 1000
    # Pinned: the connection goes on in the kernel.
    assert client.stdin is not None
    client.stdin.write("\n")
    client.stdin.flush()
    assert readline(client, 10) == "OK"
    url = f"http://127.0.0.1:{METRICS}/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    metrics = lab.run(sys.executable, "-c", code)
    assert 'dht_forwarder_upcalls_total{kind="syn"} 2.0' in metrics
    assert "dht_forwarder_confirms_total 2.0" in metrics
    assert 'dht_forwarder_verdicts_total{action="serve"}' in metrics
    assert "dht_forwarder_decision_seconds_count" in metrics
    assert 'dht_forwarder_stats{stat="confirms"} 2.0' in metrics  # the library's own
    for p in (client, server):
        stop(p)
    assert stop(agent) == 0
    assert lab.leftovers() == []


# --------------------------------------------------------------------------- two PoPs

# The same anycast address at both PoPs; the client reaches either through its own link.
POPS = {"ams": ("10.99.0.1", "fd99::1"), "fra": ("10.99.0.2", "fd99::2")}
CLIENT_LINKS = {"ams": ("198.51.100", "2001:db8:c::"), "fra": ("198.51.101", "2001:db8:d::")}


@dataclass
class TwoPops:
    ns: dict[str, str]  # "ams", "fra", "client" -> namespace
    procs: list[subprocess.Popen[str]]

    def start(self, where: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[where], *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def route_client_to(self, pop: str) -> None:
        v4, v6 = CLIENT_LINKS[pop]
        c = self.ns["client"]
        sh("ip", "-n", c, "route", "replace", f"{SERVICE4}/32", "via", f"{v4}.1")
        sh("ip", "-n", c, "-6", "route", "replace", f"{SERVICE6}/128", "via", f"{v6}1")


@pytest.fixture(scope="module")
def two_pops() -> Iterator[TwoPops]:
    from dht.tools.cluster import NodeSpec, node_args

    tag = secrets.token_hex(3)
    ns = {"ams": f"dhtf-{tag}a", "fra": f"dhtf-{tag}f", "client": f"dhtf-{tag}c"}
    made: list[str] = []
    lab = TwoPops(ns, [])
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
            made.append(n)
            sh("ip", "netns", "exec", n, "sysctl", "-q", "-w",
               "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
               "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")  # fmt: skip
            sh("ip", "-n", n, "link", "set", "lo", "up")
        # The backbone: one veth between the two PoPs.
        sh("ip", "link", "add", "bb0", "netns", ns["ams"], "type", "veth",
           "peer", "bb0", "netns", ns["fra"])  # fmt: skip
        for pop, (b4, b6) in POPS.items():
            n = ns[pop]
            sh("ip", "-n", n, "addr", "add", f"{b4}/24", "dev", "bb0")
            sh("ip", "-n", n, "addr", "add", f"{b6}/64", "dev", "bb0")
            sh("ip", "-n", n, "addr", "add", f"{SERVICE4}/32", "dev", "lo")
            sh("ip", "-n", n, "addr", "add", f"{SERVICE6}/128", "dev", "lo")
            sh("ip", "-n", n, "link", "set", "bb0", "up")
            c4, c6 = CLIENT_LINKS[pop]
            cdev = f"c-{pop}"
            sh("ip", "link", "add", "e0", "netns", n, "type", "veth",
               "peer", cdev, "netns", ns["client"])  # fmt: skip
            sh("ip", "-n", n, "addr", "add", f"{c4}.1/24", "dev", "e0")
            sh("ip", "-n", n, "addr", "add", f"{c6}1/64", "dev", "e0")
            sh("ip", "-n", ns["client"], "addr", "add", f"{c4}.7/24", "dev", cdev)
            sh("ip", "-n", ns["client"], "addr", "add", f"{c6}7/64", "dev", cdev)
            sh("ip", "-n", n, "link", "set", "e0", "up")
            sh("ip", "-n", ns["client"], "link", "set", cdev, "up")
        # The owner answers the client directly (its source the anycast address), over
        # its own client link whatever subnet the client's address is in.
        for pop, other in (("ams", "fra"), ("fra", "ams")):
            o4, o6 = CLIENT_LINKS[other]
            m4, m6 = CLIENT_LINKS[pop]
            sh("ip", "-n", ns[pop], "route", "add", f"{o4}.0/24", "via", f"{m4}.7")
            sh("ip", "-n", ns[pop], "-6", "route", "add", f"{o6}/64", "via", f"{m6}7")
        lab.route_client_to("ams")
        specs = [NodeSpec(pop, f"{pop}-1", b4, GRPC, ADMIN, PEER) for pop, (b4, _) in POPS.items()]
        nodes = [
            lab.start(s.pop, sys.executable, "-m", "dht",
                      *node_args(s, specs, ["--profile", "test", "--log-level", "warning",
                                            "--insecure", "--announce"]))
            for s in specs
        ]  # fmt: skip
        for node in nodes:
            readline(node, 30)
        for pop, (b4, _) in POPS.items():
            other = "fra" if pop == "ams" else "ams"
            o4, o6 = POPS[other]
            agent = lab.start(
                pop, sys.executable, "-m", "dht", "forwarder", "--pop", pop,
                "--nodes", f"{b4}:{GRPC}", "--service", SERVICE4, "--service", SERVICE6,
                "--next-hop", f"{other}={o4}", "--next-hop", f"{other}={o6}",
                "--backbone-if", "bb0", "--insecure", "--log-level", "warning",
            )  # fmt: skip
            assert readline(agent, 30) == "READY"
            server = lab.start(pop, sys.executable, "-c", ECHO_SERVER)
            assert readline(server, 10) == "LISTENING"
        yield lab
    finally:
        teardown(lab, made)


MOVING_CLIENT = f"""
import json, socket, sys
conns = []
for fam, addr, src in ((socket.AF_INET, "{SERVICE4}", "198.51.100.7"),
                       (socket.AF_INET6, "{SERVICE6}", "2001:db8:c::7")):
    c = socket.socket(fam)
    c.settimeout(5)
    c.bind((src, 0))
    c.connect((addr, {ECHO}))
    conns.append(c)
for round in range(3):
    for c in conns:
        c.sendall(b"ping%d" % round)
        assert c.recv(5) == b"ping%d" % round
    print("ROUND", round, flush=True)
    sys.stdin.readline()
print("OK", flush=True)
"""


def test_a_connection_survives_a_route_change_to_the_other_pop(two_pops: TwoPops) -> None:
    """The client's route moves from ams to fra mid-connection: fra's agent asks the
    table (second chance or the shipped record), steers the flow to ams over the
    backbone, and ams's socket answers; then back to ams."""
    client = two_pops.start("client", sys.executable, "-c", MOVING_CLIENT)
    assert client.stdin is not None
    assert readline(client, 15) == "ROUND 0"
    for pop, want in (("fra", "ROUND 1"), ("ams", "ROUND 2")):
        two_pops.route_client_to(pop)
        client.stdin.write("\n")
        client.stdin.flush()
        assert readline(client, 15) == want
        if pop == "fra":
            # fra pins both flows toward ams (mark 0x10001). The pins leave in batches
            # after the verdicts, and each lives at most the owner-change bound (5 s):
            # each is looked for until it has been seen, not both at one instant.
            assert pinned_toward_ams(two_pops.ns["fra"], deadline_s=15) == {CLIENT4, CLIENT6}
    client.stdin.write("\n")
    client.stdin.flush()
    assert readline(client, 15) == "OK"


def pinned_toward_ams(ns: str, deadline_s: float) -> set[str]:
    """The clients whose flows the map in ``ns`` has pinned toward ams, as seen by
    listing it until both have been seen or the deadline passes."""
    seen: set[str] = set()
    deadline = time.monotonic() + deadline_s
    while seen != {CLIENT4, CLIENT6} and time.monotonic() < deadline:
        maps = sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "dht_fwd")
        for client in (CLIENT4, CLIENT6):
            if any(f"tcp . {client} ." in x and "0x00010001" in x for x in maps.splitlines()):
                seen.add(client)
        time.sleep(0.05)
    return seen
