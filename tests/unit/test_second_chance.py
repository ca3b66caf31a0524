"""The second chance's merging and checking of other PoPs' answers (pure logic over a fake
transport; the real calls are in tests/integration/test_connections.py)
(docs/protocol.md#second-chance)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry

from dht.core.ingress import Bounds
from dht.core.record import Record, State, Status, hlc_pack
from dht.core.wire import RESULT_DTYPE, new_results, put_result
from dht.pops.second import SecondChance
from dht.pops.transport import PopUnreachable
from dht.tools.bench import synthetic_keys

NOW = 1_800_000_000_000
KEYS = synthetic_keys(3, seed=1)
BOUNDS = Bounds(pops=frozenset({1, 2, 3, 4}), max_clock_offset_ms=500, longest_ms=4_000_000)


@dataclass
class Link:
    name: str
    address: str

    def rotation(self) -> list[str]:
        return [self.address]


class Transport:
    """Answers per address: packed results, an exception, or None (never answers)."""

    def __init__(self, answers: dict[str, bytes | Exception | None]) -> None:
        self.answers = answers

    async def lookup(self, address: str, raw: bytes) -> bytes:
        a = self.answers[address]
        if a is None:
            await asyncio.Event().wait()
        if isinstance(a, Exception):
            raise a
        assert isinstance(a, bytes)
        return a


def rec(owner: int, state: State, birth_ms: int, expiry_ms: int = NOW + 60_000) -> Record:
    return Record(owner, 0, state, hlc_pack(birth_ms, 0), owner, 1, expiry_ms)


def answer(*recs: Record | None) -> bytes:
    out = new_results(len(recs))
    for i, r in enumerate(recs):
        put_result(out, i, Status.NOT_FOUND if r is None else Status.OK, r)
    return out.tobytes()


def ask(
    answers: dict[str, bytes | Exception | None],
) -> tuple[list[Record | None], CollectorRegistry]:
    reg = CollectorRegistry()
    sc = SecondChance(Transport(answers), BOUNDS, 0.05, reg)  # type: ignore[arg-type]
    links = [Link(name, name) for name in answers]
    found = asyncio.run(sc.ask(links, KEYS, NOW))  # type: ignore[arg-type]
    return found, reg


def count(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def test_answers_of_several_pops_merge_and_a_completed_copy_wins() -> None:
    abandoned = rec(2, State.EMBRYONIC, NOW - 5_000)
    completed = rec(3, State.ESTABLISHED, NOW - 4_000)
    expired = rec(2, State.ESTABLISHED, NOW - 9_000, expiry_ms=NOW - 1)
    found, sc = ask({
        "fra": answer(abandoned, None, expired),
        "lon": answer(completed, rec(3, State.EMBRYONIC, NOW - 1_000), None),
    })  # fmt: skip
    assert found == [completed, rec(3, State.EMBRYONIC, NOW - 1_000), None]
    assert count(sc, "dht_second_chance_keys_total", {"result": "found"}) == 2
    assert count(sc, "dht_second_chance_keys_total", {"result": "not_found"}) == 1


def test_bad_answers_and_silent_pops_count_as_not_knowing() -> None:
    forged = Record(99, 0, State.ESTABLISHED, hlc_pack(NOW, 0), 99, 1, NOW + 60_000)
    ahead = rec(2, State.ESTABLISHED, NOW + 3_600_000)  # born an hour from now
    short = np.zeros(1, dtype=RESULT_DTYPE).tobytes()  # one result for three keys
    found, sc = ask({
        "fra": answer(forged, ahead, None),
        "lon": short,
        "nyc": PopUnreachable("refused"),
        "sin": None,  # never answers: the deadline
    })  # fmt: skip
    assert found == [None, None, None]
    failures = "dht_second_chance_peer_failures_total"
    assert count(sc, failures, {"peer_pop": "fra", "reason": "bad_record"}) == 2
    assert count(sc, failures, {"peer_pop": "lon", "reason": "bad_answer"}) == 1
    assert count(sc, failures, {"peer_pop": "nyc", "reason": "unreachable"}) == 1
    assert count(sc, failures, {"peer_pop": "sin", "reason": "deadline"}) == 1
