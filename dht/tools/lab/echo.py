"""The lab's echo service, one per PoP, run inside the PoP's namespace
(``python -m dht.tools.lab.echo --pop NAME --port P``; docs/lab.md#echo).

Line protocol: the client sends ``SEQ\\n``, the server answers ``SERVER-ID SEQ\\n``, where
SERVER-ID names the PoP and the accepted connection (``ams/17``). A connection that lands
on another PoP's socket (wrongly) gets another id, so the client tells a reply from its
own server from any other. Prints ``READY`` once it listens on IPv4 and IPv6.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal

# A line longer than this is not the lab's client: the connection is closed.
MAX_LINE = 64


class Echo:
    def __init__(self, pop: str) -> None:
        self.pop = pop
        self._ids = itertools.count(1)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid = f"{self.pop}/{next(self._ids)}".encode()
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
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


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


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m dht.tools.lab.echo")
    p.add_argument("--pop", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    asyncio.run(serve(args.pop, args.port))


if __name__ == "__main__":
    main()
