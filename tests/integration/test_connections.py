"""Every connection survives: the owner is right at the moments that matter (a SYN-ACK
lost before a flap, a flap before the record was shipped, mid-handshake, flows held in the
data plane). Real nodes of two or three PoPs over real gRPC on loopback
(docs/protocol.md#merge-rule, docs/protocol.md#second-chance, docs/api.md#forwarder)."""

from __future__ import annotations

from dht.client import Client
from dht.core.record import State, Status
from dht.tools.bench import synthetic_keys

from .conftest import MakePops, until

POPS = {"ams": 1, "fra": 2, "lon": 3}


async def test_an_abandoned_half_open_claim_never_beats_the_connection_that_completed(
    make_pops: MakePops,
) -> None:
    """The SYN reached ams and was claimed; ams's SYN-ACK was lost; the route moved to fra,
    where the retransmitted SYN was claimed and the handshake completed. ams's earlier
    embryonic claim must give way to fra's established record, and a confirm at ams (its
    forwarder saw a later packet) must change nothing."""
    pops = await make_pops(nodes=1)
    key = synthetic_keys(1, seed=41)
    async with (
        Client([pops["ams"][0].grpc_address], timeout_s=10) as ams,
        Client([pops["fra"][0].grpc_address], timeout_s=10) as fra,
    ):
        first = await ams.flow_packed("Claim", key, pop="ams")
        assert first["status"][0] == Status.CREATED
        second = await fra.flow_packed("Claim", key, pop="fra")
        assert second["status"][0] == Status.CREATED  # embryonic claims are not shipped
        assert int(second["birth_hlc"][0]) > int(first["birth_hlc"][0])
        done = await fra.flow_packed("Confirm", key, pop="fra")
        assert done["status"][0] == Status.OK

        async def ams_names_fra() -> bool:
            got = await ams.flow_packed("Lookup", key)
            return int(got["owner_pop"][0]) == POPS["fra"]

        await until(ams_names_fra, "fra's established record wins at ams")
        got = await ams.flow_packed("Lookup", key)
        assert got["state"][0] == State.ESTABLISHED
        confirm = await ams.flow_packed("Confirm", key, pop="ams")
        assert confirm["status"][0] == Status.OWNED_ELSEWHERE
        assert confirm["owner_pop"][0] == POPS["fra"]
        for c in (ams, fra):
            got = await c.flow_packed("Lookup", key)
            assert (int(got["owner_pop"][0]), got["state"][0]) == (POPS["fra"], State.ESTABLISHED)
