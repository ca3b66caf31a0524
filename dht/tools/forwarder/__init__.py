"""``dht forwarder``: a reference per-PoP packet forwarder for Linux (docs/forwarder.md).

The data plane stays in the kernel: an nftables map steers known flows (flow -> mark)
and per-owner fwmark routing tables send marked packets to the owning PoP's next hop
over the backbone. Python sees only the packets that need a decision (NFQUEUE upcalls:
TCP SYN, FIN/RST, a flow unknown to the map, the first packet tunnelled in) and
decides them through ``dht.client.Forwarder``; conntrack events say when a handshake
completed and when a connection ended.

One module per concern:

- ``config``: the agent's validated, frozen configuration (from the command line);
- ``rules``: the kernel state it owns, as text and argument lists (pure);
- ``pins``: verdicts and pins: Outcome -> mark, pin timeouts, the map's batched updates
  (pure);
- ``conntrack``: conntrack event lines -> flow keys and states (pure), and the reader;
- ``system``: running ``nft``, ``iptables``, ``ip`` (setup, cleanup);
- ``agent``: the asyncio agent wiring NFQUEUE, the decisions, pins, conntrack, metrics;
- ``cli``: ``dht forwarder`` (arguments, signals, READY).

Needs the ``forwarder`` extra (``pip install 'dht[forwarder]'``: NetfilterQueue) and the
``nft``, ``iptables``/``ip6tables``, ``ip`` and ``conntrack`` tools; only ``agent``
imports NetfilterQueue, so the pure modules load without it.
"""
