"""Running the tools that change the kernel's state: ``nft``, ``iptables``/``ip6tables``
and ``ip`` (docs/forwarder.md#teardown-and-crash-recovery).

Why the tools and not netlink libraries: setup and cleanup are a few dozen commands,
once; their text is what an operator reads back (``nft list table inet dht_fwd``,
``ip rule``), and the same commands are in the docs to run by hand. The one hot path,
pin updates, is one ``nft -f -`` process per batch of updates (``apply_pins``), never
one per packet.

``setup`` runs ``cleanup`` first, so it is idempotent; ``cleanup`` removes everything
with the fixed names of ``rules`` whatever state a crash left, and never fails on what
is already gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from dht.core.errors import DhtError
from dht.tools.forwarder import rules
from dht.tools.forwarder.config import AgentConfig

log = logging.getLogger(__name__)

IPTABLES = {4: "iptables", 6: "ip6tables"}
# Forwarding on, per family: the marked packets leave through the backbone.
SYSCTLS = {
    4: Path("/proc/sys/net/ipv4/ip_forward"),
    6: Path("/proc/sys/net/ipv6/conf/all/forwarding"),
}
# Early demux off (both families, TCP and UDP: net.ipv4.ip_early_demux governs IPv6 too).
# Early demux looks a received packet's 4-tuple up among this host's sockets before the
# routing decision and attaches the socket it finds (an established, half-open or
# TIME_WAIT one) to the packet; a packet with a socket attached is then dropped by the
# forwarding path (ip_forward, ip6_forward), silently. So a flow steered to another PoP
# while this host still holds a socket for the same 4-tuple (its own half-open
# connection after a SYN retransmitted to another PoP, say) would vanish here.
EARLY_DEMUX = Path("/proc/sys/net/ipv4/ip_early_demux")


class CommandFailed(DhtError):
    """A command that changes the kernel's state failed."""


def run(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run one command; its stdout. ``check``: raise CommandFailed on a non-zero exit."""
    p = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise CommandFailed(f"{' '.join(args)}: {p.stderr.strip() or f'status {p.returncode}'}")
    return p.stdout


def setup(config: AgentConfig, pop_ids: dict[str, int]) -> None:
    """Everything the data plane needs, from a clean state: the nft table, the NFQUEUE
    chains and their jumps, the routing tables and rules, forwarding on, early demux off
    (``EARLY_DEMUX``)."""
    cleanup()
    for v, path in SYSCTLS.items():
        if config.services_of(v):
            try:
                path.write_text("1\n")
            except OSError as e:
                raise CommandFailed(f"turning forwarding on ({path}): {e}") from None
    try:
        EARLY_DEMUX.write_text("0\n")
    except OSError as e:
        raise CommandFailed(f"turning early demux off ({EARLY_DEMUX}): {e}") from None
    run(["nft", "-f", "-"], stdin=rules.nft_ruleset(config))
    for v in (4, 6):
        if config.services_of(v):
            for args in rules.iptables_rules(config, v):
                run([IPTABLES[v], *args])
    for args in rules.route_commands(config, pop_ids):
        run(args)
    for v in (4, 6):
        moved = any(r.get("table") == "local" for r in rules.owned_rules(list_rules(v)))
        if moved:
            run(["ip", f"-{v}", "rule", "del", "pref", "0", "lookup", "local"], check=False)


def cleanup() -> None:
    """Remove everything the agent could have added (rules' fixed names); idempotent."""
    if run(["nft", "list", "table", "inet", rules.TABLE], check=False):
        run(["nft", "delete", "table", "inet", rules.TABLE])
    for v in (4, 6):
        _cleanup_iptables(IPTABLES[v])
        _cleanup_ip(v)


def _cleanup_iptables(tool: str) -> None:
    listing = run([tool, "-t", "mangle", "-S", "PREROUTING"], check=False)
    for line in listing.splitlines():
        parts = line.split()
        if parts[:1] == ["-A"] and parts[-2:] == ["-j", rules.CHAIN]:
            run([tool, "-t", "mangle", "-D", *parts[1:]], check=False)
    if run([tool, "-t", "mangle", "-S", rules.CHAIN], check=False):
        run([tool, "-t", "mangle", "-F", rules.CHAIN])
        run([tool, "-t", "mangle", "-X", rules.CHAIN])


def list_rules(version: int) -> list[dict[str, object]]:
    out = run(["ip", f"-{version}", "-j", "rule", "show"], check=False).strip()
    data = json.loads(out) if out else []
    return [r for r in data if isinstance(r, dict)]


def _cleanup_ip(version: int) -> None:
    fam = f"-{version}"
    current = list_rules(version)
    owned = rules.owned_rules(current)
    other_local = any(r.get("table") == "local" and r not in owned for r in current)
    if not other_local and any(r.get("table") == "local" for r in owned):
        # Local delivery back at its usual place before the moved rule goes (unless
        # another local rule is there: someone else moved it).
        run(["ip", fam, "rule", "add", "pref", "0", "lookup", "local"])
    for r in owned:
        run(["ip", fam, "rule", "del", "pref", str(r["priority"])], check=False)
    for t in sorted(rules.owned_tables(current) | _route_tables(version)):
        run(["ip", fam, "route", "flush", "table", str(t)], check=False)


def _route_tables(version: int) -> set[int]:
    """Tables TABLE_BASE + J that hold routes (a crash may leave them without rules)."""
    out = run(["ip", f"-{version}", "-j", "route", "show", "table", "all"], check=False).strip()
    tables: set[int] = set()
    for r in json.loads(out) if out else []:
        t = r.get("table") if isinstance(r, dict) else None
        if isinstance(t, str) and t.isdigit():
            n = int(t)
            if rules.TABLE_BASE < n <= rules.TABLE_BASE + rules.OWNER_MASK:
                tables.add(n)
    return tables


def leftovers() -> list[str]:
    """What of the agent's state is in the kernel now (empty: nothing); for tests and
    ``--cleanup``'s check."""
    found = []
    if run(["nft", "list", "table", "inet", rules.TABLE], check=False):
        found.append(f"nft table inet {rules.TABLE}")
    for v in (4, 6):
        tool = IPTABLES[v]
        if run([tool, "-t", "mangle", "-S", rules.CHAIN], check=False):
            found.append(f"{tool} chain {rules.CHAIN}")
        if rules.CHAIN in run([tool, "-t", "mangle", "-S", "PREROUTING"], check=False):
            found.append(f"{tool} jump to {rules.CHAIN}")
        found += [f"ip -{v} rule {r}" for r in rules.owned_rules(list_rules(v))]
        found += [f"ip -{v} route table {t}" for t in sorted(_route_tables(v))]
    return found


async def apply_pins(scripts: Sequence[str]) -> int:
    """One ``nft -f -`` for every pin update waiting; if the batch fails (an element the
    kernel dropped differently than this process counted), each update is retried on its
    own. Returns the number of updates that failed."""
    if not scripts:
        return 0
    if await _nft("\n".join(scripts) + "\n"):
        return 0
    failed = 0
    for s in scripts:
        if not await _nft(s + "\n"):
            failed += 1
    return failed


async def _nft(script: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "nft", "-f", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate(script.encode())
    if proc.returncode != 0:
        log.debug("nft batch failed: %s", err.decode(errors="replace").strip())
        return False
    return True
