"""Process helpers for the benchmarks: RSS and CPU time of another process, a real
redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from types import TracebackType

from dht.core.errors import DhtError
from dht.tools.cluster import free_ports


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used so far (user + system), in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: count fields after its ")".
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ensure_redis_server() -> str:
    """Path of ``redis-server``; installed with apt-get (as root) when missing."""
    path = shutil.which("redis-server")
    if path:
        return path
    if os.geteuid() != 0:
        raise DhtError("redis-server is not installed (apt-get install redis-server, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
    path = shutil.which("redis-server")
    if not path:
        raise DhtError("apt-get installed redis-server but it is not on PATH")
    return path


def redis_server_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


class RedisServer:
    """One redis-server on loopback, no persistence, started and stopped by us."""

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        self.path = ensure_redis_server()
        self.port = free_ports("127.0.0.1", 1)[0]
        self.start_timeout_s = start_timeout_s
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.path,
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "notice",
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while True:  # bounded by the deadline: wait for its own "ready" line
            left = deadline - loop.time()
            if left <= 0:
                await self.stop()
                raise DhtError(f"redis-server not ready after {self.start_timeout_s} s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise DhtError(f"redis-server exited with status {await self.proc.wait()}")
            if b"Ready to accept connections" in line:
                break
        # Keep draining its log so it never blocks on a full pipe.
        self._drain = loop.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        drain = getattr(self, "_drain", None)
        if drain is not None:
            await drain

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.stop()
