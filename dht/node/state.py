"""What the parts of a node share: the table in force and this node's place in it,
per-partition readiness, and the lifecycle flags.

Written by the node (a new table) and by liveness (ready, accepting, leaving); read by
every part. Not thread-safe; lives in the node's loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt

from dht.core.errors import NotReady
from dht.core.placement import PartitionMap


class NodeState:
    def __init__(self, num_partitions: int, joined: bool) -> None:
        self.pmap: PartitionMap | None = None
        self.self_index = -1
        # Per partition: is this node one of its replicas (in the table in force)?
        self.replicas: npt.NDArray[np.bool_] = np.zeros(num_partitions, dtype=bool)
        # Per partition: does this node hold its data (refilled, or handed off)? A
        # replica's own copy counts in a quorum only then.
        self.part_ready: npt.NDArray[np.bool_] = np.zeros(num_partitions, dtype=bool)
        self.accepting = False  # serving batch calls
        self.joined = joined  # a seed answered (or there were none to ask)
        self.leaving = False  # handing its partitions off; never coordinates again
        self.resyncing = True  # its copy is not trusted until a resync round got through
        self.first_sync = asyncio.Event()  # set once the start-up refill is done

    @property
    def table(self) -> PartitionMap:
        if self.pmap is None:
            raise NotReady("node has not started")
        return self.pmap

    def incomplete(self, parts: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Per partition: this node does not hold its data in full (being handed to it,
        not refilled since a restart, or never its own): what it answers for it must not
        count towards a quorum read or a take-over's quorum of promises."""
        out: npt.NDArray[np.bool_] = ~self.part_ready[parts]
        return out

    @property
    def in_sync(self) -> bool:
        """Holds the data of every partition it replicates."""
        return bool(self.part_ready[self.replicas].all()) and not self.resyncing
