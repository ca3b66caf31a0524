"""gRPC channels and credentials, for the client library and for a node's peer calls.

Kept apart from the servers so that a forwarder process (dht.client) loads only this.
"""

from __future__ import annotations

import asyncio

import grpc

from dht.core.config import TlsConfig

# Reconnect attempts at most 2 s apart (gRPC's default backoff grows to 120 s, which would
# keep a restarted node unused for minutes); a peer seen up again gets a fresh channel at
# once (GrpcPeerTransport.reset). The minimum backoff is also gRPC's connect timeout: 1 s,
# so a peer that is merely slow to accept is not taken for one that refuses.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 1_000),
    ("grpc.min_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Each channel its own connections: gRPC otherwise shares subchannels (and their
    # reconnect backoff) between all channels to one address in a process.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    ca = _read(tls.ca_file) if tls.ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: verify the server against the CA, present our cert."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file) if tls.ca_file else None,
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


def open_channel(address: str, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if creds is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)


def close_later(
    channel: grpc.aio.Channel, grace_s: float, closing: set[asyncio.Task[None]]
) -> None:
    """Close a channel that is no longer used, in the background: calls still on it end
    on their own within ``grace_s`` (give it the longest deadline, or closing cancels
    them). The task is kept in ``closing`` until done, for the owner's close() to await."""
    task = asyncio.get_running_loop().create_task(channel.close(grace=grace_s))
    closing.add(task)
    task.add_done_callback(closing.discard)
