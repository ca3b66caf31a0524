"""``dht lab`` end to end, as root: real namespaces, real TCP connections, real route
changes (docs/lab.md). Each run keeps its state file in the test's own directory
(``DHT_LAB_STATE_DIR``), so ``dht lab --cleanup`` here touches this test's runs only."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dht.tools.lab.plan import SYN_RETRY, Schedule, make_schedule

LAB_TOOLS = ("ip", "nft", "sysctl")
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in LAB_TOOLS), reason=f"the lab needs {LAB_TOOLS}"
    ),
]
# `dht forwarder` needs its extra and its tools (docs/forwarder.md).
AGENT_TOOLS = ("iptables", "ip6tables", "conntrack")
needs_agent = pytest.mark.skipif(
    importlib.util.find_spec("netfilterqueue") is None
    or any(shutil.which(t) is None for t in AGENT_TOOLS),
    reason=f"the forwarders need the forwarder extra and {AGENT_TOOLS}",
)


def lab(state: Path, *args: str, timeout_s: float = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dht", "lab", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "DHT_LAB_STATE_DIR": str(state)},
        check=False,
    )


def namespaces() -> set[str]:
    """The lab's namespaces (others may come and go meanwhile: not ours to check)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {n for n in names if n.startswith("dhtlab-")}


def host_routing() -> list[str]:
    return [
        subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        for cmd in (["ip", "rule"], ["ip", "-6", "rule"], ["ip", "route"], ["ip", "-6", "route"])
    ]


def run_report(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "lab.json"
    r = lab(tmp_path / "state", "--json", str(out), *args)
    assert r.returncode == 0, r.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_without_forwarders_a_route_change_resets_the_moved_connections(tmp_path: Path) -> None:
    """The lab is real: plain anycast breaks exactly the connections whose route moved
    (the new PoP answers with a reset), in both families, and leaves the others alone."""
    before = namespaces()
    report = run_report(
        tmp_path, "--no-forwarders", "--pops", "3", "--connections", "12", "--flaps", "3",
        "--seed", "4",
    )  # fmt: skip
    ph = report["phases"]["without"]
    assert "with" not in report["phases"]
    assert ph["errors"] == []  # every route change and nft command went through
    assert ph["moved"] > 0
    assert ph["moved_broken"] == ph["moved"], ph["broken_connections"]
    assert [c for c in ph["broken_connections"] if c["kind"] == "steady" and not c["moved"]] == []
    assert {c["family"] for c in ph["broken_connections"]} == {4, 6}
    assert any("reset" in c["reason"].lower() for c in ph["broken_connections"])
    # The route moved in the middle of the handshake: the ACK met the new PoP's reset.
    assert all(c["state"] == "broken" for c in ph["cases"]["handshake"])
    assert ph["setup_ms"]["count"] == 12
    assert namespaces() == before


@needs_agent
def test_with_forwarders_no_connection_breaks(tmp_path: Path) -> None:
    """The same kind of run with a dht node and a forwarder per PoP: every connection,
    moved or not, the mid-handshake batch and the SYN-retransmission pair included, keeps
    its own server. This schedule (seed 2, 24 route changes on 2 routes) moves the
    SYN-retransmission pair's route back to the PoP that took the first SYN 3.5 s later:
    that PoP still holds its half-open connection (a request socket, a conntrack entry
    in SYN_RECV) and must steer the flow to the PoP that completed the handshake
    (docs/forwarder.md#sysctls: early demux)."""
    assert _syn_retry_route_returns(
        make_schedule(seed=2, pops=3, connections=6, flaps=24, routes=2)
    )
    before = namespaces()
    report = run_report(
        tmp_path, "--forwarders-only", "--pops", "3", "--connections", "6", "--flaps", "24",
        "--routes", "2", "--seed", "2",
    )  # fmt: skip
    ph = report["phases"]["with"]
    assert ph["errors"] == []
    assert ph["moved"] > 0
    assert ph["broken_connections"] == []
    assert all(c["state"] == "closed" for c in ph["cases"]["handshake"])
    # The retransmitted SYN completed at another PoP than the first SYN's, whose route
    # came back while the connection lived.
    assert [c["state"] for c in ph["cases"]["syn_retry"]] == ["closed", "closed"]
    assert set(ph["agents"]) == {"ams", "fra", "lon"}
    assert sum(a["upcalls"] for a in ph["agents"].values()) > 0
    assert namespaces() == before


def _syn_retry_route_returns(s: Schedule) -> bool:
    """Whether a later route change sends the SYN-retransmission case's route back to the
    PoP its first SYN reached."""
    current = list(s.initial)
    first, route = -1, -1
    for f in s.flaps:
        if f.kind == SYN_RETRY:
            first, route = current[f.route], f.route
        elif route == f.route and f.pop == first:
            return True
        current[f.route] = f.pop
    return False


@needs_agent
def test_cleanup_after_sigkill_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL a lab run while its forwarders and client run; ``--cleanup`` then ends
    every process in its namespaces and removes them; the host's routing is untouched."""
    state = tmp_path / "state"
    before_ns, before_routing = namespaces(), host_routing()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dht", "lab", "--forwarders-only", "--connections", "6",
         "--flaps", "20", "--seed", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DHT_LAB_STATE_DIR": str(state)},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # the progress line: the client runs
            if line.startswith("[with forwarders]") or time.monotonic() > deadline:
                break
        assert time.monotonic() < deadline, "the lab run never started its client"
        mine = sorted(namespaces() - before_ns)
        assert mine and all(ns.startswith("dhtlab-") for ns in mine)
        pids = [
            int(p)
            for ns in mine
            for p in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=True
            ).stdout.split()
        ]
        assert len(pids) >= 7  # 3 nodes, 3 forwarders, 3 echo servers, the client
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert set(mine) <= namespaces()  # SIGKILL left them behind
    dirs = [d for f in state.glob("dhtlab-*.json") for d in json.loads(f.read_text())["dirs"]]
    assert dirs and all(Path(d).is_dir() for d in dirs)
    r = lab(state, "--cleanup", timeout_s=60)
    assert r.returncode == 0, r.stderr
    assert not set(mine) & namespaces()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"process {pid} left"
    assert host_routing() == before_routing
    assert not list(state.glob("dhtlab-*.json"))
    assert not any(Path(d).exists() for d in dirs)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
