"""Prometheus metrics of one node, in a registry of its own (several nodes may share a
process in tests, and each must report only itself)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# gRPC batch calls take 100 µs .. 100 ms; a forwarded call adds a loopback round trip.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Gauges(Collector):
    """Values read at scrape time from the live objects (no double bookkeeping)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dht_requests", "gRPC calls by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "dht_request_seconds",
            "gRPC call latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.keys = Counter(
            "dht_keys",
            "keys handled by method and per-key status",
            ["method", "status"],
            registry=r,
        )
        self.forwarded = Counter(
            "dht_forwarded_keys", "keys forwarded one hop to their owning node", registry=r
        )
        self.forward_errors = Counter(
            "dht_forward_errors",
            "forwarded calls that failed (keys answered UNAVAILABLE)",
            registry=r,
        )

    def add_gauges(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Gauges(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    fam = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values.items():
        fam.add_metric(list(label_values), value)
    return fam


def counter(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    """A monotonic count kept by a pure object (store, replicator), read at scrape time."""
    fam = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values.items():
        fam.add_metric(list(label_values), value)
    return fam
