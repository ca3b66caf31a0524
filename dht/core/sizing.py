"""Replication factor and quorums for a PoP smaller than the configured replication factor
(docs/protocol.md#small-pops). Pure.

A PoP of 3+ nodes keeps the configured replication factor RF and write quorum W
(default a majority), R = RF - W + 1. A PoP with fewer nodes than RF would otherwise
run RF = nodes with W = a majority of *those*: two nodes, W = 2, and the first failure
stops every write (and a survivor can never declare the other dead: it is no majority).
So a small PoP keeps the configured *tolerance* instead: the configured RF tolerates
RF - W failed replicas (1 for RF 3), and the shrunk PoP tolerates as many, with
W = R = max(1, nodes - tolerance).

The price, documented in docs/protocol.md#small-pops: with two nodes W = R = 1, so R + W = RF. An
acknowledged write is on one copy until the other takes it (milliseconds later, or as a
hint when it comes back); a node that crashes in that window takes the write with it,
and the two nodes that each believe the other dead both answer alone (the merge rule
settles them afterwards: earliest claim wins). An established flow is also on the other
PoPs. An explicitly configured ``write_quorum`` is left alone.

The PoP's size is the most members this node has seen in its table (a high-water mark),
so a PoP of three that loses a node keeps its majority quorums.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quorums:
    replication_factor: int
    write_quorum: int
    read_quorum: int
    shrunk: bool


def majority(n: int) -> int:
    return n // 2 + 1


def fit(
    configured_rf: int, configured_w: int | None, pop_size: int, members: int
) -> Quorums | None:
    """The quorums for a table of ``members`` in a PoP of ``pop_size`` nodes, or None to
    keep the replication layer's own (RF = min(configured, members), W = configured or a
    majority, R = RF - W + 1)."""
    if configured_w is not None or pop_size >= configured_rf:
        return None
    rf = max(1, min(configured_rf, members))
    tolerance = configured_rf - majority(configured_rf)
    w = max(1, rf - tolerance)
    return Quorums(rf, w, w, shrunk=True)
