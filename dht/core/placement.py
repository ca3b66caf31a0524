"""Placement: key hash -> partition -> replica nodes (docs/protocol.md#keys-and-partitions).

A key's partition is ``xxh3_64(key record) mod num_partitions``. Partitions, not keys,
go on consistent-hash rings (``uhashring``), once per membership epoch, into a
``(num_partitions, rf)`` table of member indexes. Routing a key is then one hash and one
array index.

There is one ring per replica *slot* (slot 0 is the primary), each with every member's
virtual nodes at their own points. Slot ``s`` of partition ``p`` wants the member whose
virtual node on ring ``s`` follows ``p``'s point most closely; a member holds at most one
slot of a partition, so the (slot, member) pairs of a partition are taken greedily, the
closest first. A single ring walked from the partition's point (the usual scheme) moves
~1/N of the copies on a join too, but the newcomer shifts every replica after it one slot
down: half the (partition, slot) assignments change for 3 -> 4 nodes. Per-slot rings
change 0.31 of them (ideal 0.25) and still move ~1/N of the copies (tests/unit).

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

from dht.core.errors import ConfigError

DEFAULT_PARTITIONS = 4096
DEFAULT_VNODES = 256
# Part of every epoch: nodes that place partitions differently never share an epoch.
PLACEMENT_VERSION = "slot-rings-1"


@dataclass(frozen=True, slots=True)
class Member:
    """A node of one PoP's node set, as placement and clients see it."""

    node_id: str
    address: str  # the public plane: FlowTable for forwarders
    admin_address: str = ""
    # The peer plane (node-to-node and PoP-to-PoP services, docs/security.md#planes);
    # empty: the same as ``address`` (the in-memory network of the simulator).
    peer_address: str = ""

    @property
    def peer(self) -> str:
        """Where node-to-node calls go."""
        return self.peer_address or self.address


def _ring_hash(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode())


_FAR = np.uint64(2**64 - 1)


def _place(ids: Sequence[str], num_partitions: int, rf: int, vnodes: int) -> npt.NDArray[np.uint16]:
    """The (num_partitions, rf) table of indexes into ``ids`` (see the module doc)."""
    n = len(ids)
    points = np.array(
        [_ring_hash(f"partition-{p}") for p in range(num_partitions)], dtype=np.uint64
    )
    # dist[p, s, m]: clockwise distance from p's point to m's next virtual node on ring s.
    dist = np.empty((num_partitions, rf, n), dtype=np.uint64)
    index = {f"{node_id}#{slot}": m for m, node_id in enumerate(ids) for slot in range(rf)}
    for slot in range(rf):
        ring = HashRing(
            nodes=[f"{node_id}#{slot}" for node_id in ids], vnodes=vnodes, hash_fn=_ring_hash
        )
        continuum = ring.get_points()  # [(point, node name)], sorted by point
        at = np.array([pt for pt, _ in continuum], dtype=np.uint64)
        owner = np.array([index[name] for _, name in continuum], dtype=np.intp)
        for m in range(n):
            mine = at[owner == m]
            nxt = mine[np.searchsorted(mine, points) % len(mine)]
            with np.errstate(over="ignore"):
                dist[:, slot, m] = nxt - points  # modulo 2**64: past the end wraps round
    # Greedy: per partition, the closest (slot, member) pair left wins, rf times.
    rows = np.arange(num_partitions)
    replicas = np.empty((num_partitions, rf), dtype=np.uint16)
    for _ in range(rf):
        best = dist.reshape(num_partitions, rf * n).argmin(axis=1)
        slot, m = best // n, best % n
        replicas[rows, slot] = m
        dist[rows, slot, :] = _FAR
        dist[rows, :, m] = _FAR
    return replicas


def membership_epoch(
    members: Sequence[Member], num_partitions: int, replication_factor: int
) -> int:
    """The epoch is derived from the (active) membership itself: the same
    node set gives the same epoch on every node, a different one (almost surely) another;
    so does a different placement scheme (``PLACEMENT_VERSION``).
    Kept below 2**63 so it survives signed 64-bit consumers."""
    desc = "|".join(sorted(f"{m.node_id}@{m.address}@{m.peer_address}" for m in members))
    spec = f"{PLACEMENT_VERSION}/{num_partitions}/{replication_factor}/{desc}"
    return xxhash.xxh3_64_intdigest(spec.encode()) >> 1


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
        rf = max(1, min(replication_factor, len(ordered)))
        replicas = _place([m.node_id for m in ordered], num_partitions, rf, vnodes)
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
