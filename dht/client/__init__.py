"""The client layer: what a packet forwarder links against (docs/api.md).

``Client`` routes batch calls to the owning nodes of a PoP; ``Forwarder`` adds the cache,
coalescing, micro-batching and the decision table. This layer imports nothing from the
node, the stores, the edge servers or aiohttp, so a forwarder process loads none of them.
"""

from dht.client.cache import Answer, CacheLimits
from dht.client.client import Client
from dht.client.forwarder import Forwarder, ForwarderConfig, ForwarderStats, Outcome

__all__ = [
    "Answer",
    "CacheLimits",
    "Client",
    "Forwarder",
    "ForwarderConfig",
    "ForwarderStats",
    "Outcome",
]
