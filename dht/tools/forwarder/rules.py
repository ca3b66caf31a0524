"""The kernel state the agent owns, as text and argument lists (docs/forwarder.md#how-it-works).
Pure: ``system`` runs what this module writes.

Everything has a fixed name, so ``--cleanup`` finds it after a crash without any state
file: the nft table ``inet dht_fwd``, the iptables/ip6tables chain ``DHT_FWD`` in the
mangle table (and its jump rules from PREROUTING), ``ip rule`` entries with preferences in
``RULE_PREFS`` and routing tables ``TABLE_BASE + pop id``.

Marks: the low 16 bits are the owning PoP's id (0: this PoP), bit 16 (``PINNED``) says
the flow is in the map. A packet whose mark lacks ``PINNED`` after the map is unknown to
it, and goes up to Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from dht.tools.forwarder.config import Address, AgentConfig

TABLE = "dht_fwd"  # nft table, family inet
CHAIN = "DHT_FWD"  # iptables / ip6tables chain in the mangle table
PINNED = 0x10000
OWNER_MASK = 0xFFFF
# Routing table of PoP J: TABLE_BASE + J.
TABLE_BASE = 100
# ip rule preferences: the fwmark rules, then the local table moved behind them (local
# delivery would otherwise win over every fwmark rule). Below 1000, so they also come
# before a local rule someone else moved to pref 1000 (a common lab layout). Cleanup
# removes every rule in RULE_PREFS.
FWMARK_PREF = 500
LOCAL_PREF = 900
RULE_PREFS = range(500, 1000)
# The nft chain runs before iptables' mangle chain (-150), so the NFQUEUE rules see the
# mark the map set.
NFT_PRIORITY = -160


def route_table(pop_id: int) -> int:
    return TABLE_BASE + pop_id


def nft_ruleset(config: AgentConfig) -> str:
    """The ``inet dht_fwd`` table (for ``nft -f -``): service address sets, one flow map
    per family (flow 5-tuple -> mark, with element timeouts), and a prerouting chain that
    sets the mark of known flows. A packet tunnelled in (arriving on the backbone
    interface) is never steered on again (hop limit 1): its owner bits are cleared. The
    ``ct state`` rule makes sure conntrack tracks this namespace (conntrack's hooks are
    registered per namespace only when a rule asks for them)."""
    bb = config.backbone_if
    lines = [f"table inet {TABLE} {{"]
    for v, ty in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        svc = config.services_of(v)
        elements = f" elements = {{ {', '.join(str(s) for s in svc)} }};" if svc else ""
        lines.append(f"  set services{v} {{ type {ty};{elements} }}")
        lines.append(
            f"  map flows{v} {{ type inet_proto . {ty} . inet_service . {ty} . inet_service"
            " : mark; flags timeout; }"
        )
    lines += [
        "  chain prerouting {",
        f"    type filter hook prerouting priority {NFT_PRIORITY}; policy accept;",
        "    ct state new counter",
        "    ip daddr @services4 meta l4proto { tcp, udp } meta mark set"
        " meta l4proto . ip saddr . th sport . ip daddr . th dport map @flows4",
        "    ip6 daddr @services6 meta l4proto { tcp, udp } meta mark set"
        " meta l4proto . ip6 saddr . th sport . ip6 daddr . th dport map @flows6",
        f'    iifname "{bb}" meta mark & {PINNED:#x} == {PINNED:#x} meta mark set {PINNED:#x}',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def iptables_rules(config: AgentConfig, version: int) -> list[list[str]]:
    """Arguments for ``iptables`` (4) or ``ip6tables`` (6), in order: the chain and its
    upcall rules, then one jump per service address. Upcalls: TCP SYN (not SYN-ACK), FIN,
    RST, and any TCP/UDP packet the map did not know (no PINNED bit; this includes the
    first packet tunnelled in). ``--queue-bypass``: with no agent listening (crashed,
    stopping) packets are accepted, and the map keeps steering known flows."""
    q = ["-j", "NFQUEUE", "--queue-num", str(config.queue_num), "--queue-bypass"]
    m = ["-t", "mangle"]
    rules = [
        [*m, "-N", CHAIN],
        [*m, "-A", CHAIN, "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN", *q],
        [*m, "-A", CHAIN, "-p", "tcp", "--tcp-flags", "FIN", "FIN", *q],
        [*m, "-A", CHAIN, "-p", "tcp", "--tcp-flags", "RST", "RST", *q],
        [*m, "-A", CHAIN, "-p", "tcp", "-m", "mark", "--mark", f"0/{PINNED:#x}", *q],
        [*m, "-A", CHAIN, "-p", "udp", "-m", "mark", "--mark", f"0/{PINNED:#x}", *q],
    ]
    for s in config.services_of(version):
        rules.append([*m, "-I", "PREROUTING", "-d", str(s), "-j", CHAIN])
    return rules


def route_commands(config: AgentConfig, pop_ids: dict[str, int]) -> list[list[str]]:
    """Arguments for ``ip``: per other PoP J and family, a table TABLE_BASE + J routing
    every service address of that family via J's next hop over the backbone, a rule
    ``fwmark J lookup TABLE_BASE + J``; then the local table moved behind the fwmark rules
    (added at LOCAL_PREF before the one at pref 0 is removed, so local delivery never
    stops; ``system.setup`` removes the pref-0 rule, if there is one). ``pop_ids``: PoP
    name -> id, from the table."""
    cmds: list[list[str]] = []
    for v in (4, 6):
        hops = config.hops_of(v)
        services = config.services_of(v)
        if not hops or not services:
            continue
        fam = f"-{v}"
        for h in hops:
            j = pop_ids[h.pop]
            table = str(route_table(j))
            for s in services:
                cmds.append(
                    ["ip", fam, "route", "replace", _prefix(s), "via", str(h.address),
                     "dev", config.backbone_if, "table", table]
                )  # fmt: skip
            cmds.append(
                ["ip", fam, "rule", "add", "pref", str(FWMARK_PREF), "fwmark",
                 f"{j:#x}/{OWNER_MASK:#x}", "lookup", table]
            )  # fmt: skip
        cmds.append(["ip", fam, "rule", "add", "pref", str(LOCAL_PREF), "lookup", "local"])
    return cmds


def _prefix(a: Address) -> str:
    return f"{a}/{a.max_prefixlen}"


def owned_rules(rules: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """Of ``ip -j rule show``'s rules, the ones the agent may have added."""
    return [r for r in rules if isinstance(r.get("priority"), int) and r["priority"] in RULE_PREFS]


def owned_tables(rules: Sequence[dict[str, object]]) -> set[int]:
    """The routing tables the owned rules look up (TABLE_BASE + J, J in 1..65535)."""
    out = set()
    for r in owned_rules(rules):
        t = r.get("table")
        if isinstance(t, str) and t.isdigit():
            n = int(t)
            if TABLE_BASE < n <= TABLE_BASE + OWNER_MASK:
                out.add(n)
    return out
