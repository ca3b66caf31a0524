"""Placement: key hash -> partition -> replica nodes (DESIGN section 3).

A key's partition is ``xxh3_64(key record) mod num_partitions``. Partitions, not keys,
go on the consistent-hash ring (``uhashring``), once per membership epoch, into a
``(num_partitions, rf)`` table of member indexes. Routing a key is then one hash and one
array index; a join or leave moves about 1/N of the (partition, replica) assignments.

Pure: no I/O. Both the node and the client library build or decode a
:class:`PartitionMap` and route through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import xxhash
from uhashring import HashRing

from dht.errors import ConfigError

DEFAULT_PARTITIONS = 4096
DEFAULT_VNODES = 256


@dataclass(frozen=True, slots=True)
class Member:
    """A node of one PoP's node set, as placement and clients see it."""

    node_id: str
    address: str
    admin_address: str = ""


def _ring_hash(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


def membership_epoch(
    members: Sequence[Member], num_partitions: int, replication_factor: int
) -> int:
    """The epoch is derived from the (active) membership itself: the same
    node set gives the same epoch on every node, a different one (almost surely) another.
    Kept below 2**63 so it survives signed 64-bit consumers."""
    desc = "|".join(sorted(f"{m.node_id}@{m.address}" for m in members))
    return xxhash.xxh3_64_intdigest(f"{num_partitions}/{replication_factor}/{desc}".encode()) >> 1


@dataclass(frozen=True)
class PartitionMap:
    """One epoch's placement. ``replicas[p]`` lists member indexes, primary first."""

    epoch: int
    members: tuple[Member, ...]
    num_partitions: int
    replicas: npt.NDArray[np.uint16]
    primaries: npt.NDArray[np.uint16] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "primaries", np.ascontiguousarray(self.replicas[:, 0]))

    @property
    def replication_factor(self) -> int:
        return int(self.replicas.shape[1])

    @classmethod
    def build(
        cls,
        members: Sequence[Member],
        num_partitions: int = DEFAULT_PARTITIONS,
        replication_factor: int = 3,
        vnodes: int = DEFAULT_VNODES,
        epoch: int | None = None,
    ) -> PartitionMap:
        if not members:
            raise ConfigError("placement needs at least one member")
        if not 1 <= num_partitions <= 65535:
            raise ConfigError(f"num_partitions {num_partitions} outside 1..65535")
        ids = [m.node_id for m in members]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate node ids in membership: {sorted(ids)}")
        ordered = tuple(sorted(members, key=lambda m: m.node_id))
        index = {m.node_id: i for i, m in enumerate(ordered)}
        rf = max(1, min(replication_factor, len(ordered)))
        ring = HashRing(nodes=[m.node_id for m in ordered], vnodes=vnodes, hash_fn=_ring_hash)
        replicas = np.empty((num_partitions, rf), dtype=np.uint16)
        for p in range(num_partitions):
            # range() walks the ring from the partition's point; computed once per epoch.
            nodes = ring.range(f"partition-{p}", size=rf, unique=True)
            replicas[p] = [index[n["nodename"]] for n in nodes]
        if epoch is None:
            epoch = membership_epoch(ordered, num_partitions, rf)
        return cls(epoch, ordered, num_partitions, replicas)

    def index_of(self, node_id: str) -> int:
        for i, m in enumerate(self.members):
            if m.node_id == node_id:
                return i
        raise KeyError(node_id)

    def partitions_of(self, hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint16]:
        return (hashes % np.uint64(self.num_partitions)).astype(np.uint16)

    def partition_of(self, key_hash: int) -> int:
        return key_hash % self.num_partitions

    def primary_of(self, key_hash: int) -> Member:
        return self.members[int(self.primaries[key_hash % self.num_partitions])]

    def partition_counts(self, slot: int | None = 0) -> list[int]:
        """Partitions per member: as primary (slot 0), in one replica slot, or in any
        slot (slot=None)."""
        cols = self.replicas if slot is None else self.replicas[:, slot]
        counts: list[int] = np.bincount(cols.ravel(), minlength=len(self.members)).tolist()
        return counts

    def assignments(self) -> set[tuple[int, str]]:
        """(partition, node id) pairs: which node holds a copy of which partition. Comparing
        two epochs' sets measures how much data a membership change moves."""
        return {
            (p, self.members[int(n)].node_id)
            for p in range(self.num_partitions)
            for n in self.replicas[p]
        }
