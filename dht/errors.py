"""One error taxonomy for the whole package, mapped to gRPC and HTTP in exactly one place.

Library code raises these; the gRPC servicer and the admin app translate them with
:func:`grpc_status` and :func:`http_status`. ``retryable`` tells a caller whether trying
again (possibly at another replica) can help.
"""

from __future__ import annotations

import grpc


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
    """A mutating admin call without the right token."""


class ConfigError(DhtError):
    """A configuration that cannot work (raised at start-up, before serving)."""


def grpc_status(err: DhtError) -> grpc.StatusCode:
    if isinstance(err, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    return grpc.StatusCode.INTERNAL


def http_status(err: DhtError) -> int:
    if isinstance(err, InvalidArgument):
        return 400
    if isinstance(err, PermissionDenied):
        return 403
    if isinstance(err, LimitExceeded):
        return 429
    if isinstance(err, Unavailable):
        return 503
    return 500


def from_grpc(code: grpc.StatusCode, details: str) -> DhtError:
    """The inverse mapping, for the client library: a failed call as a DhtError."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = details.partition(": ")
        return InvalidArgument(field, problem or details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LimitExceeded(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(details)
    # CANCELLED: the node stopped serving mid-call (a graceful stop): try another node.
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        return Unavailable(f"{code.name}: {details}")
    return DhtError(f"{code.name}: {details}")
