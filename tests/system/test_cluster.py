"""`dht cluster` as a real process tree: endpoints file, real work, clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest

from dht.client import Client
from dht.core.errors import DhtError, PermissionDenied
from dht.core.identity import Role
from dht.core.record import Status
from dht.core.wire import parse_flow
from dht.tools.certs import client_tls

pytestmark = pytest.mark.system


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def read_until(stream: asyncio.StreamReader, marker: str, timeout_s: float = 60) -> list[str]:
    lines = []
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"stream ended before {marker!r}: {lines}")
            lines.append(raw.decode().rstrip())
            if marker in lines[-1]:
                return lines


async def test_cluster_three_pops_endpoints_shipping_and_clean_stop(tmp_path: Path) -> None:
    """`dht cluster` runs with mutual TLS by default (docs/security.md): it makes the
    certificates where $DHT_CERTS_DIR says, every plane needs one, each PoP's forwarder
    certificate acts for its PoP only, and PoPs ship to each other over their peer
    planes."""
    endpoints = tmp_path / "endpoints.json"
    certs = tmp_path / "certs"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dht",
        "cluster",
        "--pops",
        "3",
        "--nodes-per-pop",
        "2",
        "--endpoints-file",
        str(endpoints),
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "DHT_CERTS_DIR": str(certs)},
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        lines = await read_until(proc.stdout, "cluster ready")
        assert any("endpoints written" in ln for ln in lines)
        assert any(f"mutual TLS: certificates in {certs}" in ln for ln in lines), lines
        data = json.loads(endpoints.read_text())
        nodes = data["nodes"]
        assert [(n["pop"], n["node_id"]) for n in nodes] == [
            ("ams", "ams-1"),
            ("ams", "ams-2"),
            ("fra", "fra-1"),
            ("fra", "fra-2"),
            ("lon", "lon-1"),
            ("lon", "lon-2"),
        ]
        pids = [n["pid"] for n in nodes]
        assert all(alive(p) for p in pids)
        ca = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        async with aiohttp.ClientSession() as http:
            for n in nodes:
                async with http.get(f"https://{n['admin']}/readyz", ssl=ca) as r:
                    assert r.status == 200
        fw = {pop: client_tls(certs, Role.FORWARDER, pop) for pop in ("ams", "fra", "lon")}
        # Each PoP is its own node set; each accepts claims and knows all PoP names.
        # Embryonic claims stay in their PoP; a confirmed flow is shipped to the others.
        flow = parse_flow("tcp/198.51.100.7:51000/192.0.2.1:443")
        for pop in ("ams", "fra", "lon"):
            targets = [n["grpc"] for n in nodes if n["pop"] == pop]
            async with Client(targets, tls=fw[pop]) as c:
                assert len(c.table.members) == 2
                assert c.pops == {"ams": 1, "fra": 2, "lon": 3}
                (r,) = await c.claim([flow], pop=pop)
                assert r.status == Status.CREATED
                (r,) = await c.lookup([flow])
                assert r.owner_pop == c.pops[pop]
                other = "fra" if pop == "ams" else "ams"
                with pytest.raises(PermissionDenied, match=f"only for PoP {pop}"):
                    await c.claim([parse_flow("tcp/198.51.100.9:1/192.0.2.1:443")], pop=other)
        # Without a certificate nothing gets through.
        with pytest.raises(DhtError):
            async with Client([nodes[0]["grpc"]], timeout_s=2) as c:
                await c.lookup([flow])
        shipped = parse_flow("tcp/198.51.100.8:51000/192.0.2.1:443")
        async with Client([n["grpc"] for n in nodes if n["pop"] == "ams"], tls=fw["ams"]) as c:
            (r,) = await c.confirm([shipped], pop="ams")
            assert r.status == Status.CREATED
        async with Client([n["grpc"] for n in nodes if n["pop"] == "lon"], tls=fw["lon"]) as c:
            for _ in range(400):  # polled for at most ~20 s
                (r,) = await c.lookup([shipped])
                if r.status == Status.OK:
                    break
                await asyncio.sleep(0.05)
            assert (r.status, r.owner_pop) == (Status.OK, c.pops["ams"])
        proc.send_signal(signal.SIGTERM)
        rest = await read_until(proc.stdout, "cluster stopped", timeout_s=30)
        assert rest[-1] == "cluster stopped"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not any(alive(p) for p in pids)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


async def test_cluster_rejects_bad_arguments() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dht",
        "cluster",
        "--pops",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"--pops and --nodes-per-pop must be >= 1" in err
