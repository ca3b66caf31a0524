"""Node CPU per one-key call, by operation (docs/benchmarks.md#the-connection-lifecycle).

    .venv/bin/python scripts/op_cost.py --pops 3 --calls 1000

Starts PoPs of one node each (plaintext, uvloop, ``--replicate-after-s 0``: a confirmed
flow is shipped at once), claims 2,000 keys in batches first (a coordinator's first write
to a partition pays a promise round: start-up cost), then sends ``--calls`` one-key calls
of each operation to the first PoP's node, one at a time: look-ups of keys never stored,
then claims, confirms and releases of the same keys. Prints, per operation, the CPU time
(utime + stime from /proc) each node spent per call: the first node's is the call, the
others' the applying of what the first one shipped. One call in flight is the cost a
call pays when it travels alone, as at a low connection rate; not a throughput figure.
"""

from __future__ import annotations

import argparse
import asyncio

from dht.client import Client
from dht.tools.bench.keys import synthetic_keys
from dht.tools.bench.procs import cpu_seconds
from dht.tools.bench.workloads import NODE_ARGS
from dht.tools.cluster import LocalCluster, plan

WARM = 2_000


async def main(pops: int, calls: int) -> None:
    cluster = LocalCluster(plan(pops, 1), [*NODE_ARGS, "--replicate-after-s", "0"])
    async with cluster:
        pids = [n.pid for n in cluster.nodes]
        client = Client([cluster.nodes[0].spec.grpc])
        try:
            raw = synthetic_keys(WARM + calls, seed=7)
            keys = [raw[i * 40 : (i + 1) * 40] for i in range(WARM + calls)]
            for i in range(0, WARM, 100):
                await client.flow_packed("Claim", b"".join(keys[i : i + 100]), pop=1, ttl_s=10)
            for op, kw in (
                ("Lookup", {}),
                ("Claim", {"pop": 1, "ttl_s": 10}),
                ("Confirm", {"pop": 1, "ttl_s": 60}),
                ("Release", {"pop": 1}),
            ):
                await asyncio.sleep(0.5)  # what the step before shipped is applied
                before = [cpu_seconds(p) for p in pids]
                for k in keys[WARM:]:
                    await client.flow_packed(op, k, **kw)
                await asyncio.sleep(0.3)  # this step's shipping is applied
                after = [cpu_seconds(p) for p in pids]
                per = ", ".join(
                    f"{(a - b) * 1000 / calls:.2f}" for a, b in zip(after, before, strict=True)
                )
                print(f"{op:8s} node CPU ms per call: {per}", flush=True)
        finally:
            await client.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pops", type=int, default=3)
    p.add_argument("--calls", type=int, default=1_000)
    a = p.parse_args()
    asyncio.run(main(a.pops, a.calls))
