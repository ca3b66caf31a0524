"""The metrics of a node's links to the other PoPs and of what it received from them."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

from prometheus_client.core import Metric

from dht.core import metrics as m
from dht.core.wire import ENTRY_SIZE
from dht.pops.link import PeerPop
from dht.pops.shipping import SHIPPED_KINDS


def pop_metrics(
    links: Collection[PeerPop],
    received: Mapping[str, int],
    conflicts: int,
    rejected: int,
    skipped: Mapping[str, int],
    delayed: int,
) -> Iterator[Metric]:
    """``received``: records per sending PoP; ``conflicts``, ``rejected``: received copies
    that conflicted, refused for their clocks; ``skipped``: written copies not shipped,
    per call; ``delayed``: records in the delay line."""
    lag: dict[tuple[str, ...], float] = {}
    for link in links:
        for q, label in ((0.5, "0.5"), (0.99, "0.99")):
            v = link.lag.quantile(q)
            if v is not None:
                lag[(link.name, label)] = v / 1000
    yield m.gauge(
        "dht_pop_replication_lag_seconds",
        "queued -> acknowledged by the peer PoP's write quorum, recent batches",
        ["peer_pop", "quantile"],
        lag,
    )
    yield m.gauge(
        "dht_pop_link_up",
        "1 if the peer PoP answered last",
        ["peer_pop"],
        {(lk.name,): float(lk.up) for lk in links},
    )
    yield m.gauge(
        "dht_pop_ship_queue_records",
        "records waiting or in flight to the peer PoP (the resend buffer)",
        ["peer_pop"],
        {(lk.name,): float(len(lk.queue)) for lk in links},
    )
    yield m.counter(
        "dht_pop_shipped_batches",
        "batches acknowledged by the peer PoP",
        ["peer_pop"],
        {(lk.name,): lk.stats.batches for lk in links},
    )
    records: dict[tuple[str, ...], float] = {}
    nbytes: dict[tuple[str, ...], float] = {}
    for lk in links:
        for kind in SHIPPED_KINDS:
            n = lk.stats.records.get(kind, 0)
            records[(lk.name, kind.name.lower())] = n
            nbytes[(lk.name, kind.name.lower())] = n * ENTRY_SIZE
    yield m.counter(
        "dht_pop_shipped_records",
        "records acknowledged by the peer PoP, by kind",
        ["peer_pop", "kind"],
        records,
    )
    yield m.counter(
        "dht_pop_shipped_bytes",
        "record bytes acknowledged by the peer PoP, by kind",
        ["peer_pop", "kind"],
        nbytes,
    )
    yield m.counter(
        "dht_pop_resends",
        "batches sent again after a failure",
        ["peer_pop"],
        {(lk.name,): lk.stats.resends for lk in links},
    )
    yield m.counter(
        "dht_pop_ship_dropped",
        "records not queued: the resend buffer was full",
        ["peer_pop"],
        {(lk.name,): lk.queue.dropped for lk in links},
    )
    yield m.counter(
        "dht_pop_resyncs",
        "bulk resyncs completed (start-up, fell behind)",
        ["peer_pop"],
        {(lk.name,): lk.stats.resyncs for lk in links},
    )
    yield m.counter(
        "dht_pop_anti_entropy_rounds",
        "digest comparisons with the peer PoP",
        ["peer_pop"],
        {(lk.name,): lk.stats.ae_rounds for lk in links},
    )
    yield m.counter(
        "dht_pop_anti_entropy_records",
        "records exchanged by anti-entropy and resync",
        ["peer_pop", "direction"],
        {
            **{(lk.name, "pulled"): lk.stats.pulled for lk in links},
            **{(lk.name, "pushed"): lk.stats.pushed for lk in links},
        },
    )
    yield m.counter(
        "dht_pop_received_records",
        "records received from other PoPs (shipped or pulled)",
        ["from_pop"],
        {(n,): v for n, v in received.items()},
    )
    yield m.counter(
        "dht_pop_conflicts_resolved",
        "received copies that conflicted with ours (same generation, other birth)",
        [],
        {(): conflicts},
    )
    yield m.counter(
        "dht_pop_clock_rejections",
        "received records refused: birth beyond the clock offset",
        [],
        {(): rejected},
    )
    yield m.counter(
        "dht_pop_ship_skipped",
        "written copies not shipped (policy), by call",
        ["method"],
        {(k,): v for k, v in skipped.items()},
    )
    yield m.gauge(
        "dht_pop_delay_line",
        "established records waiting to be replicate_after_s old",
        [],
        {(): float(delayed)},
    )
