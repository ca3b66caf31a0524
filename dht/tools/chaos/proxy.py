"""A TCP proxy a fault test controls: put it on a link (``--dial-via``) and delay or cut it.

It runs in the caller's event loop, listens on a free loopback port and forwards to one
target. ``cut()`` drops every open connection and closes new ones at once (the peer sees
a broken connection, as with a link failure); ``heal()`` lets them through again.
``delay_s`` holds every chunk that long before passing it on, in order, both ways (a slow
or congested link); 0 passes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class Proxy:
    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.is_cut = False
        self.delay_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction. Chunks wait in a queue for their time when delayed, so a
        delay adds latency without cutting the link's throughput to one chunk per delay."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while not sender.done():
                    data = await reader.read(65536)
                    queue.put_nowait((time.monotonic() + self.delay_s, data))
                    if not data:
                        break
                await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
            writer.transport.abort()

    def cut(self) -> None:
        self.is_cut = True
        for w in list(self._writers):
            w.transport.abort()

    def heal(self) -> None:
        self.is_cut = False
        self.delay_s = 0.0

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
