"""Chaos runs' pure parts: the history checker (each rule is caught, histories the model
allows pass) and the nemesis schedule (dht.tools.chaos)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dht.core.errors import ConfigError
from dht.core.record import Status
from dht.tools.chaos.history import History, Operation, check, outcome_of
from dht.tools.chaos.run import check_args

K = "tcp/198.51.100.7:1000/192.0.2.1:443"
X = {"owner_pop": 1, "birth_hlc": 100, "birth_pop": 1, "generation": 1}
Y = {"owner_pop": 1, "birth_hlc": 200, "birth_pop": 1, "generation": 1}


def op(kind: str, t0: float, t1: float, status: str, shows: dict[str, int] | None = None,
       pop: int = 1, outcome: str | None = None, ttl: float = 600.0) -> Operation:  # fmt: skip
    if outcome is None:
        outcome = outcome_of(kind, Status[status])
    return Operation(
        key=K,
        kind=kind,
        client="c1",
        pop=0 if kind == "lookup" else pop,
        invoke=t0,
        complete=t1,
        outcome=outcome,
        status=status,
        ttl_s=ttl if kind in ("claim", "confirm") else 0.0,
        **(shows or {}),
    )


def kinds(*ops: Operation) -> list[str]:
    return [v.kind for v in check(ops)]


def test_a_history_the_model_allows_passes() -> None:
    assert (
        kinds(
            op("lookup", 0, 1, "NOT_FOUND"),
            op("claim", 1, 2, "CREATED", X),
            op("lookup", 1.5, 2.5, "NOT_FOUND"),  # concurrent with the claim: either answer
            op("lookup", 3, 4, "OK", X),
            op("confirm", 5, 6, "OK", X),
            op("claim", 6, 7, "ALREADY_OWNED", X),
            op("lookup", 8, 9, "OK", X),
        )
        == []
    )


def test_an_acknowledged_claim_must_stay_visible() -> None:
    assert kinds(op("claim", 0, 1, "CREATED", X), op("lookup", 2, 3, "NOT_FOUND")) == ["lost"]
    other = {**X, "owner_pop": 2}
    got = kinds(
        op("claim", 0, 1, "CREATED", X),
        op("claim", 0, 1, "UNAVAILABLE", pop=2),
        op("lookup", 2, 3, "OK", other),
    )
    assert "owner" in got and "changed" in got
    assert set(kinds(op("claim", 0, 1, "CREATED", X), op("lookup", 2, 3, "OK", Y))) == {
        "replaced",
        "changed",
    }


def test_a_release_or_expiry_ends_the_promise() -> None:
    assert (
        kinds(
            op("claim", 0, 1, "CREATED", X),
            op("release", 2, 3, "OK"),
            op("lookup", 4, 5, "NOT_FOUND"),
        )
        == []
    )
    # A release whose outcome is unknown may take effect at any later time.
    assert (
        kinds(
            op("claim", 0, 1, "CREATED", X),
            op("release", 2, 3, "UNAVAILABLE"),
            op("lookup", 40, 41, "NOT_FOUND"),
        )
        == []
    )
    # A release refused changes nothing; a release after the look-up does not excuse it.
    assert kinds(
        op("claim", 0, 1, "CREATED", X),
        op("lookup", 4, 5, "NOT_FOUND"),
        op("release", 6, 7, "OK"),
    ) == ["lost"]
    assert kinds(op("claim", 0, 1, "CREATED", X, ttl=5), op("lookup", 10, 11, "NOT_FOUND")) == []


def test_two_acknowledged_claims_and_a_changed_claim_are_caught() -> None:
    assert "two_claims" in kinds(op("claim", 0, 1, "CREATED", X), op("claim", 2, 3, "CREATED", Y))
    # An unacknowledged claim shown, then another: a read went back on what it showed.
    assert kinds(
        op("claim", 0, 1, "UNAVAILABLE"),
        op("lookup", 2, 3, "OK", X),
        op("lookup", 4, 5, "OK", Y),
    ) == ["changed"]


def test_a_look_up_beside_a_claim_may_show_its_first_attempt() -> None:
    # The claim call [0, 3] was retried at another coordinator and acknowledged with Y; a
    # look-up beside it showed the first attempt's X (same owner): not a violation.
    assert (
        kinds(
            op("lookup", 0.5, 1, "OK", X),
            op("claim", 0, 3, "CREATED", Y),
            op("lookup", 4, 5, "OK", Y),
        )
        == []
    )
    # Another owner, or a look-up after the call ended: still caught.
    other = {**X, "owner_pop": 2}
    assert "changed" in kinds(
        op("lookup", 0.5, 1, "OK", other),
        op("claim", 0, 3, "CREATED", Y),
        op("claim", 0, 0.2, "UNAVAILABLE", pop=2),
        op("lookup", 4, 5, "OK", Y),
    )
    assert "changed" in kinds(
        op("claim", 0, 3, "CREATED", Y),
        op("lookup", 4, 5, "OK", X),
        op("lookup", 6, 7, "OK", Y),
    )


def test_a_value_nobody_wrote_is_caught() -> None:
    assert kinds(op("lookup", 0, 1, "OK", {**X, "owner_pop": 3})) == ["phantom"]
    # A claim still in flight when the look-up completed may be what it showed.
    assert kinds(op("claim", 0.5, 3, "UNAVAILABLE"), op("lookup", 0, 1, "OK", X)) == []


def test_outcomes_and_the_file_round_trip(tmp_path: Path) -> None:
    assert outcome_of("claim", Status.UNAVAILABLE) == "unknown"
    assert outcome_of("lookup", Status.UNAVAILABLE) == "fail"
    assert outcome_of("claim", Status.REFUSED_QUOTA) == "fail"
    assert outcome_of("claim", Status.OWNED_ELSEWHERE) == "ok"
    h = History([op("claim", 0, 1, "CREATED", X), op("lookup", 2, 3, "NOT_FOUND")])
    h.write(tmp_path / "h.jsonl")
    again = History.read(tmp_path / "h.jsonl")
    assert again.ops == h.ops
    (v,) = check(again)
    assert v.kind == "lost" and "claim by c1" in str(v)


def test_the_nemesis_schedule_comes_from_the_seed() -> None:
    import pytest

    from dht.tools.chaos.nemesis import plan_faults

    a = plan_faults(7, 120.0, 4, ("cpu", "pause", "kill", "leave"))
    assert a == plan_faults(7, 120.0, 4, ("cpu", "pause", "kill", "leave"))
    assert a != plan_faults(8, 120.0, 4, ("cpu", "pause", "kill", "leave"))
    assert {f.kind for f in a} == {"cpu", "pause", "kill", "leave"}
    assert all(f.at + f.duration <= 115.0 for f in a)  # the last 5 s heal
    on_nodes = [f for f in a if f.kind != "cpu"]
    assert all(0 <= f.node < 4 for f in on_nodes)
    # One node fault at a time, with room to settle between them.
    assert all(b.at >= x.at + x.duration + 6.0 for x, b in itertools.pairwise(on_nodes))
    assert {f.kind for f in plan_faults(7, 60.0, 3, ("pause",))} == {"pause"}
    with pytest.raises(ValueError, match="unknown fault kinds"):
        plan_faults(7, 60.0, 3, ("flood",))


def test_link_faults_join_two_nodes_and_clock_offsets_stay_within_the_bound() -> None:
    from dht.tools.chaos.nemesis import SLOW_S, plan_clocks, plan_faults

    links = plan_faults(5, 600.0, 4, ("slow", "cut"))
    assert {f.kind for f in links} == {"slow", "cut"}
    assert all(0 <= f.node < 4 and 0 <= f.peer < 4 and f.node != f.peer for f in links)
    assert all(SLOW_S[0] <= f.delay_s <= SLOW_S[1] for f in links if f.kind == "slow")
    assert not plan_faults(5, 600.0, 1, ("slow", "cut"))  # one node has no links
    clocks = plan_clocks(5, 50, 500)
    assert clocks == plan_clocks(5, 50, 500) and len(set(clocks)) > 1
    assert max(clocks) - min(clocks) < 500  # any two nodes within max_clock_offset_ms


def test_bad_arguments_and_files_are_usage_errors(tmp_path: Path) -> None:
    """They used to end in tracebacks (a division by zero for --claims-per-s 0)."""
    from dht.tools.cli import build_parser

    parser = build_parser()
    for bad in (["--claims-per-s", "0"], ["--duration", "-1"], ["--lookups-per-s", "0"]):
        args = parser.parse_args(["chaos", *bad])
        with pytest.raises(ConfigError, match=bad[0]):
            check_args(args)
    check_args(parser.parse_args(["chaos"]))
    broken = tmp_path / "history.jsonl"
    broken.write_text('{"key": "k"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"history\.jsonl:1"):
        History.read(broken)
