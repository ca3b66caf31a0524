"""The UDP lookup's datagrams (docs/api.md#udp-lookup), shared by the node's listener
(dht.edge.udp) and the forwarder's client (dht.client.udp). Big-endian::

    request   version(1)=1 op(1) count(2)=N request_id(4)  N x 40-byte key
    answer    version(1)=1 code(1) count(2)=N request_id(4)  N x 32-byte result  (code 0)
                                                              UTF-8 error text     (code != 0)

``op`` 1 is a Lookup, 2 a Lookup with ``second_chance`` (docs/protocol.md#second-chance).
``1 <= N <= MAX_KEYS``; ``code`` is the gRPC status number of the same failure.
"""

from __future__ import annotations

import struct

VERSION = 1
OP_LOOKUP = 1
OP_LOOKUP_SECOND_CHANCE = 2
OPS = (OP_LOOKUP, OP_LOOKUP_SECOND_CHANCE)
HEADER = struct.Struct(">BBHI")  # version, op (request) or code (answer), count, request id
MAX_KEYS = 32  # a request of 32 keys stays within a 1500-byte MTU
