"""Property-based fuzzing of every FlowTable, NodeInternal and PopLink method against a
real node over gRPC on loopback (docs/operations.md#fuzzing). A fixed, derandomized
count per method here;
``python scripts/fuzz.py --cases 100000`` runs many more (docs/operations.md).

Each case is checked by :meth:`dht.tools.fuzz.FuzzTarget.case`: an allowed status (never
INTERNAL or UNKNOWN), the node still claims and looks up a fresh key, no loop failed, and
a refused call changed nothing. Findings of the fuzzer are kept below as explicit cases.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import HypothesisDeprecationWarning

from dht._proto.dht.v1 import dht_pb2 as pb
from dht.tools.fuzz import GOSSIP, METHODS, FuzzTarget, request_for

EXAMPLES_PER_METHOD = 30


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[bool, FuzzTarget]]:
    """Two nodes for the module: one for gossip methods (the fuzz nodes run without TLS,
    so nothing authenticates a fuzzed Ping, which may add members that exist nowhere), one
    for the rest."""
    made = {True: FuzzTarget(), False: FuzzTarget(strict=False)}
    yield made
    for t in made.values():
        t.close()


def target_for(targets: dict[bool, FuzzTarget], method: str) -> FuzzTarget:
    return targets[method not in GOSSIP]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzz_method(targets: dict[bool, FuzzTarget], method: str) -> None:
    target = target_for(targets, method)

    @settings(
        max_examples=EXAMPLES_PER_METHOD,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request_for(method))
    def run(request: Any) -> None:
        assert target.case(method, request) == []

    with warnings.catch_warnings():
        # The node's loops use `random` in their own thread while a case runs.
        warnings.simplefilter("ignore", HypothesisDeprecationWarning)
        run()


MAX_U64 = 2**64 - 1

# (method, request) the fuzzer found failing, kept as explicit cases.
FOUND: list[tuple[str, Any]] = [
    # A rumour about the node itself at incarnation 2^64 - 1: its refutation (+1) did not
    # fit the uint64 field, the Ping answered UNKNOWN and the resync loop failed.
    (
        "Ping",
        pb.PingRequest(
            from_node="x",
            members=[
                pb.MemberState(
                    node_id="fuzz-1",
                    address="127.0.0.1:1",
                    incarnation=MAX_U64,
                    status=pb.MEMBER_STATUS_SUSPECT,
                )
            ],
        ),
    ),
    (
        "Ping",
        pb.PingRequest(
            from_node="x",
            members=[
                pb.MemberState(
                    node_id="fuzz-1",
                    address="127.0.0.1:1",
                    incarnation=MAX_U64,
                    status=pb.MEMBER_STATUS_LEFT,
                )
            ],
        ),
    ),
    # Bytes that are no message (answered UNKNOWN with a traceback before).
    ("Claim", b"\x0a\x05ab"),
    ("Replicate", b"\xff"),
    ("Ship", [b"\x0a\x05ab"]),
]


@pytest.mark.parametrize(("method", "request_"), FOUND, ids=[f[0] for f in FOUND])
def test_found_by_the_fuzzer(targets: dict[bool, FuzzTarget], method: str, request_: Any) -> None:
    target = target_for(targets, method)
    assert target.case(method, request_) == []
    node = target.server.node
    assert node.live()
    # The rumour was dropped: the node's own incarnation is where it was.
    me = next(m for m in node.membership.view() if m.node_id == node.config.node_id)
    assert me.incarnation < 2**63
