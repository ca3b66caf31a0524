"""dht: a distributed connection-ownership table for anycast networks.

See docs/architecture.md for the layout and docs/protocol.md for the rules.
"""

__version__ = "0.1.0"
