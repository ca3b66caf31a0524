"""What one ``dht simulate`` run asks for (docs/simulator.md#options): the traffic, and
every duration in simulated seconds, turned into the forwarders' real ones by the time
scale (docs/simulator.md#time-scale)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dht.client.cache import CacheLimits
from dht.client.forwarder import ForwarderConfig
from dht.tools.traffic import TrafficConfig


@dataclass(frozen=True)
class SimSettings:
    """Real seconds for ``duration_s``; every other duration in simulated seconds (the
    run divides them by ``time_scale``)."""

    duration_s: float = 45.0
    time_scale: float = 10.0
    seed: int = 1
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    # Nodes ship an established flow once it is this old (simulated s; the nodes'
    # default, 0: at once; docs/protocol.md#the-replicate-after-trade-off).
    replicate_after_s: float = 0.0
    # TTLs the forwarders ask for (simulated s): embryonic claims, and established
    # records (confirms and refreshes). The established one is short, so a record that
    # nothing keeps alive lapses inside a run.
    claim_ttl_s: float = 10.0
    established_ttl_s: float = 60.0
    # Forwarder cache: owner-change bound, embryonic and negative lifetimes (simulated s).
    owner_ttl_s: float = 5.0
    embryonic_ttl_s: float = 1.0
    negative_ttl_s: float = 1.0
    batch_window_ms: float = 2.0  # real milliseconds
    batch_max_keys: int = 1_000
    sticky_clients: bool = False
    use_affinity: bool = True
    # Look-ups of packets that are not a flow's first ask the other PoPs
    # (docs/protocol.md#second-chance); off: a comparison.
    second_chance: bool = True
    # The second-chance deadline of the nodes the run starts (real s; None: the nodes'
    # default, 0.15 s). Not scaled: it bounds real round trips, and on one small machine
    # running every node those are CPU-bound.
    second_chance_timeout_s: float | None = None
    # Call fw.alive() for the pinned flows (off: shows what lapses without it).
    keepalive: bool = True
    # A UDP flow is confirmed at its home once it has lived this long (simulated s): the
    # design's "the local server answered, or the flow lived udp_confirm_after_s".
    udp_confirm_after_s: float = 1.0

    def real(self, sim_s: float) -> float:
        return sim_s / self.time_scale

    def forwarder_config(self) -> ForwarderConfig:
        owner = self.real(self.owner_ttl_s)
        established = self.established_ttl_real_s()
        return ForwarderConfig(
            cache=CacheLimits(
                capacity=100_000,
                owner_ttl_s=owner,
                negative_ttl_s=self.real(self.negative_ttl_s),
                embryonic_ttl_s=self.real(self.embryonic_ttl_s),
            ),
            batch_window_ms=self.batch_window_ms,
            batch_max_keys=self.batch_max_keys,
            refresh_interval_s=owner / 3,
            # Half the established TTL: well below it, as the keep-alive needs.
            refresh_ahead_s=established / 2,
            table_refresh_s=10.0,
            claim_ttl_s=max(1, round(self.real(self.claim_ttl_s))),
            confirm_ttl_s=established,
            sticky_clients=self.sticky_clients,
            use_affinity=self.use_affinity,
            second_chance=self.second_chance,
        )

    def established_ttl_real_s(self) -> int:
        """The established TTL the forwarders ask for, in whole real seconds (>= 1)."""
        return max(1, round(self.real(self.established_ttl_s)))

    def keepalive_interval_s(self) -> float:
        """Real seconds between two ``alive()`` rounds for the pinned flows. ``alive()``
        refreshes a record once it has less than ``refresh_ahead_s`` left (half the
        established TTL here); calling every quarter of that leaves three rounds of slack
        before the record would lapse, for a late or failed round."""
        return self.forwarder_config().refresh_ahead_s / 4


@dataclass(frozen=True, slots=True)
class Endpoint:
    pop: str
    grpc: str
    admin: str
