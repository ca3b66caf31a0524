"""The one mapping between the error taxonomy (dht.core.errors) and gRPC / HTTP statuses.

Servicers and the admin app translate with :func:`grpc_status` and :func:`http_status`;
the client library turns a failed call back into an error with :func:`from_grpc`.
"""

from __future__ import annotations

import grpc

from dht.core.errors import (
    DhtError,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from dht.core.udp_wire import HEADER
from dht.core.wire import RESULT_SIZE


def grpc_status(err: DhtError) -> grpc.StatusCode:
    if isinstance(err, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.INTERNAL


def http_status(err: DhtError) -> int:
    if isinstance(err, InvalidArgument):
        return 400
    if isinstance(err, Unauthenticated):
        return 401
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
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(details)
    # CANCELLED: the node stopped serving mid-call (a graceful stop): try another node.
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        return Unavailable(f"{code.name}: {details}")
    return DhtError(f"{code.name}: {details}")


def code_of_number(number: int) -> grpc.StatusCode:
    """A gRPC status from its number (the UDP lookup's answers carry the number)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def udp_answer(data: bytes, count: int, where: str) -> bytes:
    """The result records of a UDP lookup answer to ``count`` keys (dht.core.udp_wire),
    or its error as the DhtError of the same gRPC status; an answer of the wrong size is
    a DhtError naming ``where`` it came from. The header is checked by the caller."""
    _, code, n, _ = HEADER.unpack_from(data)
    if code:
        raise from_grpc(code_of_number(code), data[HEADER.size :].decode(errors="replace"))
    if n != count or len(data) - HEADER.size != count * RESULT_SIZE:
        raise DhtError(f"{where}: answered {n} results for {count} keys")
    return data[HEADER.size :]
