"""The cost of mutual TLS (``dht bench --only tls``): the same 1-node PoP twice, one in
plaintext and one with mutual TLS (docs/security.md), measured side by side, interleaved
(plaintext round, TLS round, ...), on 1000-key batch lookups and on claims of fresh keys.

Each row's ``dht`` is the TLS rate, ``redis`` (the table's second column) the plaintext rate
and ``ratio`` TLS / plaintext; ``tls`` and ``plaintext`` carry the same numbers by name.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from dht.client import Client
from dht.core.identity import Role
from dht.core.record import Status
from dht.core.wire import KEY_SIZE
from dht.tools.bench.keys import batches, synthetic_keys
from dht.tools.bench.workloads import (
    CLAIM_TTL_S,
    NODE_ARGS,
    Settings,
    _median,
    _timed,
    _versus,
    dht_fill,
    workers,
)
from dht.tools.certs import client_tls
from dht.tools.cluster import LocalCluster, plan

# Kept small so the workload stays cheap: the TLS cost is per byte and per call, not per record.
MAX_RECORDS = 200_000


def _row(name: str, key: str, setup: str, plain: list[float], tls: list[float]) -> dict[str, Any]:
    p, t = _median(plain), _median(tls)
    return _versus(
        name, setup, "keys/s", round(t), round(p), t / p, "-", True,
        key=key, tls=round(t), plaintext=round(p),
        tls_min=round(min(tls)), tls_max=round(max(tls)),
        plaintext_min=round(min(plain)), plaintext_max=round(max(plain)),
    )  # fmt: skip


async def tls_cost(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Bulk lookups and claims, plaintext vs mutual TLS, on two 1-node PoPs up at once."""
    records = min(s.records, MAX_RECORDS)
    raw = synthetic_keys(records, s.seed)
    parts = batches(raw, s.batch)
    per_round = max(1, min(len(parts), s.round_keys // s.batch))
    args = [*NODE_ARGS, "--max-records", str(2 * records + 2 * (s.runs + 1) * s.claim_keys)]
    with tempfile.TemporaryDirectory(prefix="dht-bench-tls-") as tls_dir:
        async with contextlib.AsyncExitStack() as stack:
            plain_c = await stack.enter_async_context(LocalCluster(plan(1, 1), args))
            tls_c = await stack.enter_async_context(LocalCluster(plan(1, 1), args, tls_dir=tls_dir))
            creds = client_tls(tls_dir, Role.OPERATOR)
            if creds is None:
                raise RuntimeError(f"no operator certificate in {tls_dir}")
            clients = {
                "plaintext": await stack.enter_async_context(
                    Client([plain_c.nodes[0].spec.grpc], tls=None)
                ),
                "tls": await stack.enter_async_context(
                    Client([tls_c.nodes[0].spec.grpc], tls=creds)
                ),
            }
            log(f"tls: filling {records:,} records on each node (plaintext, mutual TLS)")
            for c in clients.values():
                await dht_fill(c, raw, s.batch, s.in_flight)

            async def lookups(client: Client, idx: list[int]) -> None:
                async def one(i: int) -> None:
                    res = await client.flow_packed("Lookup", parts[i])
                    if not np.all(res["status"] == Status.OK):
                        raise RuntimeError("lookup missed a stored key")

                await workers(idx, s.in_flight, one)

            async def claims(client: Client, fresh: bytes) -> None:
                async def one(b: bytes) -> None:
                    res = await client.flow_packed("Claim", b, pop="ams", ttl_s=CLAIM_TTL_S)
                    if not np.all(res["status"] == Status.CREATED):
                        raise RuntimeError(f"claims not created: {np.bincount(res['status'])}")

                await workers(batches(fresh, s.batch), s.in_flight, one)

            log(f"tls: {s.runs} interleaved rounds of {per_round * s.batch:,} lookups and "
                f"{s.claim_keys:,} claims per side")  # fmt: skip
            rng = random.Random(s.seed)
            look: dict[str, list[float]] = {k: [] for k in clients}
            claim: dict[str, list[float]] = {k: [] for k in clients}
            n_claim = s.claim_keys
            for rnd in range(s.runs + 1):  # round 0 warms up
                idx = rng.sample(range(len(parts)), per_round)
                n = sum(len(parts[i]) // KEY_SIZE for i in idx)
                fresh = synthetic_keys(n_claim, s.seed + rnd, start=10_000_000 + rnd * n_claim)
                for side, client in clients.items():  # plaintext first, then TLS
                    a = n / await _timed(lookups(client, idx))
                    b = n_claim / await _timed(claims(client, fresh))
                    if rnd:
                        look[side].append(a)
                        claim[side].append(b)
    setup = f"1 node, {s.batch}-key batches, {s.in_flight} in flight, TLS vs plaintext"
    return [
        _row(
            "bulk lookup (mutual TLS)", "bulk_lookup_tls_vs_plaintext",
            f"{setup}, {records:,} IPv4 records", look["plaintext"], look["tls"],
        ),
        _row(
            "claims (mutual TLS)", "claims_tls_vs_plaintext",
            f"{setup}, fresh keys", claim["plaintext"], claim["tls"],
        ),
    ]  # fmt: skip
