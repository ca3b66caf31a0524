"""Fuzz a local node with N generated cases and print the counts (docs/operations.md#fuzzing).

    python scripts/fuzz.py --cases 100000 [--seed N]

Starts two nodes of the test profile on loopback (one for gossip), sends N cases drawn from
the same hypothesis strategies as tests/integration/test_fuzz.py (every FlowTable,
NodeInternal and PopLink method, each to the plane that serves it: FlowTable on the public
port, the others on the peer port), checks the node after each (dht/tools/fuzz.py) and
prints: cases, crashes, INTERNAL/UNKNOWN answers, other bad statuses, dead loops, state
changes by refused calls. Exits 1 if any of those is not zero.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import HypothesisDeprecationWarning

from dht.tools.fuzz import GOSSIP, Counts, FuzzTarget, any_case, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", type=int, default=5000, help="print counts every N cases")
    args = ap.parse_args()
    # The node logs refused input at WARNING; the counts are the report.
    logging.basicConfig(level=logging.ERROR)
    # The node's own loops use `random` in their thread while a case runs; harmless here.
    warnings.simplefilter("ignore", HypothesisDeprecationWarning)
    counts = Counts()
    # Gossip methods get a node of their own (see dht/tools/fuzz.py).
    strict, gossip = FuzzTarget(counts=counts), FuzzTarget(strict=False, counts=counts)
    started = time.monotonic()

    @seed(args.seed)
    @settings(
        max_examples=args.cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(any_case())
    def run(case: tuple[str, Any]) -> None:
        method, request = case
        (gossip if method in GOSSIP else strict).case(method, request)
        if args.progress and counts.cases % args.progress == 0:
            print(f"... {counts.cases} cases, {counts.failures()} failures", flush=True)

    try:
        run()
    finally:
        strict.close()
        gossip.close()
    for line in report(counts):
        print(line)
    print(f"seed {args.seed}, {time.monotonic() - started:.0f} s")
    return 1 if counts.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
