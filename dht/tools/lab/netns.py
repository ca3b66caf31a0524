"""The lab's namespaces: build the topology of an ``AddressPlan``, remember what was made
in a state file, and remove exactly that (docs/lab.md#cleanup).

Every namespace is named ``<prefix>-<role>`` with a run-unique prefix
(``dhtlab-<6 hex>``), and its name is written to the state file *before* it is created,
so a run killed at any point leaves nothing ``remove`` cannot find. Whatever the lab puts
in a namespace (routes, rules, nft tables, processes) goes away with it: ``remove`` ends
the processes left in each namespace (``ip netns pids``) and deletes the namespace.

Library code: it raises ``DhtError`` and never exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dht.core.errors import DhtError
from dht.tools.lab.plan import (
    BRIDGE,
    CLIENT_IF,
    NFT_SETS_TABLE,
    POP_BACKBONE_IF,
    POP_UPLINK_IF,
    ROUTE_TABLE_BASE,
    ROUTER_CLIENT_IF,
    SERVICE_V4,
    SERVICE_V6,
    AddressPlan,
)

STATE_DIR = Path(os.environ.get("DHT_LAB_STATE_DIR", "/run/dht-lab"))
PREFIX = "dhtlab-"


def new_prefix() -> str:
    return f"{PREFIX}{secrets.token_hex(3)}"


def sh(args: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run one command; its stdout. ``DhtError`` with its stderr when it fails."""
    r = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise DhtError(f"{' '.join(args)}: {r.stderr.strip() or f'status {r.returncode}'}")
    return r.stdout


def existing_namespaces() -> set[str]:
    out = sh(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclass
class LabState:
    """What one lab run made, persisted as JSON at ``path`` after every change."""

    path: Path
    namespaces: list[str] = field(default_factory=list)
    # Directories of the run's files (the nodes' and the client's configuration).
    dirs: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str) -> LabState:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        st = cls(STATE_DIR / f"{prefix}.json")
        st.save()
        return st

    @classmethod
    def load(cls, path: Path) -> LabState:
        try:
            data = json.loads(path.read_text())
            names = [str(n) for n in data.get("namespaces", [])]
            dirs = [str(d) for d in data.get("dirs", [])]
        except (OSError, ValueError, AttributeError) as e:
            raise DhtError(f"lab state {path}: {e}") from None
        return cls(path, names, dirs)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"namespaces": self.namespaces, "dirs": self.dirs, "pid": os.getpid()}
        tmp.write_text(json.dumps(state) + "\n")
        os.replace(tmp, self.path)

    def add(self, name: str) -> None:
        if not name.startswith(PREFIX):
            raise DhtError(f"refusing a lab namespace without the {PREFIX} prefix: {name}")
        self.namespaces.append(name)
        self.save()

    def add_dir(self, path: Path) -> None:
        self.dirs.append(str(path))
        self.save()


def namespace_pids(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def end_processes(namespaces: Iterable[str], timeout_s: float = 5.0) -> None:
    """SIGTERM every process in these namespaces (the forwarders tear down on it), then
    SIGKILL what is left after ``timeout_s``."""
    names = list(namespaces)
    pids = [p for ns in names for p in namespace_pids(ns)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [p for ns in names for p in namespace_pids(ns)]
        if pids:
            time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove(state: LabState, timeout_s: float = 5.0) -> list[str]:
    """End the processes of ``state``'s namespaces, delete them, then the state file.
    The namespaces removed."""
    live = existing_namespaces()
    mine = [ns for ns in state.namespaces if ns in live and ns.startswith(PREFIX)]
    end_processes(mine, timeout_s)
    for ns in mine:
        sh(["ip", "netns", "del", ns], check=False)
    left = [ns for ns in mine if ns in existing_namespaces()]
    if left:
        raise DhtError(f"could not delete namespaces {', '.join(left)}")
    for d in state.dirs:
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state.path.unlink()
    return mine


def remove_all(timeout_s: float = 5.0) -> list[str]:
    """``dht lab --cleanup``: remove what every recorded lab run made (runs still going
    too: their namespaces vanish under them)."""
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    for path in sorted(STATE_DIR.glob(f"{PREFIX}*.json")):
        removed += remove(LabState.load(path), timeout_s)
    return removed


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Names:
    prefix: str
    pops: tuple[str, ...]

    @property
    def client(self) -> str:
        return f"{self.prefix}-client"

    @property
    def router(self) -> str:
        return f"{self.prefix}-router"

    @property
    def backbone(self) -> str:
        return f"{self.prefix}-backbone"

    def pop(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def all(self) -> list[str]:
        return [self.client, self.router, self.backbone, *(self.pop(p) for p in self.pops)]


def _ip(ns: str, lines: Sequence[str], family: str = "") -> None:
    """Several ``ip`` commands in one process (``ip -n NS -batch -``); a batch line takes
    no options, so IPv6-only commands without an address go in a ``family="-6"`` batch."""
    opts = [family] if family else []
    sh(["ip", *opts, "-n", ns, "-batch", "-"], stdin="\n".join(lines) + "\n")


def _sysctls(ns: str, forwarding: bool) -> None:
    # Before any interface exists: DAD off (all and default), or link-local addresses stay
    # tentative and the first neighbour look-up after a route change costs ~2 s;
    # rp_filter off, for direct server return (replies leave by another link).
    values = {
        "net.ipv6.conf.all.accept_dad": "0",
        "net.ipv6.conf.default.accept_dad": "0",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
    }
    if forwarding:
        values["net.ipv4.ip_forward"] = "1"
        values["net.ipv6.conf.all.forwarding"] = "1"
    sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])


def build(plan: AddressPlan, names: Names, state: LabState, initial: Sequence[int]) -> None:
    """Create the namespaces, links, addresses, routes and rules of ``plan``; the router
    sends route ``r`` to PoP ``initial[r]``. Raises ``DhtError`` (what was made is in
    ``state``: remove it)."""
    for ns in names.all():
        state.add(ns)
        sh(["ip", "netns", "add", ns])
        _sysctls(ns, forwarding=ns not in (names.client, names.backbone))
        _ip(ns, ["link set lo up"])
    c, r, bb = names.client, names.router, names.backbone
    sh(["ip", "link", "add", CLIENT_IF, "netns", c, "type", "veth",
        "peer", "name", ROUTER_CLIENT_IF, "netns", r])  # fmt: skip
    _ip(bb, [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"])
    client = [f"link set {CLIENT_IF} up"]
    for i in range(len(plan.client_v4)):
        client += [
            f"addr add {plan.client_v4[i]}/24 dev {CLIENT_IF}",
            f"addr add {plan.client_v6[i]}/64 dev {CLIENT_IF} nodad",
        ]
    client += [
        f"route add default via {plan.router_client_v4}",
        f"route add default via {plan.router_client_v6}",
    ]
    _ip(c, client)
    router = [
        f"link set {ROUTER_CLIENT_IF} up",
        f"addr add {plan.router_client_v4}/24 dev {ROUTER_CLIENT_IF}",
        f"addr add {plan.router_client_v6}/64 dev {ROUTER_CLIENT_IF} nodad",
    ]
    for p in plan.pops:
        pns = names.pop(p.name)
        sh(["ip", "link", "add", p.router_if, "netns", r, "type", "veth",
            "peer", "name", POP_UPLINK_IF, "netns", pns])  # fmt: skip
        sh(["ip", "link", "add", p.bridge_port, "netns", bb, "type", "veth",
            "peer", "name", POP_BACKBONE_IF, "netns", pns])  # fmt: skip
        _ip(bb, [f"link set {p.bridge_port} master {BRIDGE}", f"link set {p.bridge_port} up"])
        router += [
            f"link set {p.router_if} up",
            f"addr add {p.router_v4}/24 dev {p.router_if}",
            f"addr add {p.router_v6}/64 dev {p.router_if} nodad",
        ]
        _ip(pns, [
            f"link set {POP_UPLINK_IF} up",
            f"addr add {p.uplink_v4}/24 dev {POP_UPLINK_IF}",
            f"addr add {p.uplink_v6}/64 dev {POP_UPLINK_IF} nodad",
            f"link set {POP_BACKBONE_IF} up",
            f"addr add {p.backbone_v4}/24 dev {POP_BACKBONE_IF}",
            f"addr add {p.backbone_v6}/64 dev {POP_BACKBONE_IF} nodad",
            f"addr add {SERVICE_V4}/32 dev lo",
            f"addr add {SERVICE_V6}/128 dev lo",
            # Replies go straight back to the client through the router (direct server
            # return); the backbone carries only PoP-to-PoP traffic.
            f"route add default via {p.router_v4}",
            f"route add default via {p.router_v6}",
            # Local delivery must not beat the forwarder's fwmark rules (LAB.md).
            "rule add pref 1000 lookup local",
            "rule del pref 0",
        ])  # fmt: skip
        _ip(pns, ["rule add pref 1000 lookup local", "rule del pref 0"], family="-6")
    router6 = []
    for i in range(len(plan.client_v4)):
        table = ROUTE_TABLE_BASE + i
        router += [
            f"rule add from {plan.client_v4[i]} lookup {table} pref {100 + i}",
            *plan.route_commands(i, initial[i]),
        ]
        router6.append(f"rule add from {plan.client_v6[i]} lookup {table} pref {100 + i}")
    _ip(r, router)
    _ip(r, router6, family="-6")
    _router_nft(r)


# The router's handshake cases (docs/lab.md#handshake-cases), keyed by the client's source
# port: @armed drops SYN-ACKs to a port until the client has sent its SYN again
# (@retried); @hold drops the client's SYNs from a port (its SYN-ACK comes again instead);
# a port in @newonly gets SYN-ACKs only from the router interface @newpop names for it
# (the SYN-retransmission case: the first PoP's own SYN-ACK sent again must not win the
# race with the new PoP's, a known limit, docs/protocol.md#known-limits).
_NFT_RULES = f"""
table inet {NFT_SETS_TABLE} {{
  set armed {{ type inet_service; }}
  set hold {{ type inet_service; }}
  set synseen {{ type inet_service; flags dynamic; }}
  set retried {{ type inet_service; flags dynamic; }}
  set newonly {{ type inet_service; }}
  set newpop {{ type inet_service . ifname; }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    tcp flags & (syn | ack) == syn | ack tcp dport @newonly tcp dport . iifname != @newpop drop
    tcp flags & (syn | ack) == syn tcp sport @hold drop
    tcp flags & (syn | ack) == syn tcp sport @synseen add @retried {{ tcp sport }}
    tcp flags & (syn | ack) == syn tcp sport @armed add @synseen {{ tcp sport }}
    tcp flags & (syn | ack) == syn | ack tcp dport @retried accept
    tcp flags & (syn | ack) == syn | ack tcp dport @armed drop
  }}
}}
"""


def _router_nft(router_ns: str) -> None:
    sh(["ip", "netns", "exec", router_ns, "nft", "-f", "-"], stdin=_NFT_RULES)
