"""dht: a distributed connection-ownership table for anycast networks.

See README.md for the architecture and DESIGN.md (in the planning repo) for the rules.
"""

__version__ = "0.1.0"
