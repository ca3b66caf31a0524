"""Dynamic membership in one process: join through seeds, hand-off, garbage of moved
partitions, graceful leave (the process-level tests are in tests/system)."""

from __future__ import annotations

import numpy as np

from dht.client import Client
from dht.core.config import build_config
from dht.core.peers import replica_mask
from dht.core.record import Status
from dht.core.wire import key_hashes
from dht.edge.server import NodeServer
from dht.tools.bench import synthetic_keys
from dht.tools.cluster import free_ports

from .conftest import MakePop, wait_for


def holds_only_its_partitions(srv: NodeServer, raw: bytes) -> bool:
    node = srv.node
    parts = node.table.partitions_of(key_hashes(raw))
    mine = replica_mask(node.table, node.self_index)[parts]
    return len(node.store) == int(mine.sum())


async def test_join_hand_off_and_garbage(make_pop: MakePop) -> None:
    fast = {"replication_factor": 2, "handoff_grace_s": 0.5, "anti_entropy_interval_s": 0.2}
    nodes = await make_pop(3, **fast)
    raw = synthetic_keys(3000, seed=21)
    async with Client([nodes[0].grpc_address]) as c:
        assert set((await c.flow_packed("Confirm", raw, ttl_s=3600))["status"].tolist()) == {
            Status.CREATED
        }
        epoch = c.table.epoch
        grpc_port, admin_port, peer_port = free_ports("127.0.0.1", 3)
        joiner = NodeServer(
            build_config(
                {
                    "profile": "test",
                    "node_id": "ams-4",
                    "pop": "ams",
                    "pops": {"ams": 1, "fra": 2, "lon": 3},
                    "grpc_port": grpc_port,
                    "admin_port": admin_port,
                    "peer_port": peer_port,
                    "seeds": [nodes[1].peer_address],
                    **fast,
                }
            )
        )
        assert not joiner.node.joined
        await joiner.start()
        nodes.append(joiner)
        try:
            await wait_for(
                lambda: joiner.node.in_sync and joiner.node.accepting, what="joiner ready"
            )
            await wait_for(
                lambda: len({n.node.table.epoch for n in nodes}) == 1, what="one epoch everywhere"
            )
            assert joiner.node.table.epoch != epoch
            assert len(joiner.node.table.members) == 4
            # The joiner pulled exactly the partitions it now replicates.
            assert holds_only_its_partitions(joiner, raw)
            # The others drop what moved away once the grace is over.
            await wait_for(
                lambda: all(holds_only_its_partitions(n, raw) for n in nodes),
                what="garbage dropped",
            )
            assert sum(n.node.dropped for n in nodes[:3]) > 0
            # The client follows the new epoch; every record is still there, twice.
            assert set((await c.flow_packed("Lookup", raw))["status"].tolist()) == {Status.OK}
            assert c.table.epoch == joiner.node.table.epoch
            assert sum(len(n.node.store) for n in nodes) == 2 * 3000
            # A graceful leave hands the partitions back before the node goes.
            await joiner.stop()
            await wait_for(
                lambda: all(len(n.node.table.members) == 3 for n in nodes[:3]), what="left"
            )
            assert set((await c.flow_packed("Lookup", raw))["status"].tolist()) == {Status.OK}
            counts = np.array([len(n.node.store) for n in nodes[:3]])
            assert counts.sum() >= 2 * 3000
        finally:
            await joiner.stop()
