"""What a ``dht simulate`` run reports (docs/simulator.md#the-report): the numbers (a dict,
written as JSON), the text printed at the end, the plot, and the records the nodes
shipped (read from their ``/metrics``)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from dht.client.forwarder import ForwarderStats
from dht.tools.sim.judge import Tally
from dht.tools.sim.settings import SimSettings
from dht.tools.traffic import Traffic

SHIPPED_KINDS = ("established", "refresh", "tombstone", "affinity")
_SHIPPED = re.compile(r"^dht_pop_shipped_records(?:_total)?\{([^}]*)\}\s+(\S+)", re.M)
# Breakages printed in the text report (the JSON has them all).
TEXT_BREAKAGES = 50
# A run further behind schedule than this (real ms) was starved of CPU: the text says so.
BEHIND_MS = 250.0


def build_report(
    s: SimSettings,
    tr: Traffic,
    tally: Tally,
    stats: Sequence[ForwarderStats],
    pop_names: Sequence[str],
    baseline: Sequence[float],
    wall_s: float,
    shipped: Mapping[str, int],
) -> dict[str, Any]:
    lat = np.array([x for st in stats for x in st.miss_latency_s]) * 1000
    summed = {
        f.name: sum(getattr(st, f.name) for st in stats)
        for f in fields(ForwarderStats)
        if f.name != "miss_latency_s"
    }
    hits, misses = summed["hits"], summed["misses"]
    return {
        "connections": tally.connections,
        "broken_with_table": len(tally.broken),
        "broken_without_table": len(baseline),
        "tunnelled_packets": tally.tunnelled,
        "packets": tally.packets,
        "lookups_sent": summed["lookups_sent"],
        "lookup_batches": summed["lookup_batches"],
        "coalesced": summed["coalesced"],
        "claims": summed["claims"],
        "cache_hit_rate": round(hits / max(1, hits + misses), 4),
        "miss_latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "count": int(lat.size),
        },
        "second_chance": {
            "sent": summed["second_chance_sent"],
            "found": summed["second_chance_found"],
        },
        "forwarders": summed,
        "shipped_records": dict(shipped),
        "route_changes": len(tr.flaps),
        "traffic": tr.kinds(),
        "foreign_packets": dict(tally.foreign),
        "flap_before_ship": dict(tally.before_ship),
        "home_packets": dict(tally.home),
        "handshakes": dict(tally.handshakes),
        "syn_again": dict(tally.syn_again),
        "udp": dict(tally.udp),
        "pinned": dict(tally.pinned),
        "keepalive": {
            **tally.keepalive,
            "interval_s": round(s.keepalive_interval_s() * s.time_scale, 3)
            if s.keepalive
            else None,
        },
        "confirms": dict(tally.confirms),
        "broken_reasons": dict(Counter(b.reason for b in tally.broken)),
        "broken": [vars(b) for b in tally.broken],
        "timeline": {
            "with_table_s": sorted(b.t_s for b in tally.broken),
            "without_table_s": sorted(baseline),
            "flaps_s": sorted({round(f.t_s, 3) for f in tr.flaps}),
        },
        "max_lag_ms": round(1000 * tally.lag_s, 1),
        "wall_s": round(wall_s, 1),
        "settings": {
            "pops": list(pop_names),
            "duration_s": s.duration_s,
            "simulated_s": tr.duration_s,
            "time_scale": s.time_scale,
            "seed": s.seed,
            "replicate_after_s": s.replicate_after_s,
            "claim_ttl_s": s.claim_ttl_s,
            "established_ttl_s": s.established_ttl_s,
            "owner_ttl_s": s.owner_ttl_s,
            "embryonic_ttl_s": s.embryonic_ttl_s,
            "negative_ttl_s": s.negative_ttl_s,
            "sticky_clients": s.sticky_clients,
            "use_affinity": s.use_affinity,
            "second_chance": s.second_chance,
            "second_chance_timeout_s": s.second_chance_timeout_s,
            "keepalive": s.keepalive,
            "udp_confirm_after_s": s.udp_confirm_after_s,
            "handshake_s": tr.handshake_s,
            "clients": len(tr.addresses),
        },
    }


async def shipped_records(admins: Sequence[str], certs: Path | None) -> dict[str, float]:
    """Records acknowledged by peer PoPs, by kind, summed over the nodes' /metrics
    (over HTTPS, verified against the cluster's CA, when ``certs`` is given)."""
    import ssl

    import aiohttp

    total: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=5)
    scheme, ctx = "http", None
    if certs is not None:
        scheme, ctx = "https", ssl.create_default_context(cafile=str(certs / "ca.pem"))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for admin in admins:
            try:
                async with http.get(f"{scheme}://{admin}/metrics", ssl=ctx or True) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            for labels, value in _SHIPPED.findall(text):
                kind = re.search(r'kind="([^"]+)"', labels)
                if kind:
                    total[kind.group(1)] = total.get(kind.group(1), 0.0) + float(value)
    return total


# --------------------------------------------------------------------------- text


def format_report(r: Mapping[str, Any]) -> str:
    lat = r["miss_latency_ms"]
    shipped = ", ".join(f"{k} {v:,}" for k, v in r["shipped_records"].items())

    def pct(n: int) -> str:
        return f"{100 * n / max(1, r['connections']):.2f}%"

    def counts(d: Mapping[str, Any]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in d.items() if v) or "none"

    st, hs, again, udp, pin = (
        r["settings"], r["handshakes"], r["syn_again"], r["udp"], r["pinned"]
    )  # fmt: skip
    ka, fw = r["keepalive"], r["forwarders"]
    keep = (
        f"alive() every {ka['interval_s']} s: {ka.get('calls', 0):,} calls, "
        f"{ka.get('keys', 0):,} keys ({ka.get('not-owned', 0):,} answers not owned here)"
        if st["keepalive"]
        else "keep-alive off"
    )
    lines = [
        f"simulated {st['simulated_s']:.0f} s of anycast traffic in {r['wall_s']} s "
        f"(time scale {st['time_scale']:g}, seed {st['seed']}) over PoPs "
        f"{', '.join(st['pops'])}; {r['route_changes']} route changes; replicate after "
        f"{st['replicate_after_s']:g} s, established TTL {st['established_ttl_s']:g} s",
        f"connections            {r['connections']:,} ({counts(r['traffic'])})",
        f"broken, plain anycast  {r['broken_without_table']:,} ({pct(r['broken_without_table'])})",
        f"broken, with the table {r['broken_with_table']:,} ({pct(r['broken_with_table'])})"
        + (f"  reasons: {counts(r['broken_reasons'])}" if r["broken_reasons"] else ""),
        f"packets                {r['packets']:,}, tunnelled {r['tunnelled_packets']:,}; "
        f"landed home: {counts(r['home_packets'])}",
        f"handshakes moved       {hs.get('route-changed', 0):,} (ACK on another PoP than the "
        f"SYN): saved {hs.get('saved', 0):,}, broken {hs.get('broken', 0):,}",
        f"SYNs sent again        {again.get('sent', 0):,}: landed elsewhere "
        f"{again.get('landed-elsewhere', 0):,}, connection lives elsewhere "
        f"{again.get('lived-elsewhere', 0):,}",
        f"UDP flows              {udp.get('flows', 0):,}: confirmed {udp.get('confirmed', 0):,}"
        f", broken {udp.get('broken', 0):,}",
        f"pinned flows           {pin.get('flows', 0):,} (data plane served "
        f"{pin.get('data-plane-packets', 0):,} packets), broken {pin.get('broken', 0):,}; {keep}",
        f"look-ups sent          {r['lookups_sent']:,} keys in {r['lookup_batches']:,} "
        f"batches ({r['coalesced']:,} coalesced); cache hit rate {r['cache_hit_rate']:.1%}",
        f"second chance          {r['second_chance']['sent']:,} keys asked, "
        f"{r['second_chance']['found']:,} found at another PoP",
        f"miss latency           p50 {lat['p50']} ms, p99 {lat['p99']} ms "
        f"({lat['count']:,} misses)",
        f"table calls            claims {fw['claims']:,}, confirms {fw['confirms']:,} "
        f"({counts(r['confirms'])}), releases {fw['releases']:,} "
        f"({fw['release_failures']:,} failed), refreshes {fw['refreshes']:,}",
        f"records shipped        {shipped} (copies acknowledged by peer PoPs)",
        f"packets on a foreign PoP: {counts(r['foreign_packets'])}; of these, with no record "
        f"at the landing PoP: {counts(r['flap_before_ship'])}",
        f"max lag behind schedule {r['max_lag_ms']} ms",
    ]
    if r["max_lag_ms"] > BEHIND_MS:
        lines.append(
            f"warning: the run fell {r['max_lag_ms']:.0f} ms behind its schedule (a machine "
            "too busy for this load: second-chance deadlines and keep-alive rounds are "
            "missed, and connections break for it; try a lower --flow-rate or --time-scale, "
            "or a longer --second-chance-timeout)"
        )
    broken = r["broken"]
    if broken:
        shown = broken[:TEXT_BREAKAGES]
        more = f", the first {len(shown)}" if len(shown) < len(broken) else ""
        lines.append(f"broken with the table ({len(broken):,}{more}; all in the JSON):")
        lines += [_breakage(b) for b in shown]
    return "\n".join(lines)


def _breakage(b: Mapping[str, Any]) -> str:
    pinned = ", pinned" if b["pinned"] else ""
    return (
        f"  flow {b['flow']} at {b['t_s']:.3f} s: {b['proto']} {b['step']} landed "
        f"{b['landed']}, home {b['home']}: {b['reason']} ({b['detail']}), "
        f"age {b['age_s']:.1f} s{pinned}"
    )


# --------------------------------------------------------------------------- plot


def plot(report: Mapping[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    end = report["settings"]["simulated_s"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label, color in (
        ("without_table_s", "plain anycast (no table)", "tab:red"),
        ("with_table_s", "with the table (forwarders tunnel to the owner)", "tab:green"),
    ):
        ts = tl[key]
        ax.step([0, *ts, end], [0, *range(1, len(ts) + 1), len(ts)], where="post",
                label=label, color=color)  # fmt: skip
    for i, t in enumerate(tl["flaps_s"]):
        ax.axvline(t, color="grey", alpha=0.15, lw=0.8, label="route flap" if i == 0 else None)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("broken connections (cumulative)")
    ax.set_title(
        f"{report['connections']:,} connections over {len(report['settings']['pops'])} PoPs"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
