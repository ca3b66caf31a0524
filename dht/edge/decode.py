"""Requests whose bytes are not the expected protobuf message: INVALID_ARGUMENT.

grpc.aio answers a request its deserializer cannot parse with UNKNOWN and logs a
traceback, as if the servicer had a bug. :func:`add_checked` registers a generated
servicer (``add_XServicer_to_server``) with every request deserializer wrapped: bytes
that do not parse become an :class:`Undecodable` marker, and the wrapped method answers
it with INVALID_ARGUMENT naming the message type, before the servicer sees anything.
A bad message inside a request stream ends the stream the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)


class Undecodable:
    """A request whose bytes did not parse as ``message``."""

    __slots__ = ("error", "message")

    def __init__(self, message: str, error: str) -> None:
        self.message = message
        self.error = error

    def details(self) -> str:
        return f"request is not a valid {self.message}: {self.error}"


def _deserializer(inner: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # The generated code passes ``Message.FromString``; its class names the message.
    owner = getattr(inner, "__self__", None)
    name = getattr(owner, "__name__", "request message")

    def deserialize(raw: bytes) -> Any:
        try:
            return inner(raw)
        except Exception as e:  # DecodeError, or any other parse failure
            return Undecodable(name, str(e) or type(e).__name__)

    return deserialize


async def _refuse(context: Any, bad: Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.details())


def _checked_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async def gen() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            yield request

    return gen()


def _wrap(handler: Any) -> Any:
    """The same method handler with its request deserializer and behaviour checked."""
    if handler.request_deserializer is None:
        return handler
    fields: dict[str, Any] = {"request_deserializer": _deserializer(handler.request_deserializer)}
    if handler.unary_unary is not None:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            return await uu(request, context)

        fields["unary_unary"] = unary_unary
    elif handler.unary_stream is not None:
        us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in us(request, context):
                yield response

        fields["unary_stream"] = unary_stream
    elif handler.stream_unary is not None:
        su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            return await su(_checked_stream(requests, context), context)

        fields["stream_unary"] = stream_unary
    elif handler.stream_stream is not None:
        ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in ss(_checked_stream(requests, context), context):
                yield response

        fields["stream_stream"] = stream_stream
    return handler._replace(**fields)


class _Registrar:
    """Stands in for the server while a generated ``add_XServicer_to_server`` runs: it
    keeps the method handlers, wrapped, and registers them on the real server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # The generated code calls add_registered_method_handlers next with the same
        # handlers, in a form this class can wrap: registration happens there.
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {name: _wrap(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self._server.add_registered_method_handlers(service, wrapped)


def add_checked(add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """``add(servicer, server)`` (a generated ``add_XServicer_to_server``), with every
    request that does not decode answered INVALID_ARGUMENT."""
    add(servicer, _Registrar(server))
