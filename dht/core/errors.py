"""One error taxonomy for the whole package.

Library code raises these; the edge maps them to gRPC and HTTP statuses in exactly one
place (dht.edge.status). ``retryable`` tells a caller whether trying again (possibly at
another replica) can help. No grpc here: the core stays free of any wire.
"""

from __future__ import annotations


class DhtError(Exception):
    """Base of every error this package raises on purpose."""

    retryable = False


class InvalidArgument(DhtError):
    """The caller sent something malformed. The message names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class LimitExceeded(DhtError):
    """A request exceeds a configured limit (batch size, ...)."""


class Unavailable(DhtError):
    """The node or a replica cannot serve now; another replica or a later try may."""

    retryable = True


class NotReady(Unavailable):
    """The node is starting or stopping."""


class PermissionDenied(DhtError):
    """A caller whose identity (certificate, admin token) does not allow the call."""


class Unauthenticated(DhtError):
    """A caller with no identity where one is required (docs/security.md#roles)."""


class ConfigError(DhtError):
    """A configuration that cannot work (raised at start-up, before serving)."""
