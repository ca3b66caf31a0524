"""Who may call what, from the identity in the caller's certificate
(docs/security.md#roles).

With TLS configured every plane is mutual TLS: the handshake admits only certificates of
the cluster's CA, and these checks bind what a caller may do to who its certificate says
it is. Without TLS (loopback, or ``--insecure``) there is no identity and every check
passes: that mode trusts whoever reaches the ports.

* Peer plane (NodeInternal, PopLink, forwards): node certificates of this cluster only.
  NodeInternal and forwards only from nodes of this node's PoP, whose certificate names
  the ``from_node`` they claim; PopLink only from nodes of the PoP that ``from_pop``
  names, never this node's own.
* Public plane (FlowTable): a forwarder may look up anything, and claim, confirm,
  refresh, release and set affinity only for the PoP its certificate names; an operator
  may do anything; nodes use the peer plane.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from prometheus_client.metrics_core import Metric

from dht.core import metrics as m
from dht.core.config import NodeConfig
from dht.core.errors import PermissionDenied, Unauthenticated
from dht.core.identity import Identity, Role
from dht.core.ops import Op
from dht.edge.identity import peer_identity

Ctx = grpc.aio.ServicerContext[Any, Any]

# Why a call was refused: no identity in the certificate, another trust domain, a
# non-node on the peer plane, a from_node that is not the caller, a PopLink caller not of
# the PoP it names, a forwarder acting for another PoP, a node on the public plane.
REASONS = ("no_identity", "cluster", "peer", "from_node", "pop_link", "forwarder_pop", "public")


class Authorizer:
    """The checks of one node. ``cluster``: the trust domain of its CA (None: TLS off,
    no checks)."""

    def __init__(self, config: NodeConfig, cluster: str | None) -> None:
        self.config = config
        self.cluster = cluster
        # Calls refused, by reason (dht_auth_refused_total).
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)

    @property
    def enabled(self) -> bool:
        return self.cluster is not None

    def caller(self, context: Ctx) -> Identity | None:
        """The caller's identity; with TLS on, one of this cluster or an error."""
        if self.cluster is None:
            return None
        who = peer_identity(context)
        if who is None:
            self.refused["no_identity"] += 1
            raise Unauthenticated("the caller's certificate names no dht identity")
        if who.cluster != self.cluster:
            raise self._deny("cluster", f"{who.cluster!r} is not this cluster ({self.cluster!r})")
        return who

    def _deny(self, reason: str, message: str) -> PermissionDenied:
        self.refused[reason] += 1
        return PermissionDenied(message)

    def gauges(self) -> Iterable[Metric]:
        yield m.counter(
            "dht_auth_refused",
            "calls refused for the caller's identity (docs/security.md#roles), by reason",
            ["reason"],
            {(k,): float(v) for k, v in self.refused.items()},
        )

    def node_of_my_pop(self, context: Ctx, from_node: str | None = None) -> None:
        """NodeInternal and forwards: a node of this PoP (the one ``from_node`` names,
        where the call names one)."""
        who = self.caller(context)
        if who is None:
            return
        if who.role is not Role.NODE or who.pop != self.config.pop:
            raise self._deny(
                "peer",
                f"{who.role} {who.pop}/{who.name}: only nodes of PoP "
                f"{self.config.pop} may call the peer plane",
            )
        if from_node is not None and from_node != who.name:
            raise self._deny(
                "from_node", f"from_node {from_node!r} is not the caller ({who.name!r})"
            )

    def node_of_pop(self, context: Ctx, from_pop: int) -> None:
        """PopLink: a node of the PoP ``from_pop`` names, not of this node's own."""
        who = self.caller(context)
        if who is None:
            return
        name = self.config.pop_name(from_pop)
        if who.role is not Role.NODE or name is None or who.pop != name:
            raise self._deny(
                "pop_link",
                f"{who.role} {who.pop}/{who.name} may not speak for PoP {name or from_pop}",
            )
        if who.pop == self.config.pop:
            raise self._deny("pop_link", f"{who.pop}/{who.name}: PopLink is for other PoPs' nodes")

    def public(self, context: Ctx, op: Op, pop: int) -> None:
        """FlowTable on the public plane: forwarders for their own PoP, operators."""
        who = self.caller(context)
        if who is None or who.role is Role.OPERATOR:
            return
        if who.role is Role.FORWARDER:
            if not op.mutating:
                return
            # pop 0 = this node's PoP (dht.node.validate).
            name = self.config.pop if pop == 0 else self.config.pop_name(pop)
            if name == who.pop:
                return
            raise self._deny(
                "forwarder_pop",
                f"forwarder {who.pop}/{who.name} may {op.value} only for PoP {who.pop}, "
                f"not {name or pop}",
            )
        raise self._deny(
            "public",
            f"{who.role} {who.pop}/{who.name} may not call the public plane "
            "(nodes use the peer plane)",
        )
