"""The lab's pure parts (dht.tools.lab): the schedule from a seed, the address plan, the
report; and the echo server's shutdown, on loopback. No namespaces, no root."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from dht.core.errors import ConfigError
from dht.tools.lab.echo import Echo
from dht.tools.lab.plan import (
    HANDSHAKE,
    SPECIAL_PORT_BASE,
    SPECIAL_SPAN_S,
    STEADY,
    SYN_RETRY,
    Schedule,
    address_plan,
    make_schedule,
)
from dht.tools.lab.report import (
    agent_summary,
    build_report,
    format_report,
    histogram_quantile,
    phase_summary,
)


def test_schedule_is_a_function_of_the_seed() -> None:
    a = make_schedule(seed=7, pops=3, connections=100, flaps=30)
    b = make_schedule(seed=7, pops=3, connections=100, flaps=30)
    c = make_schedule(seed=8, pops=3, connections=100, flaps=30)
    assert a == b
    assert a.flaps != c.flaps


def test_schedule_round_trips_through_json() -> None:
    s = make_schedule(seed=3, pops=4, connections=12, flaps=9)
    assert Schedule.from_json(s.to_json()) == s


def test_every_flap_moves_its_route_to_another_pop() -> None:
    s = make_schedule(seed=1, pops=3, connections=10, flaps=40, routes=3)
    current = list(s.initial)
    for f in s.flaps:
        assert f.pop != current[f.route]
        assert 0 <= f.pop < 3
        current[f.route] = f.pop
    times = [f.at_s for f in s.flaps]
    assert times == sorted(times)
    assert times[-1] < s.duration_s


def test_schedule_has_one_of_each_handshake_case() -> None:
    s = make_schedule(seed=2, pops=3, connections=20, flaps=6, handshake_batch=4)
    kinds = [f.kind for f in s.flaps]
    assert kinds.count(HANDSHAKE) == 1 and kinds.count(SYN_RETRY) == 1
    special = [c for c in s.conns if c.kind != STEADY]
    assert len([c for c in special if c.kind == HANDSHAKE]) == 4
    assert len([c for c in special if c.kind == SYN_RETRY]) == 2
    # Both families, fixed source ports below the ephemeral range, unique.
    assert {c.family for c in special} == {4, 6}
    ports = [c.port for c in special]
    assert len(set(ports)) == len(ports) and min(ports) >= SPECIAL_PORT_BASE
    for c in special:
        f = s.flaps[c.flap]
        assert f.kind == c.kind and f.route == c.route
        # Nothing else moves the case's route while it plays out.
        later = [g for g in s.flaps if f.at_s < g.at_s < f.at_s + SPECIAL_SPAN_S]
        assert all(g.route != f.route for g in later)


def test_steady_connections_alternate_families_over_all_routes() -> None:
    s = make_schedule(seed=1, pops=2, connections=8, flaps=0, routes=4)
    steady = [c for c in s.conns if c.kind == STEADY]
    assert [c.family for c in steady] == [4, 6] * 4
    assert {c.route for c in steady} == {0, 1, 2, 3}
    assert not s.flaps and not s.moved()


def test_moved_counts_open_connections_and_spares_the_syn_retry() -> None:
    s = make_schedule(seed=5, pops=3, connections=30, flaps=6)
    moved = s.moved()
    for c in s.conns:
        if c.kind == HANDSHAKE:
            assert c.id in moved  # the ACK goes to the new PoP
    retry = [c for c in s.conns if c.kind == SYN_RETRY]
    route_flaps_after = [
        f for f in s.flaps if f.route == retry[0].route and f.at_s > retry[0].open_s
    ]
    if len(route_flaps_after) <= 1:
        assert not any(c.id in moved for c in retry)


def test_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        make_schedule(seed=1, pops=1, connections=10, flaps=3)
    with pytest.raises(ConfigError):
        make_schedule(seed=1, pops=3, connections=0, flaps=3)
    with pytest.raises(ConfigError):
        make_schedule(seed=1, pops=3, connections=5, flaps=3, duration_s=2.0)


def test_address_plan_is_disjoint_and_per_family() -> None:
    plan = address_plan(5, 4)
    assert [p.name for p in plan.pops][:3] == ["ams", "fra", "lon"]
    v4 = [plan.router_client_v4, *plan.client_v4]
    v6 = [plan.router_client_v6, *plan.client_v6]
    for p in plan.pops:
        v4 += [p.uplink_v4, p.router_v4, p.backbone_v4]
        v6 += [p.uplink_v6, p.router_v6, p.backbone_v6]
    assert len(set(v4)) == len(v4) and len(set(v6)) == len(v6)
    assert all(ipaddress.ip_address(a).version == 4 for a in v4)
    assert all(ipaddress.ip_address(a).version == 6 for a in v6)
    backbone = ipaddress.ip_network("10.92.0.0/24")
    assert all(ipaddress.ip_address(p.backbone_v4) in backbone for p in plan.pops)


def test_route_commands_point_both_families_at_one_pop() -> None:
    plan = address_plan(3, 2)
    lines = plan.route_commands(1, 2)
    assert lines == [
        "route replace 192.0.2.1/32 via 10.91.2.2 table 201",
        "route replace 2001:db8::1/128 via fd91:2::2 table 201",
    ]


def test_address_plan_limits() -> None:
    with pytest.raises(ConfigError):
        address_plan(1, 4)
    with pytest.raises(ConfigError):
        address_plan(3, 0)


METRICS = """\
# HELP dht_forwarder_upcalls_total packets queued to user space
# TYPE dht_forwarder_upcalls_total counter
dht_forwarder_upcalls_total{reason="syn"} 10
dht_forwarder_upcalls_total{reason="unknown"} 5
# TYPE dht_forwarder_decision_seconds histogram
dht_forwarder_decision_seconds_bucket{le="0.001"} 4
dht_forwarder_decision_seconds_bucket{le="0.01"} 14
dht_forwarder_decision_seconds_bucket{le="+Inf"} 15
dht_forwarder_decision_seconds_sum 0.06
dht_forwarder_decision_seconds_count 15
"""


def test_agent_summary_reads_upcalls_and_decision_latency() -> None:
    a = agent_summary(METRICS)
    assert a["upcalls"] == 15
    lat = a["decision_latency_ms"]
    assert lat["count"] == 15 and lat["mean"] == 4.0
    assert 1.0 < lat["p50"] < 10.0
    assert lat["p99"] == 10.0  # the +Inf bucket: its lower bound
    assert a["metrics"]['dht_forwarder_upcalls_total{reason="syn"}'] == 10
    assert agent_summary("") == {"upcalls": 0, "upcall_metrics": {}, "metrics": {}}


def test_histogram_quantile() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 0.0), (2.0, 10.0)]) == pytest.approx(1.5)


def _conn(i: int, state: str, moved: bool, kind: str = STEADY, setup: float | None = 1.0):
    return {
        "id": i, "family": 4, "route": 0, "kind": kind, "state": state, "setup_ms": setup,
        "server": "ams/1", "replies": 3, "moved": moved,
        "broken_at_s": 2.0 if state == "broken" else None,
        "reason": "ConnectionResetError" if state == "broken" else "",
    }  # fmt: skip


def test_report_counts_broken_moved_and_setup() -> None:
    s = make_schedule(seed=1, pops=3, connections=4, flaps=2)
    without = {
        "conns": [
            _conn(0, "broken", True),
            _conn(1, "closed", False, setup=3.0),
            _conn(2, "broken", True, HANDSHAKE, None),
        ],
        "flaps": [{"at_s": 1.5}],
        "wall_s": 6.0,
    }
    with_ = {
        "conns": [_conn(0, "closed", True), _conn(1, "closed", False, setup=5.0)],
        "flaps": [{"at_s": 1.5}],
    }
    phases = {
        "without": phase_summary(s, without, None),
        "with": phase_summary(s, with_, {"ams": METRICS}),
    }
    report = build_report(s, phases)
    assert report["broken_without_forwarders"] == 2
    assert report["broken_with_forwarders"] == 0
    w = report["phases"]["without"]
    assert (w["moved"], w["moved_broken"], w["unmoved_broken"]) == (2, 2, 0)
    assert w["never_connected"] == 1
    assert w["setup_ms"]["count"] == 2 and w["setup_ms"]["p50"] == 2.0
    assert w["cases"][HANDSHAKE][0]["state"] == "broken"
    assert report["phases"]["with"]["agents"]["ams"]["upcalls"] == 15
    text = format_report(report)
    assert "plain anycast" in text and "with the forwarders" in text
    assert "15 upcalls" in text


# --------------------------------------------------------------------------- echo


async def test_echo_ends_open_connections_quietly_at_shutdown() -> None:
    """Stopping the server with connections still open ends their handlers as an end of
    stream would: none is cancelled, so asyncio logs no CancelledError traceback."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    echo = Echo("ams")
    server = await asyncio.start_server(echo.handle, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for i, (reader, writer) in enumerate(clients):
        writer.write(f"{i}\n".encode())
        assert await reader.readline() == f"ams/{i + 1} {i}\n".encode()
    assert echo.open_connections == 3
    handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    server.close()
    await echo.close()
    assert echo.open_connections == 0
    assert handlers and all(t.done() and not t.cancelled() for t in handlers)
    for reader, writer in clients:
        assert await reader.read() == b""  # the server closed its end
        writer.close()
    await server.wait_closed()
    await asyncio.sleep(0)
    assert errors == []
