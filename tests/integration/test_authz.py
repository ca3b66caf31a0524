"""Who may call what, over mutual TLS (docs/security.md#roles, dht/edge/authz.py): a small
in-process cluster, PoP ams with two nodes and fra with one, every node with a certificate
of its own from a CA made in tmp_path, and callers with forwarder, node, operator, foreign
and no certificates. Every refused call is answered with its code and changes nothing:
records, promised terms, affinity, the membership view and the table are compared before
and after, on every node. The refusals are the hostile calls of the issue (a forged
Replicate, an Undo with a huge term, Ping gossip with fake members, a "LEFT" rumour, a
shipment from a PoP that is not the caller's), now refused by identity, before any of
them is looked at."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from dht._proto.dht.v1 import dht_pb2 as pb
from dht._proto.dht.v1 import dht_pb2_grpc as pb_grpc
from dht.client import Client
from dht.core.config import TlsConfig
from dht.core.errors import ConfigError, PermissionDenied
from dht.core.identity import Identity, Role
from dht.core.packing import pack_partitions
from dht.core.placement import PartitionMap
from dht.core.record import State, Status
from dht.core.wire import ENTRY_DTYPE, KEY_DTYPE, KEY_SIZE, decode_results, key_hashes, parse_flow
from dht.edge.server import NodeServer
from dht.tools.bench import synthetic_keys
from dht.tools.certs import init_ca, issue
from dht.tools.cluster import CLUSTER

from .conftest import MakePops, pop_configs, tls_of, until, wait_for
from .test_hostile import forged, held
from .test_identity_grpc import signed_by_ca

AMS, FRA, LON = 1, 2, 3
DENIED = grpc.StatusCode.PERMISSION_DENIED
HUGE_TERM = (1 << 63) - 1  # within the wire field, far above the bound on terms
# Two clients (IPv4-mapped, 16 bytes each) for the affinity calls.
CLIENTS = b"".join(ipaddress.ip_address(f"::ffff:198.51.100.{i}").packed for i in (1, 2))


@dataclass
class Cluster:
    certs: Path
    ams: list[NodeServer]
    fra: list[NodeServer]

    @property
    def every(self) -> list[NodeServer]:
        return [*self.ams, *self.fra]


@pytest.fixture
async def cluster(make_pops: MakePops, tmp_path: Path) -> Cluster:
    certs = tmp_path / "certs"
    pops = await make_pops(pops=2, nodes=[2, 1], certs=certs)
    c = Cluster(certs, pops["ams"], pops["fra"])
    assert all(s.authz.enabled for s in c.every)
    return c


def lookup(from_pop: int, entries_or_keys: bytes) -> pb.PopLookupRequest:
    """A second-chance call for the first key of packed entries (or keys)."""
    return pb.PopLookupRequest(format_version=1, from_pop=from_pop, keys=entries_or_keys[:KEY_SIZE])


def creds_of(tls: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        Path(tls.ca_file or "").read_bytes(),
        Path(tls.key_file).read_bytes(),
        Path(tls.cert_file).read_bytes(),
    )


def creds(
    c: Cluster, role: Role, pop: str = "", name: str | None = None
) -> grpc.ChannelCredentials:
    """A caller's credentials from the cluster's CA: a node (``name``), the forwarder
    ``fw`` of a PoP, the operator ``admin``."""
    return creds_of(tls_of(c.certs, role, pop, name))


def state(servers: list[NodeServer]) -> list[Any]:
    """What a refused call must not change, node by node: records (partition digests and
    counts), promised terms, affinity, the membership view and the table."""
    out = []
    for s in servers:
        n = s.node
        sums, counts = n.partition_digests()
        view = sorted(
            (m.node_id, m.address, m.peer_address, m.incarnation) for m in n.membership.view()
        )
        active = [m.node_id for m in n.membership.active()]
        out.append(
            (
                n.config.node_id,
                sums.tobytes(),
                counts.tobytes(),
                n.terms.promised.tobytes(),
                len(n.store),
                len(n.affinity),
                view,
                active,
                n.table.epoch,
            )
        )
    return out


def copies(servers: list[NodeServer], raw: bytes) -> int:
    """How many copies of the keys of ``raw`` the servers hold together."""
    return sum(
        held(s, raw[i : i + KEY_SIZE]) for s in servers for i in range(0, len(raw), KEY_SIZE)
    )


def refusals(servers: list[NodeServer]) -> int:
    return sum(sum(s.authz.refused.values()) for s in servers)


async def call(ch: grpc.aio.Channel, stub: Any, method: str, request: Any) -> Any:
    """One call of any shape (streams are drained)."""
    fn = getattr(stub(ch), method)
    if method == "Ship":
        return [ack async for ack in fn(iter(request), timeout=10)]
    if method in ("FetchPartitions", "PopFetch"):
        return [batch async for batch in fn(request, timeout=10)]
    return await fn(request, timeout=10)


async def refused(
    address: str,
    credentials: grpc.ChannelCredentials,
    calls: list[tuple[Any, str, Any]],
    code: grpc.StatusCode = DENIED,
) -> None:
    """Each (stub class, method, request) is answered ``code``."""
    async with grpc.aio.secure_channel(address, credentials) as ch:
        for stub, method, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(ch, stub, method, request)
            assert err.value.code() == code, (method, err.value)


def flows(raw: bytes, pop: int = 0, **kw: Any) -> pb.FlowBatchRequest:
    return pb.FlowBatchRequest(format_version=1, keys=raw, pop=pop, **kw)


def statuses(resp: pb.FlowBatchResponse) -> set[Status]:
    return {r.status for r in decode_results(resp.results)}


def member(node_id: str, address: str, incarnation: int, status: int) -> pb.MemberState:
    return pb.MemberState(
        node_id=node_id,
        address=address,
        peer_address=address,
        incarnation=incarnation,
        status=status,  # type: ignore[arg-type]
    )


def gossip(c: Cluster, from_node: str) -> pb.PingRequest:
    """Fake members, and "ams-2 LEFT" one incarnation above ams-1's view of it: gossip
    ams-1 would adopt from a node allowed to send it."""
    ams2 = c.ams[1]
    incarnation = c.ams[0].node.membership.members["ams-2"].incarnation + 1
    fakes = [
        member(f"ghost-{i}", f"127.0.0.1:{i + 1}", 1, pb.MEMBER_STATUS_ALIVE) for i in range(3)
    ]
    left = member("ams-2", ams2.grpc_address, incarnation, pb.MEMBER_STATUS_LEFT)
    return pb.PingRequest(from_node=from_node, members=[*fakes, left])


def ship(from_pop: int, entries: bytes = b"") -> pb.ShipBatch:
    return pb.ShipBatch(format_version=1, from_pop=from_pop, num_partitions=4096, entries=entries)


def peer_calls(c: Cluster, from_node: str) -> list[tuple[Any, str, Any]]:
    """Every NodeInternal method (calls of ams-1), each naming ``from_node`` where it names
    a caller: a forged Replicate, a Promise of every partition above ams-1's promises, an
    Undo under a huge term, Ping gossip, a PingReq, and the reads."""
    node = c.ams[0].node
    entry = forged().tobytes()
    parts = pack_partitions(np.arange(node.table.num_partitions))
    term = node.clock.now()  # above every promise, within the bound
    assert term > int(node.terms.promised.max())
    before = forged()
    before["rec"]["status"] = Status.NOT_FOUND
    undo = pb.UndoRequest(
        from_node=from_node,
        written=entry,
        before=before.tobytes(),
        terms=np.full(1, HUGE_TERM, dtype=">u8").tobytes(),
    )
    internal = pb_grpc.NodeInternalStub
    return [
        (
            internal,
            "Replicate",
            pb.EntryBatch(format_version=1, entries=entry, from_node=from_node),
        ),
        (internal, "Promise", pb.PromiseRequest(from_node=from_node, partitions=parts, term=term)),
        (internal, "Undo", undo),
        (internal, "Ping", gossip(c, from_node)),
        (
            internal,
            "PingReq",
            pb.PingReqRequest(
                from_node=from_node, target_node="ams-2", target_address=c.ams[1].peer_address
            ),
        ),
        (internal, "ReadCopies", pb.CopiesRequest(format_version=1, keys=entry[:KEY_SIZE])),
        (internal, "PartitionDigests", pb.DigestRequest()),
        (internal, "FetchPartitions", pb.FetchRequest(partitions=parts[:2])),
    ]


def undo_of(srv: NodeServer, key: bytes, from_node: str) -> pb.UndoRequest:
    """An Undo of the copy ``srv`` holds of ``key`` (back to no record), under the term
    ``srv`` promised for its partition."""
    node = srv.node
    keys, hashes = np.frombuffer(key, dtype=KEY_DTYPE), key_hashes(key)
    written = np.zeros(1, dtype=ENTRY_DTYPE)
    written["key"] = keys
    written["rec"] = node.store.copies(keys, hashes)
    assert int(written["rec"]["status"][0]) == Status.OK
    before = written.copy()
    before["rec"] = np.zeros(1, dtype=ENTRY_DTYPE["rec"])
    before["rec"]["status"] = Status.NOT_FOUND
    part = int(node.table.partitions_of(hashes)[0])
    term = int(node.terms.promised[part])
    return pb.UndoRequest(
        from_node=from_node,
        written=written.tobytes(),
        before=before.tobytes(),
        terms=np.full(1, term, dtype=">u8").tobytes(),
    )


async def confirmed_in_ams(c: Cluster, n: int, seed: int) -> bytes:
    """n flows confirmed at ams (by its forwarder, for an hour) and shipped to fra."""
    raw = synthetic_keys(n, seed=seed)
    tls = tls_of(c.certs, Role.FORWARDER, "ams")
    async with Client([s.grpc_address for s in c.ams], tls=tls, timeout_s=10) as a:
        got = await a.flow_packed("Confirm", raw, pop="ams", ttl_s=3600)
        assert set(got["status"].tolist()) == {Status.CREATED}

    def shipped() -> bool:
        # The flows, and the clients' affinity the confirms set, are on every replica in
        # both PoPs (two in ams, one in fra), and nothing waits to be shipped.
        links = [link for s in c.ams for link in s.pops.links.values()]
        return (
            copies(c.ams, raw) == 2 * n
            and copies(c.fra, raw) == n
            and len({len(s.node.affinity) for s in c.every}) == 1
            and len(c.fra[0].node.affinity) > 0
            and not any(len(link.queue) for link in links)
        )

    await wait_for(shipped, what="the flows and their affinity shipped to fra")
    return raw


# ---------------------------------------------------------------------------- forwarders


async def test_a_forwarder_writes_only_for_its_own_pop(cluster: Cluster) -> None:
    c = cluster
    ams1 = c.ams[0]
    raw = synthetic_keys(6, seed=81)
    fw = creds(c, Role.FORWARDER, "ams")
    before, refused_before = state(c.every), refusals(c.every)
    table = pb_grpc.FlowTableStub
    writes: list[tuple[Any, str, Any]] = [
        (table, m, flows(raw, FRA)) for m in ("Claim", "Confirm", "Refresh", "Release")
    ]
    writes += [
        (table, "Claim", flows(raw, LON)),
        (table, "SetAffinity", pb.AffinityRequest(format_version=1, clients=CLIENTS, pop=FRA)),
    ]
    await refused(ams1.grpc_address, fw, writes)
    assert state(c.every) == before
    assert refusals(c.every) == refused_before + len(writes)
    # Counted by reason, for operators (dht_auth_refused_total on /metrics).
    (metric,) = list(ams1.authz.gauges())
    by_reason = {s.labels["reason"]: s.value for s in metric.samples}
    assert by_reason["forwarder_pop"] >= len(writes)
    async with grpc.aio.secure_channel(ams1.grpc_address, fw) as ch:
        stub = table(ch)
        # Reads are for any PoP.
        assert statuses(await stub.Lookup(flows(raw, FRA), timeout=10)) == {Status.NOT_FOUND}
        aff = await stub.GetAffinity(
            pb.AffinityRequest(format_version=1, clients=CLIENTS, pop=FRA), timeout=10
        )
        assert len(aff.results) == 64
        pt = await stub.GetPartitionTable(pb.PartitionTableRequest(), timeout=10)
        assert pt.pop == AMS and len(pt.nodes) == 2
        # Writes for its own PoP work (keys of both nodes: the other's are forwarded to it
        # over the peer plane, with this node's certificate).
        assert statuses(await stub.Claim(flows(raw, AMS), timeout=10)) == {Status.CREATED}
        found = decode_results((await stub.Lookup(flows(raw), timeout=10)).results)
        assert {(r.status, r.owner_pop, r.state) for r in found} == {
            (Status.OK, AMS, State.EMBRYONIC)
        }
        # pop 0 = the node's own PoP (what Client.claim sends by default): ams here.
        own = synthetic_keys(2, seed=82, start=82_000_000)
        assert statuses(await stub.Claim(flows(own, 0), timeout=10)) == {Status.CREATED}
        ok = await stub.SetAffinity(
            pb.AffinityRequest(format_version=1, clients=CLIENTS, pop=AMS), timeout=10
        )
        assert {r.status for r in decode_results(ok.results)} == {Status.OK}
    assert copies(c.ams, raw) == 2 * 6  # two replicas each
    # fra's forwarder looks up ams's flows too (at an ams node), but may not release them.
    fra_fw = creds(c, Role.FORWARDER, "fra")
    async with grpc.aio.secure_channel(ams1.grpc_address, fra_fw) as ch:
        assert statuses(await table(ch).Lookup(flows(raw), timeout=10)) == {Status.OK}
    await refused(ams1.grpc_address, fra_fw, [(table, "Release", flows(raw, AMS))])
    assert copies(c.ams, raw) == 2 * 6  # two replicas each


async def test_a_forwarder_cannot_call_the_peer_plane(cluster: Cluster) -> None:
    c = cluster
    target = c.ams[0]
    raw = synthetic_keys(3, seed=82)
    fw = creds(c, Role.FORWARDER, "ams")
    calls = peer_calls(c, "ams-2")
    calls += [
        (pb_grpc.FlowTableStub, "Claim", flows(raw, AMS)),  # a "forward"
        (pb_grpc.FlowTableStub, "Lookup", flows(raw)),
        (pb_grpc.PopLinkStub, "PopPush", ship(FRA, forged(owner_pop=FRA, birth_pop=FRA).tobytes())),
        (pb_grpc.PopLinkStub, "PopLookup", lookup(FRA, raw)),
    ]
    before, refused_before = state(c.every), refusals(c.every)
    await refused(target.peer_address, fw, calls)
    assert state(c.every) == before
    assert refusals(c.every) == refused_before + len(calls)
    assert held(target) == 0


# ---------------------------------------------------------------------------- nodes


async def test_a_node_speaks_only_for_itself(cluster: Cluster) -> None:
    """ams-2 calls ams-1 naming another node (or none) as the caller: the forged
    Replicate, the Undo with a huge term, the fake members and the LEFT rumour are
    refused; the same calls as itself are served."""
    c = cluster
    ams1 = c.ams[0]
    raw = await confirmed_in_ams(c, 4, seed=83)
    key = raw[:KEY_SIZE]
    assert held(ams1, key) == 1
    me = creds(c, Role.NODE, "ams", "ams-2")
    naming = ("nobody", "", "ams-1", "fra-1", "ghost-0")
    calls = [
        call
        for who in naming
        for call in peer_calls(c, who)
        if call[1] in ("Replicate", "Promise", "Undo", "Ping", "PingReq")
    ]
    # An Undo of the copy ams-1 holds, under the term it promised, naming ams-1 itself:
    # accepted (the record deleted) if it came from ams-1 (see the end).
    undo = undo_of(ams1, key, "ams-1")
    calls.append((pb_grpc.NodeInternalStub, "Undo", undo))
    before, refused_before = state(c.every), refusals(c.every)
    await refused(ams1.peer_address, me, calls)
    assert state(c.every) == before
    assert refusals(c.every) == refused_before + len(calls)
    assert held(ams1, key) == 1
    # As itself, ams-2 is served: its gossip, a read of copies, a replicated entry, and
    # an Undo of a write of its own (only the writer may undo a copy: docs/protocol.md#undo).
    async with grpc.aio.secure_channel(ams1.peer_address, me) as ch:
        internal = pb_grpc.NodeInternalStub(ch)
        resp = await internal.Ping(pb.PingRequest(from_node="ams-2"), timeout=10)
        assert resp.node_id == "ams-1"
        assert sorted(m.node_id for m in resp.members) == ["ams-1", "ams-2"]
        # (Another key: a read of a copy still open to an undo pins it, see Replica.undo.)
        other = raw[KEY_SIZE : 2 * KEY_SIZE]
        copies = await internal.ReadCopies(pb.CopiesRequest(format_version=1, keys=other))
        assert {r.status for r in decode_results(copies.results)} == {Status.OK}
        rep = await internal.Replicate(
            pb.EntryBatch(format_version=1, entries=forged().tobytes(), from_node="ams-2"),
            timeout=10,
        )
        assert rep.applied == 1 and held(ams1) == 1
        own = undo_of(ams1, key, "ams-2")
        wrote = await internal.Replicate(
            pb.EntryBatch(
                format_version=1, entries=own.written, terms=own.terms, from_node="ams-2"
            ),
            timeout=10,
        )
        assert not wrote.fenced, wrote
        done = await internal.Undo(own, timeout=10)
    assert done.undone == 1 and held(ams1, key) == 0, done


async def test_another_pops_node_ships_only_as_itself(cluster: Cluster) -> None:
    """fra's node may not call NodeInternal (or forward) at ams; PopLink takes only the
    nodes of the PoP ``from_pop`` names, never ams's own nodes (from_pop=ams) nor ams's
    nodes lying (from_pop=fra), nor fra's node claiming to be ams or lon. fra's real
    shipments work both ways."""
    c = cluster
    ams1 = c.ams[0]
    fra1 = c.fra[0]
    theirs = forged(owner_pop=FRA, birth_pop=FRA).tobytes()
    mine = forged().tobytes()
    fra_node = creds(c, Role.NODE, "fra", "fra-1")
    ams_node = creds(c, Role.NODE, "ams", "ams-2")
    parts = pack_partitions(np.arange(4))
    link = pb_grpc.PopLinkStub

    def pop_calls(from_pop: int, entries: bytes) -> list[tuple[Any, str, Any]]:
        return [
            (link, "PopPush", ship(from_pop, entries)),
            (link, "Ship", [ship(from_pop, entries)]),
            (
                link,
                "PopDigests",
                pb.PopDigestRequest(from_pop=from_pop, partitions=parts, num_partitions=4096),
            ),
            (
                link,
                "PopFetch",
                pb.PopFetchRequest(from_pop=from_pop, partitions=parts, num_partitions=4096),
            ),
            (link, "PopLookup", lookup(from_pop, entries)),
        ]

    forward = (pb_grpc.FlowTableStub, "Lookup", flows(mine[:KEY_SIZE]))
    at_ams = [
        (fra_node, [*peer_calls(c, "fra-1"), forward]),
        (fra_node, pop_calls(AMS, mine) + pop_calls(LON, theirs)),
        (ams_node, pop_calls(AMS, mine) + pop_calls(FRA, theirs)),
    ]
    # And at fra: ams's node pretending to be fra, and fra's own forwarder.
    at_fra = [
        (ams_node, pop_calls(FRA, theirs)),
        (creds(c, Role.FORWARDER, "fra"), pop_calls(FRA, theirs)),
    ]
    before, refused_before = state(c.every), refusals(c.every)
    for who, calls in at_ams:
        await refused(ams1.peer_address, who, calls)
    for who, calls in at_fra:
        await refused(fra1.peer_address, who, calls)
    assert state(c.every) == before
    assert refusals(c.every) == refused_before + sum(len(x) for _, x in at_ams + at_fra)
    assert held(ams1) == 0 and held(fra1) == 0

    # fra's node as itself: served (here with an entry that ingress refuses on its own).
    async with grpc.aio.secure_channel(ams1.peer_address, fra_node) as ch:
        ack = await link(ch).PopPush(ship(FRA, forged(owner_pop=FRA, state=9).tobytes()))
        assert (ack.applied, ack.rejected) == (0, 1)
        digests = await link(ch).PopDigests(
            pb.PopDigestRequest(from_pop=FRA, partitions=parts, num_partitions=4096)
        )
        assert len(digests.digests) == 4 * 8
        # A second chance: answered from ams's table (nothing there for this key).
        answer = await link(ch).PopLookup(lookup(FRA, mine))
        assert decode_results(answer.results)[0].status == Status.NOT_FOUND
    # And the real links ship both ways: confirmed in ams, found in fra, and back.
    raw = await confirmed_in_ams(c, 20, seed=84)
    fra_fw = tls_of(c.certs, Role.FORWARDER, "fra")
    ams_fw = tls_of(c.certs, Role.FORWARDER, "ams")
    back = synthetic_keys(20, seed=85, start=1000)
    async with (
        Client([fra1.grpc_address], tls=fra_fw, timeout_s=10) as f,
        Client([s.grpc_address for s in c.ams], tls=ams_fw, timeout_s=10) as a,
    ):
        found = await f.flow_packed("Lookup", raw)
        assert set(found["status"].tolist()) == {Status.OK}
        assert set(found["owner_pop"].tolist()) == {AMS}
        confirmed = await f.flow_packed("Confirm", back, pop="fra", ttl_s=3600)
        assert set(confirmed["status"].tolist()) == {Status.CREATED}

        async def shipped_back() -> bool:
            got = await a.flow_packed("Lookup", back)
            return bool((got["status"] == Status.OK).all() and (got["owner_pop"] == FRA).all())

        await until(shipped_back, "fra's flows shipped to ams")
    assert all(s.pops.startup.is_set() for s in c.every)


# ---------------------------------------------------------------------------- public plane


async def test_node_certificates_are_refused_on_the_public_plane(cluster: Cluster) -> None:
    c = cluster
    raw = synthetic_keys(4, seed=86)
    table = pb_grpc.FlowTableStub
    public = [
        (table, "Lookup", flows(raw)),
        (table, "Claim", flows(raw, AMS)),
        (table, "GetPartitionTable", pb.PartitionTableRequest()),
        (table, "GetAffinity", pb.AffinityRequest(format_version=1, clients=CLIENTS)),
    ]
    before, refused_before = state(c.every), refusals(c.every)
    await refused(c.ams[1].grpc_address, creds(c, Role.NODE, "ams", "ams-1"), public)
    await refused(c.ams[0].grpc_address, creds(c, Role.NODE, "fra", "fra-1"), public)
    # Nor does an operator reach the peer plane (forwarders: test_a_forwarder_cannot_...).
    operator = creds(c, Role.OPERATOR)
    await refused(c.ams[0].peer_address, operator, peer_calls(c, "admin")[:4])
    assert state(c.every) == before
    assert refusals(c.every) == refused_before + 2 * len(public) + 4


async def test_an_operator_may_write_for_any_pop(cluster: Cluster) -> None:
    c = cluster
    raw = synthetic_keys(6, seed=87)
    half = 3 * KEY_SIZE
    async with grpc.aio.secure_channel(c.ams[0].grpc_address, creds(c, Role.OPERATOR)) as ch:
        stub = pb_grpc.FlowTableStub(ch)
        assert statuses(await stub.Claim(flows(raw[:half], FRA))) == {Status.CREATED}
        assert statuses(await stub.Claim(flows(raw[half:], LON))) == {Status.CREATED}
        found = decode_results((await stub.Lookup(flows(raw))).results)
        assert [r.owner_pop for r in found] == [FRA] * 3 + [LON] * 3
        assert statuses(await stub.Release(flows(raw[:half], FRA))) == {Status.OK}
        ok = await stub.SetAffinity(pb.AffinityRequest(format_version=1, clients=CLIENTS, pop=LON))
        assert {r.status for r in decode_results(ok.results)} == {Status.OK}
        pref = await stub.GetAffinity(pb.AffinityRequest(format_version=1, clients=CLIENTS))
        assert {r.owner_pop for r in decode_results(pref.results)} == {LON}


# ---------------------------------------------------------------------------- no identity


async def test_callers_without_a_certificate_of_the_cluster_get_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Plaintext, TLS without a client certificate and a certificate of another CA (with
    the very identities of the cluster) fail at the handshake (UNAVAILABLE); a certificate
    of the cluster's CA that names no identity is UNAUTHENTICATED, one of another trust
    domain PERMISSION_DENIED. Nothing changes."""
    c = cluster
    ams1 = c.ams[0]
    raw = synthetic_keys(3, seed=88)
    ca = (c.certs / "ca.pem").read_bytes()
    other = tmp_path / "other"
    init_ca(other, CLUSTER)
    fw_cert, fw_key = issue(other, Identity(Role.FORWARDER, CLUSTER, "ams", "fw"))
    node_cert, node_key = issue(other, Identity(Role.NODE, CLUSTER, "ams", "ams-2"))
    foreign_fw = grpc.ssl_channel_credentials(ca, fw_key.read_bytes(), fw_cert.read_bytes())
    foreign_node = grpc.ssl_channel_credentials(ca, node_key.read_bytes(), node_cert.read_bytes())
    no_cert = grpc.ssl_channel_credentials(ca)
    public = [(pb_grpc.FlowTableStub, "Claim", flows(raw, AMS))]
    peer = [
        call
        for call in peer_calls(c, "ams-2")
        if call[1] in ("Replicate", "Undo", "Ping", "PartitionDigests")
    ]
    peer.append((pb_grpc.PopLinkStub, "PopPush", ship(FRA, forged(owner_pop=FRA).tobytes())))
    before, refused_before = state(c.every), refusals(c.every)
    unavailable = grpc.StatusCode.UNAVAILABLE
    for creds_ in (no_cert, foreign_fw, foreign_node):
        await refused(ams1.grpc_address, creds_, public, unavailable)
        await refused(ams1.peer_address, creds_, peer, unavailable)
    for address, calls in ((ams1.grpc_address, public), (ams1.peer_address, peer)):
        async with grpc.aio.insecure_channel(address) as ch:
            for stub, method, request in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(ch, stub, method, request)
                assert err.value.code() == unavailable, (method, err.value)
    # Past the handshake (the cluster's CA signed it), but no identity, or another domain's.
    assert refusals(c.every) == refused_before
    for uris, code in (
        ([], grpc.StatusCode.UNAUTHENTICATED),
        # Two URIs name no one identity.
        (["spiffe://dht.local/node/ams/ams-2", "spiffe://dht.local/operator/x"], None),
        (["spiffe://other.example/operator/admin"], DENIED),
    ):
        key, cert = signed_by_ca(c.certs, uris)
        odd = grpc.ssl_channel_credentials(ca, key, cert)
        want = code or grpc.StatusCode.UNAUTHENTICATED
        await refused(ams1.grpc_address, odd, public, want)
        await refused(ams1.peer_address, odd, peer, want)
    assert refusals(c.every) == refused_before + 3 * (len(public) + len(peer))
    assert state(c.every) == before


# ---------------------------------------------------------------------------- the client


async def test_the_client_with_a_forwarder_certificate(cluster: Cluster) -> None:
    c = cluster
    tls = tls_of(c.certs, Role.FORWARDER, "ams")
    keys = [parse_flow(f"tcp/198.51.100.{i}:1000/192.0.2.1:443") for i in range(1, 60)]
    async with Client([s.grpc_address for s in c.ams], tls=tls, timeout_s=10) as cl:
        assert {r.status for r in await cl.claim(keys, pop="ams")} == {Status.CREATED}
        assert {r.status for r in await cl.confirm(keys, pop="ams")} == {Status.OK}
        assert {r.status for r in await cl.refresh(keys, pop="ams")} == {Status.OK}
        found = await cl.lookup(keys)
        assert {(r.status, r.owner_pop, r.state) for r in found} == {
            (Status.OK, AMS, State.ESTABLISHED)
        }
        # Writes for another PoP raise PermissionDenied, and change nothing.
        with pytest.raises(PermissionDenied, match="only for PoP ams"):
            await cl.release(keys, pop="fra")
        assert {r.status for r in await cl.lookup(keys)} == {Status.OK}
        # Everything through one node: the rest is forwarded over the peer plane.
        t = cl.table
        cl.set_table(PartitionMap(t.epoch, t.members, t.num_partitions, t.replicas * 0))
        assert {r.status for r in await cl.release(keys, pop="ams")} == {Status.OK}
        assert {r.status for r in await cl.lookup(keys)} == {Status.NOT_FOUND}
    ams1 = c.ams[0].node
    assert ams1.metrics.forwarded._value.get() > 0
    assert ams1.metrics.forward_errors._value.get() == 0


def test_a_node_refuses_to_start_with_another_identitys_certificate(tmp_path: Path) -> None:
    (cfg,) = pop_configs(1, certs=tmp_path)
    for role, pop, name in ((Role.NODE, "ams", "ams-2"), (Role.FORWARDER, "ams", None)):
        if name is not None:
            issue(tmp_path, Identity(role, CLUSTER, pop, name))
        wrong = dataclasses.replace(cfg, tls=tls_of(tmp_path, role, pop, name))
        with pytest.raises(ConfigError, match="not of node ams/ams-1"):
            NodeServer(wrong)
