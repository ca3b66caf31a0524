"""``dht simulate`` end to end: it starts its own 3-PoP cluster of real node processes,
runs a few seconds of traffic (TCP and UDP, pinned flows kept alive), writes the JSON
report and the plot, and stops every node it started."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system


async def test_simulate_command_reports_and_plots(tmp_path: Path) -> None:
    """With mutual TLS, as by default: the certificates go where $DHT_CERTS_DIR says."""
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    certs = tmp_path / "certs"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dht", "simulate", "--pops", "3", "--duration", "5",
        "--time-scale", "10", "--seed", "3", "--quiet", "--json", str(out), "--plot", str(png),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DHT_CERTS_DIR": str(certs)},
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    text = stdout.decode()
    assert "broken, plain anycast" in text
    assert "broken, with the table" in text
    assert "handshakes moved" in text and "second chance" in text
    report = json.loads(out.read_text())
    for key in ("connections", "broken_with_table", "broken_without_table", "tunnelled_packets"):
        assert isinstance(report[key], int), key
    assert report["connections"] > 100
    assert report["lookups_sent"] > 0
    assert set(report["shipped_records"]) == {"established", "refresh", "tombstone", "affinity"}
    assert report["shipped_records"]["established"] > 0
    assert report["settings"]["pops"] == ["ams", "fra", "lon"]
    # The traffic's kinds all ran: UDP flows, pinned flows kept alive, every breakage listed.
    assert report["udp"]["flows"] > 0
    assert report["pinned"]["flows"] > 0 and report["keepalive"]["calls"] > 0
    assert len(report["broken"]) == report["broken_with_table"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (certs / "forwarder-lon-fw.pem").exists(), "the forwarders used certificates"
