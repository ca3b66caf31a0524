"""The pure parts of ``dht bench`` (the benchmark itself never runs in the test suite),
and the scalar fast paths it relies on: they must agree with the vectorised ones."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from dht.core import wire
from dht.core.config import StoreLimits
from dht.core.errors import InvalidArgument
from dht.core.record import HybridClock, TtlPolicy
from dht.store.flows import FlowStore
from dht.tools.bench.command import WORKLOADS, growth_table, notes, settings, table
from dht.tools.bench.keys import redis_keys, synthetic_keys
from dht.tools.bench.syn import latency_rows, mismatch_note, percentile, summarize

NOW = 1_700_000_000_000


@pytest.mark.parametrize(("family", "width"), [("ipv4", 13), ("ipv6", 37)])
def test_synthetic_keys_are_valid_distinct_and_map_to_compact_redis_keys(family, width) -> None:
    raw = synthetic_keys(5000, 3, start=7, family=family)
    wire.decode_keys(raw, max_keys=5000)  # valid records
    rk = redis_keys(raw)
    assert len(set(rk)) == 5000
    assert {len(k) for k in rk} == {width}  # trailing NUL bytes kept
    assert set(redis_keys(synthetic_keys(5000, 4, start=7, family=family))) == set(rk)


def test_synthetic_ipv6_clients_each_have_their_own_64() -> None:
    # The embryonic quota is per /64 and counts confirms: one /64 for all would refuse
    # all but the first thousand records of the memory workload's fill.
    rows = np.frombuffer(synthetic_keys(5000, 1, family="ipv6"), dtype=wire.KEY_DTYPE)
    assert len({bytes(c[:8]) for c in rows["caddr"]}) == 5000


def test_settings_quick_and_overrides() -> None:
    ns = argparse.Namespace(quick=True, records=None, runs=3, seed=1)
    s = settings(ns)
    assert s.runs == 3 and s.records == 1_000_000 and max(s.growth_sizes) == 1_000_000
    assert s.syn_samples == 100 and "syn" in WORKLOADS  # the connection path runs by default
    full = settings(argparse.Namespace(quick=False, records=50_000, runs=None, seed=1))
    assert full.records == 50_000 and 5_000_000 in full.growth_sizes


def test_tables_render_every_row() -> None:
    rows = [
        {"workload": "bulk lookup", "dht": 10.0, "redis": 20.0, "unit": "keys/s",
         "ratio": 0.5, "goal": ">= 1.5", "met": False},
        {"workload": "x", "dht": 1234567, "redis": 2, "unit": "us", "ratio": 3.0,
         "goal": "-", "met": True},
    ]  # fmt: skip
    text = table(rows)
    assert "| bulk lookup" in text and "0.50x" in text and "NO" in text and "1,234,567" in text
    g = growth_table(
        [
            {"records": 1_000_000, "lookup_ns_per_key": 900.0, "bytes_per_record": 70.0},
            {"records": 5_000_000, "lookup_ns_per_key": 990.0, "bytes_per_record": 66.0},
        ]
    )
    assert "1.10x" in g


def test_percentile_and_summary_of_rounds() -> None:
    xs = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(xs, 50) == 50.5
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    # Medians of per-round percentiles: one slow round moves the pooled p99, not the median.
    rounds = [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [3.0, 4.0, 1000.0]]
    s = summarize(rounds)
    assert s.p50 == 3.0 and s.samples == 9
    assert s.p99 == pytest.approx(3.98) and s.p99_min == pytest.approx(2.98)
    assert s.p99_max == pytest.approx(980.08) and s.pooled_p99 > 900
    assert s.pooled_p50 == 3.0
    for bad in ([], [[1.0], []]):
        with pytest.raises(ValueError):
            summarize(bad)


def test_latency_rows_report_p50_and_p99_side_by_side() -> None:
    ours = summarize([[1000.0, 2000.0, 3000.0]])
    theirs = summarize([[10.0, 20.0, 30.0]])
    note = mismatch_note(2, 1350, "TUNNEL to B")
    assert note == "2 of 1,350 answers were not TUNNEL to B"
    rows = latency_rows("second chance", "sc", "setup", ours, theirs, note, wrong_answers=2)
    assert [r["workload"] for r in rows] == ["second chance p50", "second chance p99"]
    assert [r["key"] for r in rows] == ["sc_p50", "sc_p99"]
    assert rows[0]["dht"] == 2000.0 and rows[0]["redis"] == 20.0 and rows[0]["ratio"] == 100.0
    assert rows[1]["ratio"] == 100.0 and rows[1]["p99_max"] == rows[1]["dht"]
    assert all(
        r["unit"] == "us" and r["goal"] == "report" and r["wrong_answers"] == 2 for r in rows
    )
    # The note is printed once under the table; "report" is not a goal to meet.
    assert notes(rows) == ["second chance: 2 of 1,350 answers were not TUNNEL to B"]
    text = table(rows)
    assert "| report | -   |" in text and "NO" not in text


def test_check_key_agrees_with_decode_keys() -> None:
    good = synthetic_keys(1, 1)
    wire.check_key(good)
    bad = [
        (0, b"\x07", "keys[0].kind"),
        (1, b"\x63", "keys[0].protocol"),
        (18, b"\0\0", "keys[0].client_port"),
        (36, b"\0\0", "keys[0].service_port"),
        (20, b"\x20\x01", "keys[0]"),
        (38, b"\0\1", "keys[0].reserved"),
    ]
    for offset, value, field in bad:
        raw = good[:offset] + value + good[offset + len(value) :]
        with pytest.raises(InvalidArgument) as scalar:
            wire.check_key(raw)
        with pytest.raises(InvalidArgument) as vector:
            wire.decode_keys(raw, max_keys=1)
        assert str(scalar.value) == str(vector.value)
        assert str(scalar.value).startswith(field + ":")
    with pytest.raises(InvalidArgument, match="length"):
        wire.check_key(good[:39])


def test_lookup_one_agrees_with_lookup() -> None:
    store = FlowStore(TtlPolicy(), StoreLimits(), HybridClock(1000, wall_ms=lambda: NOW))
    for family in ("ipv4", "ipv6"):
        raw = synthetic_keys(3000, 1, family=family)
        keys, hashes = wire.decode_keys(raw, 10_000), wire.key_hashes(raw)
        store.confirm(keys[:2000], hashes[:2000], pop=1, server=3, ttl_ms=None, now_ms=NOW)
        store.release(keys[:100], hashes[:100], pop=1, now_ms=NOW)
        store.claim(keys[100:200], hashes[100:200], pop=2, server=0, ttl_ms=5000, now_ms=NOW)
        for now in (NOW, NOW + 6000):  # the claims' short TTL has lapsed at the second
            want = store.lookup(keys, hashes, now)
            assert set(want["status"].tolist()) == {wire.Status.OK, wire.Status.NOT_FOUND}
            for i in range(len(keys)):
                got = store.lookup_one(raw[i * 40 : i * 40 + 40], int(hashes[i]), now, 17)
                row = want[i : i + 1].copy()
                row["partition"] = 17
                assert got == row.tobytes(), (family, i)
    assert np.frombuffer(got, dtype=wire.RESULT_DTYPE)["partition"][0] == 17
