"""The simulator on small scripted scenarios against three in-process PoPs (docs/simulator.md):
connections break under plain anycast, none break with the table once records had time
to be shipped, and a flap that lands before its record was shipped is counted and
explained (saved by the client's affinity, or broken with no owner known)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dht.edge.server import NodeServer
from dht.tools.simulate import Endpoint, SimSettings, Simulation, format_report
from dht.tools.traffic import Traffic

from .conftest import MakePops

SCALE = 10.0  # 30 simulated seconds in 3 real ones
MOVED = 3


def scenario(clients: range) -> Traffic:
    """Six clients (two per PoP), one long connection each from 0.5 s to 25 s with a
    packet every second; at 12 s the first three clients' routes move to the next PoP
    (about 1.1 real seconds after the connections were confirmed)."""
    homes = [i % 3 for i in range(clients.stop)]
    flows = [(c, 0.5, 25.0, [1.0 + i for i in range(24)]) for c in clients]
    flaps = [(12.0, c, (homes[c] + 1) % 3) for c in list(clients)[:MOVED]]
    return Traffic.build(3, homes, flows, flaps, duration_s=30.0)


def endpoints(pops: dict[str, list[NodeServer]]) -> list[Endpoint]:
    return [Endpoint(pop, s.grpc_address, s.admin_address) for pop, ss in pops.items() for s in ss]


async def simulate(pops: dict[str, list[NodeServer]], tr: Traffic, **kw: Any) -> dict[str, Any]:
    settings = replace(SimSettings(duration_s=3.0, time_scale=SCALE), **kw)
    report = await Simulation(settings, endpoints(pops), tr).run(progress=False)
    print(format_report(report))
    return report


async def test_flaps_break_plain_anycast_but_not_the_table(make_pops: MakePops) -> None:
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=0)
    r = await simulate(pops, scenario(range(6)), replicate_after_s=0)
    assert r["connections"] == 6
    assert r["broken_without_table"] == MOVED
    assert r["broken_with_table"] == 0
    # Every packet of a moved client after the flap (14 each, with the FIN) was
    # tunnelled home because the landing PoP had the record.
    assert r["tunnelled_packets"] == MOVED * 14
    assert r["foreign_packets"] == {"record": MOVED * 14}
    assert r["flap_before_ship"] == {}
    assert r["shipped_records"]["established"] >= 6 * 2  # every flow, to both other PoPs
    assert r["lookups_sent"] > 0
    assert 0 < r["cache_hit_rate"] < 1


async def test_a_flap_before_the_record_is_shipped_is_counted_and_explained(
    make_pops: MakePops,
) -> None:
    # Records are shipped only once 60 real seconds old: never during the run. Affinity
    # records ship at once.
    pops = await make_pops(pops=3, nodes=1, admin_port=0, replicate_after_s=60)
    r = await simulate(pops, scenario(range(6)), replicate_after_s=600)
    assert r["broken_without_table"] == MOVED
    assert r["broken_with_table"] == 0
    assert r["shipped_records"]["established"] == 0
    assert r["shipped_records"]["affinity"] >= 6
    # Saved by the affinity fallback: the landing PoP had no record, the client's
    # preferred PoP was its connection's.
    assert r["foreign_packets"] == {"affinity": MOVED * 14}
    assert r["flap_before_ship"] == {"saved-by-affinity": MOVED * 14}

    # The same with forwarders that ignore affinity (other clients, fresh keys): the
    # first packet after the flap breaks each moved connection, explained.
    r = await simulate(pops, scenario(range(6, 12)), replicate_after_s=600, use_affinity=False)
    assert r["broken_without_table"] == MOVED
    assert r["broken_with_table"] == MOVED
    assert r["broken_reasons"] == {"no-owner-known": MOVED}
    assert r["flap_before_ship"] == {"no-owner-known": MOVED}
    assert {b["t_s"] for b in r["broken_examples"]} == {12.0}
    assert all(b["age_s"] < 600 for b in r["broken_examples"])
