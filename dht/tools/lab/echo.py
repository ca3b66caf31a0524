"""The lab's echo service, one per PoP, run inside the PoP's namespace
(``python -m dht.tools.lab.echo --pop NAME --port P``; docs/lab.md#echo).

Line protocol: the client sends ``SEQ\\n``, the server answers ``SERVER-ID SEQ\\n``, where
SERVER-ID names the PoP and the accepted connection (``ams/17``). A connection that lands
on another PoP's socket (wrongly) gets another id, so the client tells a reply from its
own server from any other. Prints ``READY`` once it listens on IPv4 and IPv6. On SIGTERM
or SIGINT it stops listening, closes the connections still open (their handlers end as
at the client's end of stream) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
from typing import Any

# A line longer than this is not the lab's client: the connection is closed.
MAX_LINE = 64


class Echo:
    def __init__(self, pop: str) -> None:
        self.pop = pop
        self._ids = itertools.count(1)
        # The open connections, and their handlers: ``close`` ends them.
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid = f"{self.pop}/{next(self._ids)}".encode()
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line or len(line) > MAX_LINE:
                    break
                writer.write(sid + b" " + line)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client's problem to report; the server just lets go
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self, timeout_s: float = 1.0) -> None:
        """End every open connection's handler the quiet way: close its transport, so the
        handler reads an end of stream and returns (a handler cancelled by the event
        loop's shutdown instead makes asyncio's stream callback log a CancelledError
        traceback per connection). A connection whose buffered replies cannot leave
        within ``timeout_s`` (its client gone) is aborted."""
        for w in list(self._writers):
            w.close()
        pending = {t for t in self._handlers if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        if pending:
            for w in list(self._writers):
                w.transport.abort()
            await asyncio.wait(pending, timeout=timeout_s)

    @property
    def open_connections(self) -> int:
        return len(self._writers)


async def serve(pop: str, port: int) -> None:
    echo = Echo(pop)
    server = await asyncio.start_server(echo.handle, host=["0.0.0.0", "::"], port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    async with server:
        await stop.wait()
        server.close()  # no new connections
        await echo.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m dht.tools.lab.echo")
    p.add_argument("--pop", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    asyncio.run(serve(args.pop, args.port))


if __name__ == "__main__":
    main()
