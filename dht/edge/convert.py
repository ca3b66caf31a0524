"""The only module (with the gRPC edge in dht.edge.server and dht.client.client) that touches the
generated ``*_pb2`` classes: protobuf <-> the package's own types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from dht._proto.dht.v1 import dht_pb2 as pb
from dht.core.membership import MemberState, MemberStatus
from dht.core.ops import BatchCall, Op
from dht.core.placement import Member, PartitionMap

FLOW_OPS = (Op.CLAIM, Op.CONFIRM, Op.LOOKUP, Op.REFRESH, Op.RELEASE)


def flow_call(op: Op, req: pb.FlowBatchRequest) -> BatchCall:
    return BatchCall(
        op=op,
        payload=req.keys,
        format_version=req.format_version,
        pop=req.pop,
        server=req.server,
        ttl_s=req.ttl_s,
        epoch=req.epoch,
        no_forward=req.no_forward,
        forwarded=req.forwarded,
        second_chance=req.second_chance,
    )


def affinity_call(op: Op, req: pb.AffinityRequest) -> BatchCall:
    return BatchCall(
        op=op,
        payload=req.clients,
        format_version=req.format_version,
        pop=req.pop,
        ttl_s=req.ttl_s,
        epoch=req.epoch,
        no_forward=req.no_forward,
        forwarded=req.forwarded,
    )


def flow_request(call: BatchCall) -> pb.FlowBatchRequest:
    return pb.FlowBatchRequest(
        format_version=call.format_version,
        keys=call.payload,
        pop=call.pop,
        server=call.server,
        ttl_s=call.ttl_s,
        epoch=call.epoch,
        no_forward=call.no_forward,
        forwarded=call.forwarded,
    )


def affinity_request(call: BatchCall) -> pb.AffinityRequest:
    return pb.AffinityRequest(
        format_version=call.format_version,
        clients=call.payload,
        pop=call.pop,
        ttl_s=call.ttl_s,
        epoch=call.epoch,
        no_forward=call.no_forward,
        forwarded=call.forwarded,
    )


def table_to_pb(
    pmap: PartitionMap,
    pop: int,
    pops: Mapping[str, int],
    max_batch_keys: int,
    prefix_v4: int,
    prefix_v6: int,
) -> pb.PartitionTable:
    return pb.PartitionTable(
        epoch=pmap.epoch,
        pop=pop,
        num_partitions=pmap.num_partitions,
        replication_factor=pmap.replication_factor,
        nodes=[
            pb.NodeInfo(
                index=i,
                node_id=mb.node_id,
                pop=pop,
                address=mb.address,
                admin_address=mb.admin_address,
            )
            for i, mb in enumerate(pmap.members)
        ],
        assignment=pmap.replicas.astype(">u2").tobytes(),
        pops=[pb.Pop(id=i, name=n) for n, i in sorted(pops.items(), key=lambda kv: kv[1])],
        max_batch_keys=max_batch_keys,
        affinity_prefix_v4=prefix_v4,
        affinity_prefix_v6=prefix_v6,
        key_hash="xxh3_64",
    )


def table_from_pb(t: pb.PartitionTable) -> PartitionMap:
    members = tuple(
        Member(n.node_id, n.address, n.admin_address)
        for n in sorted(t.nodes, key=lambda n: n.index)
    )
    rf = t.replication_factor
    replicas = (
        np.frombuffer(t.assignment, dtype=">u2").astype(np.uint16).reshape(t.num_partitions, rf)
    )
    return PartitionMap(t.epoch, members, t.num_partitions, replicas)


def members_to_pb(states: list[MemberState]) -> list[pb.MemberState]:
    return [
        pb.MemberState(
            node_id=m.node_id,
            address=m.address,
            admin_address=m.admin_address,
            incarnation=m.incarnation,
            status=int(m.status),  # type: ignore[arg-type]
            peer_address=m.peer_address,
        )
        for m in states
    ]


def members_from_pb(states: Iterable[pb.MemberState]) -> list[MemberState]:
    return [
        MemberState(
            m.node_id,
            m.address,
            m.admin_address,
            m.incarnation,
            MemberStatus(m.status),
            m.peer_address,
        )
        for m in states
        # Unknown statuses, states without an id and addresses that are no HOST:PORT are
        # dropped; incarnations out of range are refused (and counted) by the
        # membership's own bound (dht.core.membership).
        if m.status in _STATUSES
        and m.node_id
        and _address_ok(m.address, required=True)
        and _address_ok(m.admin_address)
        and _address_ok(m.peer_address)
    ]


def _address_ok(address: str, required: bool = False) -> bool:
    """HOST:PORT with a port 1..65535 and at most 255 characters ("" where optional)."""
    if not address:
        return not required
    host, sep, port = address.rpartition(":")
    return len(address) <= 255 and bool(sep and host) and port.isdigit() and 0 < int(port) < 65536


_STATUSES = {int(s) for s in MemberStatus}
