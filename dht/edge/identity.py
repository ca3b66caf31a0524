"""Who is calling: the identity in the TLS certificate of an RPC's peer
(docs/security.md#identities).

What grpc.aio's ``context.auth_context()`` holds, found by trying it (grpcio 1.85, mutual
TLS, a certificate from ``dht certs``)::

    transport_security_type        [b'ssl']
    x509_common_name               [b'ams-1']
    x509_subject                   [b'CN=ams-1']
    x509_subject_alternative_name  [b'spiffe://dht.local/node/ams/ams-1', b'127.0.0.1',
                                    b'localhost']   (every SAN as text: the identity key)
    peer_uri                       [b'spiffe://dht.local/node/ams/ams-1']  (every URI SAN)
    peer_ip, peer_dns              the IP and DNS SANs
    peer_spiffe_id                 [b'spiffe://dht.local/node/ams/ams-1']
    x509_pem_cert                  [b'-----BEGIN CERTIFICATE-----...']
    security_level, ssl_*          [b'TSI_PRIVACY_AND_INTEGRITY'], version, group, ...

and over plaintext only ``transport_security_type [b'insecure']`` and ``security_level``.
gRPC sets ``peer_spiffe_id`` only when the certificate has exactly one URI SAN and it is a
``spiffe://`` URI (the SPIFFE rule for X.509 identities), so that key is the identity; it
is parsed strictly (``dht/core/identity.py``), once per distinct value. Without it (a
grpcio that does not set it) the certificate itself is read, once per distinct PEM.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from dht.core.identity import Identity, parse_identity_uri

if TYPE_CHECKING:
    from cryptography import x509

# Distinct identities the cache keeps: a cluster's nodes, forwarders and operators. Only
# certificates the CA signed get this far (the handshake checks them first).
_CACHED = 1024


@functools.lru_cache(maxsize=_CACHED)
def _parse(uri: bytes) -> Identity | None:
    try:
        return parse_identity_uri(uri.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def identity_of_cert(cert: x509.Certificate) -> Identity | None:
    """The identity a certificate names: its one URI SAN, if that parses; else None."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return _parse(uris[0].encode("ascii", "replace")) if len(uris) == 1 else None


@functools.lru_cache(maxsize=_CACHED)
def identity_of_pem(pem: bytes) -> Identity | None:
    """identity_of_cert of a PEM certificate (None if it does not load)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return identity_of_cert(cert)


def _only(values: Iterable[bytes]) -> bytes | None:
    one = list(values)
    return one[0] if len(one) == 1 else None


def identity_of_auth_context(auth: Mapping[str, Iterable[bytes]]) -> Identity | None:
    """The identity in a call's auth context (see the module docstring), None when the
    connection is plaintext or its certificate names no identity."""
    uri = auth.get("peer_spiffe_id")
    if uri is None:
        # A grpcio without peer_spiffe_id: the one URI SAN, or else the certificate.
        uri = auth.get("peer_uri")
        if uri is None:
            pem = _only(auth.get("x509_pem_cert", ()))
            return identity_of_pem(pem) if pem is not None else None
    one = _only(uri)
    return _parse(one) if one is not None else None


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
    """The identity of the caller of this RPC; None over plaintext or when its certificate
    names no identity. Costs one auth_context() (a few microseconds) and a cache hit."""
    return identity_of_auth_context(context.auth_context())
