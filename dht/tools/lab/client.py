"""The lab's client: K long-lived TCP connections and the route changes of a schedule,
run inside the client's namespace (``python -m dht.tools.lab.client CONFIG.json``;
docs/lab.md#client).

Each connection sends ``SEQ\\n`` every ``send_interval_s`` (jittered) and reads the echo
``SERVER-ID SEQ\\n``: the first reply names its server, and every later one must come
from the same server with the same sequence number. A reset, a closed connection, a
reply that does not come within ``reply_timeout_s`` or one from another server breaks the
connection; it is then not used again (``broken``, with the reason and the time).

Route changes are run from here (``ip -n ROUTER``), so the handshake cases can move a
route right after their SYNs leave. Output on stdout, one JSON object a line: progress
(``{"progress": ...}``) every half second and the result (``{"result": ...}``) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import random
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dht.tools.lab.plan import (
    ECHO_PORT,
    HANDSHAKE,
    NFT_SETS_TABLE,
    SERVICE_V4,
    SERVICE_V6,
    STEADY,
    SYN_RETRY,
    Conn,
    Flap,
    Schedule,
    address_plan,
)

# The router's SYN-ACK retransmission arrives ~1 s after the first; the case's rules go
# away after this.
CASE_HOLD_S = 3.0
SYN_RETRY_LEAD_S = 0.3


@dataclass
class ConnResult:
    id: int
    family: int
    route: int
    kind: str
    state: str = "pending"  # pending, connecting, open, broken, closed
    setup_ms: float | None = None
    server: str = ""
    replies: int = 0
    moved: bool = False
    broken_at_s: float | None = None
    reason: str = ""


class LabClient:
    def __init__(self, schedule: Schedule, router_ns: str, reply_timeout_s: float) -> None:
        self.s = schedule
        self.router_ns = router_ns
        self.plan = address_plan(schedule.pops, schedule.routes)
        self.reply_timeout_s = reply_timeout_s
        self.results = {c.id: ConnResult(c.id, c.family, c.route, c.kind) for c in schedule.conns}
        self.stop = asyncio.Event()
        self.t0 = time.monotonic()
        self.flaps_done: list[dict[str, Any]] = []
        self.rng = random.Random(schedule.seed ^ 0x5EED)
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def _until(self, at_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, at_s - self.now()))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        """A failed helper (a route change or an nft command) is reported, not lost."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")

    # ------------------------------------------------------------------ commands

    async def _run(self, *args: str, stdin: str | None = None) -> None:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(stdin.encode() if stdin else None)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {err.decode().strip()}")

    async def move(self, f: Flap, spare: tuple[int, ...] = ()) -> None:
        """Send ``f.route`` to PoP ``f.pop``; the connections open on it are moved."""
        for c in self.s.conns:
            r = self.results[c.id]
            if c.route == f.route and r.state in ("connecting", "open") and c.id not in spare:
                r.moved = True
        lines = self.plan.route_commands(f.route, f.pop)
        await self._run("ip", "-n", self.router_ns, "-batch", "-", stdin="\n".join(lines) + "\n")
        self.flaps_done.append({"at_s": round(self.now(), 3), **asdict(f)})

    async def nft(self, verb: str, set_name: str, elements_: Sequence[int | str]) -> None:
        elements = ", ".join(str(p) for p in elements_)
        await self._run(
            "ip", "netns", "exec", self.router_ns, "nft",
            f"{verb} element inet {NFT_SETS_TABLE} {set_name} {{ {elements} }}",
        )  # fmt: skip

    # ------------------------------------------------------------------ connections

    def _source(self, c: Conn) -> tuple[socket.AddressFamily, str, str]:
        if c.family == 4:
            return socket.AF_INET, self.plan.client_v4[c.route], SERVICE_V4
        return socket.AF_INET6, self.plan.client_v6[c.route], SERVICE_V6

    async def connection(self, c: Conn, syn_sent: asyncio.Event | None = None) -> None:
        r = self.results[c.id]
        fam, src, dst = self._source(c)
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((src, c.port))
            r.state = "connecting"
            t = time.monotonic()
            code = sock.connect_ex((dst, ECHO_PORT))  # the SYN leaves here
            if syn_sent is not None:
                syn_sent.set()
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, errno.errorcode.get(code, str(code)))
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), _resolve, writable)
            try:
                await asyncio.wait_for(writable, 10.0)
            finally:
                loop.remove_writer(sock.fileno())
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, errno.errorcode.get(err, str(err)))
            r.setup_ms = round((time.monotonic() - t) * 1000, 3)
            r.state = "open"
            reader, writer = await asyncio.open_connection(sock=sock)
            seq = 0
            while not self.stop.is_set():
                seq += 1
                writer.write(b"%d\n" % seq)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), self.reply_timeout_s)
                if not line:
                    raise ConnectionResetError("closed by the server (EOF)")
                server, _, got = line.decode(errors="replace").strip().partition(" ")
                if got != str(seq):
                    raise ValueError(f"reply {got!r} to {seq}")
                if r.server and server != r.server:
                    raise ValueError(f"reply from {server}, connection is to {r.server}")
                r.server = server
                r.replies += 1
                pause = self.s.send_interval_s * self.rng.uniform(0.5, 1.5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), pause)
            r.state = "closed"
        except (OSError, ValueError, TimeoutError) as e:
            r.state = "broken"
            r.broken_at_s = round(self.now(), 3)
            r.reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            if syn_sent is not None:
                syn_sent.set()
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            else:
                sock.close()

    async def _open_batch(self, conns: list[Conn]) -> None:
        events = [asyncio.Event() for _ in conns]
        for c, ev in zip(conns, events, strict=True):
            self._spawn(self.connection(c, ev))
        await asyncio.gather(*(ev.wait() for ev in events))

    async def handshake_case(self, f: Flap, conns: list[Conn]) -> None:
        """Move the route while the batch's handshakes are in flight: the first SYN-ACKs
        are dropped at the router, the route moves, then the client's SYNs sent again
        are dropped and the server's SYN-ACK sent again passes, so the client's ACK goes
        to the new PoP."""
        ports = [c.port for c in conns]
        await self.nft("add", "armed", ports)
        await self._open_batch(conns)
        await self.move(f)
        await self.nft("add", "hold", ports)
        await self.nft("delete", "armed", ports)
        await self._until(self.now() + CASE_HOLD_S)
        await self.nft("delete", "hold", ports)

    async def syn_retry_case(self, f: Flap, conns: list[Conn]) -> None:
        """The first SYN-ACK is dropped at the router and the route moves before the
        client sends its SYN again: the retransmitted SYN reaches the new PoP."""
        ports = [c.port for c in conns]
        pairs = [f'{p} . "{self.plan.pops[f.pop].router_if}"' for p in ports]
        await self.nft("add", "newpop", pairs)
        await self.nft("add", "newonly", ports)
        await self.nft("add", "armed", ports)
        await self._open_batch(conns)
        await self._until(self.now() + SYN_RETRY_LEAD_S)
        await self.move(f, spare=tuple(c.id for c in conns))
        await self._until(self.now() + CASE_HOLD_S)
        await self.nft("delete", "armed", ports)
        await self.nft("delete", "newonly", ports)
        await self.nft("delete", "newpop", pairs)

    # ------------------------------------------------------------------ the run

    async def flaps(self) -> None:
        for k, f in enumerate(self.s.flaps):
            start = f.at_s - (SYN_RETRY_LEAD_S if f.kind == SYN_RETRY else 0.0)
            await self._until(start)
            if self.stop.is_set():
                return
            batch = [c for c in self.s.conns if c.flap == k]
            if f.kind == HANDSHAKE:
                self._spawn(self.handshake_case(f, batch))
            elif f.kind == SYN_RETRY:
                self._spawn(self.syn_retry_case(f, batch))
            else:
                await self.move(f)

    async def steady(self, c: Conn) -> None:
        await self._until(c.open_s)
        if not self.stop.is_set():
            await self.connection(c)

    async def progress(self) -> None:
        while not self.stop.is_set():
            states = [r.state for r in self.results.values()]
            line = {
                "t": round(self.now(), 1),
                "open": states.count("open"),
                "broken": states.count("broken"),
                "flaps": len(self.flaps_done),
            }
            print(json.dumps({"progress": line}), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)

    async def run(self) -> dict[str, Any]:
        for c in self.s.conns:
            if c.kind == STEADY:
                self._spawn(self.steady(c))
        self._spawn(self.flaps())
        self._spawn(self.progress())
        await self._until(self.s.duration_s)
        self.stop.set()
        # Every loop ends within one reply timeout of the stop; cases clean up their rules.
        deadline = self.reply_timeout_s + CASE_HOLD_S + 2
        while self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=deadline)
            if pending:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        return {
            "conns": [asdict(r) for r in self.results.values()],
            "flaps": self.flaps_done,
            "errors": self.errors,
            "wall_s": round(self.now(), 3),
        }


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m dht.tools.lab.client")
    p.add_argument("config", help="JSON: schedule, router_ns, reply_timeout_s")
    args = p.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    client = LabClient(
        Schedule.from_json(cfg["schedule"]), cfg["router_ns"], float(cfg["reply_timeout_s"])
    )
    result = asyncio.run(client.run())
    print(json.dumps({"result": result}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
