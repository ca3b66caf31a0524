"""The kernel's connection tracking, read through the ``conntrack`` tool (Debian's
``conntrack`` package): ``conntrack -E`` streams events, one line each, flushed per
event; ``conntrack -L`` lists the table at start.

Why the tool and not a netlink library: the agent needs three facts per flow (the
handshake completed with a reply from this host, the connection is over, the flow is
still there), all in the tool's stable one-line format; the tool handles the netlink
protocol, its buffer overruns (``ENOBUFS``) and its versions, and runs in the agent's
namespace like every other command it uses. ``parse_line`` is pure; ``ConntrackEvents``
owns the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum

from dht.core.errors import InvalidArgument
from dht.core.record import TCP, UDP
from dht.core.wire import FlowKey
from dht.tools.forwarder.config import Address

log = logging.getLogger(__name__)

_PROTOS = {"tcp": TCP, "udp": UDP}


class Event(Enum):
    # A listed entry (conntrack -L) or a new / updated one: the flow is there.
    PRESENT = "present"
    DESTROY = "destroy"


@dataclass(frozen=True, slots=True)
class Entry:
    event: Event
    key: bytes  # the flow key record (client = the original direction's source)
    service: Address
    state: str  # TCP state (ESTABLISHED, TIME_WAIT, ...); "" for UDP
    assured: bool  # replies seen both ways: this host's stack answered

    @property
    def local_socket(self) -> bool:
        """A connection this host's stack completed: TCP ESTABLISHED (or closing) and
        assured (a connection picked up mid-stream, or only forwarded, sees no reply:
        never assured); UDP assured."""
        if not self.assured:
            return False
        return self.state in _LIVE_TCP if self.state else True


# States of a TCP connection whose socket is still open at this host.
_LIVE_TCP = frozenset(("ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK"))
_TCP_STATES = frozenset(
    ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
     "TIME_WAIT", "CLOSE", "SYN_SENT2")
)  # fmt: skip


def parse_line(line: str) -> Entry | None:
    """One ``conntrack -E`` or ``-L`` line (default output format) -> Entry; None for a
    line about another protocol, or not about a flow (the tool's summary line). Raises
    InvalidArgument for a malformed flow line."""
    tokens = line.split()
    if not tokens:
        return None
    event = Event.PRESENT
    if tokens[0].startswith("["):
        event = Event.DESTROY if tokens[0] == "[DESTROY]" else Event.PRESENT
        tokens = tokens[1:]
    if not tokens or tokens[0] not in _PROTOS:
        return None
    proto = _PROTOS[tokens[0]]
    fields: dict[str, str] = {}
    state = ""
    assured = False
    for t in tokens[1:]:
        name, sep, value = t.partition("=")
        if sep:
            # The original direction comes first; the reply tuple repeats the names.
            fields.setdefault(name, value)
        elif t == "[ASSURED]":
            assured = True
        elif t in _TCP_STATES:
            state = t
    try:
        src = ipaddress.ip_address(fields["src"])
        dst = ipaddress.ip_address(fields["dst"])
        key = FlowKey(proto, src, int(fields["sport"]), dst, int(fields["dport"])).to_bytes()
    except (KeyError, ValueError) as e:
        raise InvalidArgument("conntrack", f"unreadable line {line.strip()!r}: {e}") from None
    return Entry(event, key, dst, state, assured)


async def list_entries() -> list[Entry]:
    """The conntrack table now (``conntrack -L``, IPv4 and IPv6)."""
    out: list[Entry] = []
    for family in ("ipv4", "ipv6"):
        proc = await asyncio.create_subprocess_exec(
            "conntrack", "-L", "-f", family,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        stdout, _ = await proc.communicate()
        for line in stdout.decode(errors="replace").splitlines():
            with contextlib.suppress(InvalidArgument):
                e = parse_line(line)
                if e is not None:
                    out.append(e)
    return out


class ConntrackEvents:
    """``conntrack -E`` (updates and destroys, both families): ``entries()`` iterates
    over them. ``close()`` ends the process; safe twice. A malformed line is logged and
    skipped."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            "conntrack", "-E", "-e", "UPDATE,DESTROY",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def entries(self) -> AsyncIterator[Entry]:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        while True:
            raw = await stdout.readline()
            if not raw:
                code = await self._proc.wait()
                raise OSError(f"conntrack -E exited with status {code}")
            try:
                e = parse_line(raw.decode(errors="replace"))
            except InvalidArgument as err:
                log.warning("%s", err)
                continue
            if e is not None:
                yield e

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
