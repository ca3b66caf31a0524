"""``dht chaos`` end to end: a short run with a fixed seed (CPU starvation, a kill of a
real node process, a cut link and clock offsets, under load) whose history holds to the
model, and ``--check`` of a recorded history that does not."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from dht.core.record import Status
from dht.tools.chaos.history import History, Operation, outcome_of

pytestmark = pytest.mark.system


async def _dht(*args: str, env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dht", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:  # SIGTERM first: it stops the nodes it started
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_short_chaos_run_holds_to_the_model(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    env = {**os.environ, "DHT_CERTS_DIR": str(tmp_path / "certs")}
    code, out, err = await _dht(
        "chaos", "--duration", "30", "--seed", "13", "--history", str(history),
        env=env, timeout_s=150,
    )  # fmt: skip
    assert code == 0, out + err
    assert "verdict: PASS: 0 violations" in out, out
    assert "cpu: 2 busy processes" in out or "cpu:" in out, out
    assert " kill ams-" in out and " cut ams-" in out and "clocks: ams-1" in out, out
    assert "final look-ups: 0 flows never answered" in out, out
    assert not history.exists(), "a history is written only for a failed run"


async def test_check_reports_the_violations_of_a_recorded_history(tmp_path: Path) -> None:
    key = "tcp/198.51.100.7:1000/192.0.2.1:443"
    claim = Operation(key, "claim", "c", 1, 0.0, 1.0, "ok", "CREATED", 1, 100, 1, 1, 600.0)
    lost = Operation(key, "lookup", "c", 0, 2.0, 3.0, outcome_of("lookup", Status.NOT_FOUND),
                     "NOT_FOUND")  # fmt: skip
    path = tmp_path / "h.jsonl"
    History([claim, lost]).write(path)
    code, out, _ = await _dht("chaos", "--check", str(path), env=dict(os.environ), timeout_s=30)
    assert code == 1
    assert "lost: " + key in out and "verdict: FAIL: 1 violations" in out, out
