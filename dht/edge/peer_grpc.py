"""The gRPC transport from a node to the other nodes of its PoP: the
:class:`dht.node.replication.PeerTransport` calls (probes, replication, promises, undo,
quorum reads, anti-entropy) and one-hop forwarding of client calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
import numpy as np
import numpy.typing as npt

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.core.errors import InvalidArgument
from dht.core.membership import MemberState
from dht.core.ops import BatchCall, Op
from dht.core.packing import (
    pack_partitions,
    pack_terms,
    unpack_counts,
    unpack_digests,
    unpack_flags,
    unpack_partitions,
    unpack_positions,
    unpack_terms,
)
from dht.core.placement import Member
from dht.core.wire import FORMAT_VERSION, KEY_SIZE, U64Array
from dht.edge import convert
from dht.edge.channels import close_later, open_channel
from dht.node.transport import MergeResult, PeerUnreachable


def _unreachable(member: Member, e: grpc.aio.AioRpcError) -> PeerUnreachable:
    details = e.details() or ""
    # Only a refused connection proves the process is gone; a timeout may be a stall.
    refused = e.code() == grpc.StatusCode.UNAVAILABLE and "connection refused" in details.lower()
    return PeerUnreachable(member.node_id, f"{e.code().name}: {details}", refused=refused)


class GrpcPeerTransport:
    """gRPC transport to the other nodes of the PoP (dht.node.replication.PeerTransport, plus
    one-hop forwarding). Channels are opened on first use and closed on stop; every call
    is bounded by its timeout, and every failure becomes PeerUnreachable."""

    def __init__(
        self,
        node_id: str,
        creds: grpc.ChannelCredentials | None,
        rpc_timeout_s: float,
        forward_timeout_s: float,
        probe_timeout_s: float,
        dial_via: Mapping[str, str] | None = None,
    ) -> None:
        self._node_id = node_id
        self._via = dict(dial_via or {})  # peer address -> the address dialled instead
        self._creds = creds
        self._rpc_timeout_s = rpc_timeout_s
        self._forward_timeout_s = forward_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._channels: dict[
            str, tuple[grpc.aio.Channel, pb_grpc.FlowTableAsyncStub, pb_grpc.NodeInternalAsyncStub]
        ] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _stubs(
        self, member: Member
    ) -> tuple[pb_grpc.FlowTableAsyncStub, pb_grpc.NodeInternalAsyncStub]:
        entry = self._channels.get(member.peer)
        if entry is None:
            channel = open_channel(self._via.get(member.peer, member.peer), self._creds)
            entry = (channel, pb_grpc.FlowTableStub(channel), pb_grpc.NodeInternalStub(channel))
            self._channels[member.peer] = entry
        return entry[1], entry[2]

    async def forward(self, member: Member, call: BatchCall) -> bytes:
        stub = self._stubs(member)[0]
        method = getattr(stub, call.op.value)
        try:
            if call.op in (Op.GET_AFFINITY, Op.SET_AFFINITY):
                aresp: pb.AffinityResponse = await method(
                    convert.affinity_request(call), timeout=self._forward_timeout_s
                )
                return aresp.results
            fresp: pb.FlowBatchResponse = await method(
                convert.flow_request(call), timeout=self._forward_timeout_s
            )
            return fresp.results
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None

    async def ping(
        self, member: Member, view: Sequence[MemberState]
    ) -> tuple[int, list[MemberState]]:
        req = pb.PingRequest(from_node=self._node_id, members=convert.members_to_pb(list(view)))
        try:
            resp = await self._stubs(member)[1].Ping(req, timeout=self._probe_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        return resp.epoch, convert.members_from_pb(resp.members)

    async def ping_req(self, via: Member, target: Member) -> bool:
        req = pb.PingReqRequest(
            from_node=self._node_id, target_node=target.node_id, target_address=target.peer
        )
        try:
            # The helper's own probe is bounded by the probe timeout; allow for it.
            resp = await self._stubs(via)[1].PingReq(req, timeout=2 * self._probe_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(via, e) from None
        return resp.ok

    async def replicate(
        self,
        member: Member,
        entries: bytes,
        hinted: bool,
        issued_hlc: int = 0,
        terms: U64Array | None = None,
    ) -> MergeResult:
        req = pb.EntryBatch(
            format_version=FORMAT_VERSION,
            entries=entries,
            from_node=self._node_id,
            hinted=hinted,
            issued_hlc=issued_hlc,
            terms=pack_terms(terms) if terms is not None else b"",
        )
        try:
            resp = await self._stubs(member)[1].Replicate(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        return MergeResult(
            resp.applied,
            resp.refused,
            resp.stale,
            unpack_partitions(resp.fenced, "fenced"),
            resp.fenced_by,
            unpack_positions(resp.superseded, "superseded"),
            resp.fenced_by_floor,
        )

    async def promise(
        self, member: Member, partitions: npt.NDArray[np.intp], term: int
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        req = pb.PromiseRequest(
            from_node=self._node_id,
            partitions=pack_partitions(partitions),
            term=term,
        )
        try:
            resp = await self._stubs(member)[1].Promise(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        promised = unpack_terms(resp.promised)
        if len(promised) != len(partitions):
            raise PeerUnreachable(member.node_id, f"answered {len(promised)} promises")
        try:
            incomplete = unpack_flags(resp.incomplete, len(partitions), "incomplete")
        except InvalidArgument as e:
            raise PeerUnreachable(member.node_id, str(e)) from None
        return promised, incomplete

    async def undo(
        self, member: Member, written: bytes, before: bytes, terms: U64Array
    ) -> npt.NDArray[np.intp]:
        req = pb.UndoRequest(
            from_node=self._node_id, written=written, before=before, terms=pack_terms(terms)
        )
        try:
            resp = await self._stubs(member)[1].Undo(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        kept = unpack_positions(resp.kept)
        return kept

    async def read_copies(self, member: Member, keys: bytes) -> tuple[bytes, npt.NDArray[np.bool_]]:
        req = pb.CopiesRequest(format_version=FORMAT_VERSION, keys=keys)
        try:
            resp = await self._stubs(member)[1].ReadCopies(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        try:
            incomplete = unpack_flags(resp.incomplete, len(keys) // KEY_SIZE, "incomplete")
        except InvalidArgument as e:
            raise PeerUnreachable(member.node_id, str(e)) from None
        return resp.results, incomplete

    async def digests(
        self, member: Member, partitions: npt.NDArray[np.intp]
    ) -> tuple[U64Array, npt.NDArray[np.uint32]]:
        req = pb.DigestRequest(partitions=pack_partitions(partitions))
        try:
            resp = await self._stubs(member)[1].PartitionDigests(req, timeout=self._rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        digests = unpack_digests(resp.digests)
        counts = unpack_counts(resp.counts)
        return digests, counts

    async def fetch(
        self, member: Member, partitions: npt.NDArray[np.intp], settled_only: bool = False
    ) -> AsyncIterator[bytes]:
        # A whole-node refill may stream for a while: bound each batch, not the stream.
        call = self._stubs(member)[1].FetchPartitions(
            pb.FetchRequest(partitions=pack_partitions(partitions), settled_only=settled_only)
        )
        try:
            while True:
                async with asyncio.timeout(self._rpc_timeout_s * 5):
                    batch = await call.read()
                if not isinstance(batch, pb.EntryBatch):  # grpc.aio.EOF
                    return
                yield batch.entries
        except grpc.aio.AioRpcError as e:
            raise _unreachable(member, e) from None
        except TimeoutError:
            call.cancel()
            raise PeerUnreachable(member.node_id, "FetchPartitions stalled") from None

    def reset(self, member: Member) -> None:
        entry = self._channels.pop(member.peer, None)
        if entry is not None:
            # Calls still on the old channel end on their own (one cancelled under its
            # caller would surface as CancelledError, not as an unreachable peer).
            close_later(entry[0], self._forward_timeout_s + 1.0, self._closing)

    async def close(self) -> None:
        await asyncio.gather(*self._closing, return_exceptions=True)
        channels = [c for c, _, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
