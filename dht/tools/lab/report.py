"""What a ``dht lab`` run reports (docs/lab.md#the-report): the numbers of each phase
(with and without the forwarders) as a dict written as JSON, the text printed at the end,
the plot, and the agents' ``/metrics`` read into upcalls and decision latency. Pure: the
phases' results in, the report out."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dht.tools.lab.plan import HANDSHAKE, STEADY, SYN_RETRY, Schedule

# Broken connections listed in the text report (the JSON has them all).
TEXT_BROKEN = 10
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]+)"')


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    a = np.array(values, dtype=float)
    if not a.size:
        return {"p50": None, "p99": None, "count": 0}
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "count": int(a.size),
    }


def parse_metrics(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text -> {metric name: [(labels, value), ...]} (comments skipped)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((m.group(2) or "", value))
    return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram [(upper bound, count), ...], linear
    inside a bucket (as Prometheus' histogram_quantile)."""
    b = sorted(buckets)
    if not b or b[-1][1] <= 0:
        return None
    rank = q * b[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in b:
        if count >= rank:
            if math.isinf(upper):
                return lower
            span = count - below
            return lower + (upper - lower) * ((rank - below) / span if span else 1.0)
        lower, below = upper, count
    return lower


def agent_summary(text: str) -> dict[str, Any]:
    """Upcalls and decision latency from one agent's ``/metrics``: counters whose name
    holds ``upcall`` (summed, and by name), and the histogram whose name holds
    ``decision`` and ``seconds`` (p50, p99 and mean in ms)."""
    m = parse_metrics(text)
    upcalls = {
        name: sum(v for _, v in samples)
        for name, samples in m.items()
        if "upcall" in name and not name.endswith(("_created", "_bucket", "_sum", "_count"))
    }
    out: dict[str, Any] = {"upcalls": int(sum(upcalls.values())), "upcall_metrics": upcalls}
    # Every other sample too (verdicts, pins, map size...), for the JSON: not histograms.
    out["metrics"] = {
        name + labels: v
        for name, samples in m.items()
        if not name.endswith(("_bucket", "_created")) and not name.startswith("python_")
        for labels, v in samples
    }
    for name in m:
        if name.endswith("_bucket") and "decision" in name and "seconds" in name:
            base = name[: -len("_bucket")]
            merged: dict[float, float] = {}
            for labels, v in m[name]:
                le = _LE.search(labels)
                if le:
                    merged[float(le.group(1))] = merged.get(float(le.group(1)), 0.0) + v
            buckets = list(merged.items())
            total = sum(v for _, v in m.get(f"{base}_sum", []))
            count = sum(v for _, v in m.get(f"{base}_count", []))
            p50 = histogram_quantile(0.5, buckets)
            p99 = histogram_quantile(0.99, buckets)
            out["decision_latency_ms"] = {
                "metric": base,
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
                "mean": round(total / count * 1000, 3) if count else None,
                "count": int(count),
            }
            break
    return out


def phase_summary(
    s: Schedule, result: Mapping[str, Any], agents: Mapping[str, str] | None
) -> dict[str, Any]:
    """One phase: the client's result (and the agents' /metrics text per PoP, if on)."""
    conns = list(result["conns"])
    broken = [c for c in conns if c["state"] == "broken"]
    moved = [c for c in conns if c["moved"]]
    steady = [c["setup_ms"] for c in conns if c["kind"] == STEADY and c["setup_ms"] is not None]
    cases = {
        kind: [
            {k: c[k] for k in ("id", "family", "state", "setup_ms", "server", "moved", "reason")}
            for c in conns
            if c["kind"] == kind
        ]
        for kind in (HANDSHAKE, SYN_RETRY)
    }
    out: dict[str, Any] = {
        "connections": len(conns),
        "broken": len(broken),
        "moved": len(moved),
        "moved_broken": sum(1 for c in moved if c["state"] == "broken"),
        "unmoved_broken": sum(1 for c in broken if not c["moved"]),
        "never_connected": sum(1 for c in conns if c["setup_ms"] is None),
        "setup_ms": percentiles(steady),
        "replies": sum(int(c["replies"]) for c in conns),
        "cases": cases,
        "broken_connections": [
            {k: c[k] for k in ("id", "family", "route", "kind", "moved", "broken_at_s", "reason")}
            for c in sorted(broken, key=lambda c: (c["broken_at_s"] or 0, c["id"]))
        ],
        "route_changes": list(result["flaps"]),
        "errors": list(result.get("errors", [])),
        "wall_s": result.get("wall_s"),
    }
    if agents is not None:
        out["agents"] = {pop: agent_summary(text) for pop, text in agents.items()}
    return out


def build_report(s: Schedule, phases: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """``phases``: ``{"without": summary, "with": summary}`` (either may be missing)."""
    report: dict[str, Any] = {
        "settings": {
            "seed": s.seed,
            "pops": s.pops,
            "routes": s.routes,
            "connections": len(s.conns),
            "route_changes": len(s.flaps),
            "duration_s": s.duration_s,
            "send_interval_s": s.send_interval_s,
        },
        "phases": dict(phases),
    }
    for name in ("with", "without"):
        if name in phases:
            report[f"broken_{name}_forwarders"] = phases[name]["broken"]
    return report


def _ms(p: Mapping[str, Any]) -> str:
    if not p.get("count"):
        return "-"
    return f"{p['p50']:.2f} / {p['p99']:.2f} ms"


def format_report(report: Mapping[str, Any]) -> str:
    st = report["settings"]
    lines = [
        f"dht lab: {st['connections']} connections over {st['pops']} PoPs, "
        f"{st['route_changes']} route changes on {st['routes']} routes, seed {st['seed']}, "
        f"{st['duration_s']:g} s a run",
    ]
    titles = {"without": "plain anycast (no forwarders)", "with": "with the forwarders"}
    for name in ("without", "with"):
        ph = report["phases"].get(name)
        if ph is None:
            continue
        lines += [
            "",
            f"{titles[name]}:",
            f"  broken        {ph['broken']} of {ph['connections']} "
            f"(moved by a route change: {ph['moved']}, of them broken: {ph['moved_broken']}; "
            f"broken without a move: {ph['unmoved_broken']})",
            f"  set-up time   {_ms(ph['setup_ms'])} (median / p99, "
            f"{ph['setup_ms']['count']} steady connections)",
            f"  replies       {ph['replies']:,}",
        ]
        for err in ph.get("errors", []):
            lines.append(f"  lab error     {err}")
        for kind, label in ((HANDSHAKE, "mid-handshake"), (SYN_RETRY, "SYN sent again")):
            cs = ph["cases"][kind]
            if cs:
                ok = sum(1 for c in cs if c["state"] != "broken")
                setup = ", ".join(
                    "-" if c["setup_ms"] is None else f"{c['setup_ms']:.0f}" for c in cs
                )
                lines.append(
                    f"  {label:13} {ok} of {len(cs)} survived (set-up ms: {setup}; servers: "
                    f"{', '.join(c['server'] or '-' for c in cs)})"
                )
        for pop, a in (ph.get("agents") or {}).items():
            lat = a.get("decision_latency_ms")
            lat_s = (
                f", decision latency p50 {lat['p50']} ms, p99 {lat['p99']} ms ({lat['count']})"
                if lat and lat["count"]
                else ""
            )
            lines.append(f"  agent {pop:7} {a['upcalls']:,} upcalls{lat_s}")
        for c in ph["broken_connections"][:TEXT_BROKEN]:
            lines.append(
                f"    #{c['id']} (IPv{c['family']}, route {c['route']}, {c['kind']}) "
                f"at {c['broken_at_s']} s: {c['reason']}"
            )
        if len(ph["broken_connections"]) > TEXT_BROKEN:
            lines.append(f"    ... {len(ph['broken_connections']) - TEXT_BROKEN} more in --json")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = report["settings"]["duration_s"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {"without": "tab:red", "with": "tab:green"}
    labels = {"without": "plain anycast (no forwarders)", "with": "with the forwarders"}
    flaps: list[float] = []
    for name, ph in report["phases"].items():
        ts = sorted(c["broken_at_s"] for c in ph["broken_connections"])
        ax.step([0, *ts, end], [0, *range(1, len(ts) + 1), len(ts)], where="post",
                label=labels[name], color=colors[name])  # fmt: skip
        flaps = [f["at_s"] for f in ph["route_changes"]]
    for i, t in enumerate(flaps):
        ax.axvline(t, color="grey", alpha=0.2, lw=0.8, label="route change" if i == 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("broken connections (cumulative)")
    ax.set_title(
        f"{report['settings']['connections']} real TCP connections, "
        f"{report['settings']['pops']} PoPs"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
