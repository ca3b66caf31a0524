"""The caller's identity on a real grpc.aio server over mutual TLS on loopback
(docs/security.md#identities): what the certificates of dht.tools.certs yield, plaintext,
certificates that name no identity, and a certificate from another CA."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dht.core.identity import Identity, Role
from dht.edge.identity import (
    identity_of_auth_context,
    identity_of_cert,
    identity_of_pem,
    peer_identity,
)
from dht.tools.certs import init_ca, issue

CLUSTER = "dht.local"
NODE = Identity(Role.NODE, CLUSTER, "ams", "ams-2")
FORWARDER = Identity(Role.FORWARDER, CLUSTER, "ams", "fw")
OPERATOR = Identity(Role.OPERATOR, CLUSTER, "", "admin")


@dataclass
class Served:
    tls: str  # mutual-TLS address
    plain: str  # plaintext address
    ca: bytes
    dir: Path
    seen: list[tuple[Identity | None, Mapping[str, Iterable[bytes]]]]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    init_ca(tmp_path, CLUSTER)
    cert, key = issue(tmp_path, Identity(Role.NODE, CLUSTER, "ams", "ams-1"))
    seen: list[tuple[Identity | None, Mapping[str, Iterable[bytes]]]] = []

    async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append((peer_identity(context), context.auth_context()))
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=(tmp_path / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    tls_port = server.add_secure_port("127.0.0.1:0", creds)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(
            f"127.0.0.1:{tls_port}",
            f"127.0.0.1:{plain_port}",
            (tmp_path / "ca.pem").read_bytes(),
            tmp_path,
            seen,
        )
    finally:
        await server.stop(None)


async def call(address: str, creds: grpc.ChannelCredentials | None) -> None:
    channel = (
        grpc.aio.secure_channel(address, creds)
        if creds is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        assert await channel.unary_unary("/test.Who/Am")(b"", timeout=10) == b"ok"


def client_creds(s: Served, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(s.ca, key.read_bytes(), cert.read_bytes())


def signed_by_ca(directory: Path, uris: list[str]) -> tuple[bytes, bytes]:
    """A client certificate from the cluster's CA with these URI SANs (not dht certs')."""
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("identity", [NODE, FORWARDER, OPERATOR], ids=lambda i: i.role.value)
async def test_a_certificate_from_dht_certs_yields_its_identity(
    served: Served, identity: Identity
) -> None:
    hosts = ("127.0.0.1",) if identity.role is Role.NODE else ()
    cert, key = issue(served.dir, identity, hosts=hosts)
    await call(served.tls, client_creds(served, cert, key))
    await call(served.tls, client_creds(served, cert, key))
    assert [who for who, _ in served.seen] == [identity, identity]


async def test_grpc_puts_the_uri_in_peer_spiffe_id(served: Served) -> None:
    """What peer_identity reads (module docstring of dht/edge/identity.py): a grpcio that
    stops setting it still works (the certificate is read), but this test says so."""
    cert, key = issue(served.dir, NODE)
    await call(served.tls, client_creds(served, cert, key))
    _, auth = served.seen[0]
    uri = b"spiffe://dht.local/node/ams/ams-2"
    assert list(auth["peer_spiffe_id"]) == [uri]
    assert list(auth["peer_uri"]) == [uri]
    assert list(auth["x509_subject_alternative_name"]) == [uri, b"127.0.0.1", b"localhost"]
    assert list(auth["transport_security_type"]) == [b"ssl"]
    assert list(auth["x509_pem_cert"]) == [cert.read_bytes()]


async def test_plaintext_yields_none(served: Served) -> None:
    await call(served.plain, None)
    who, auth = served.seen[0]
    assert who is None
    assert list(auth["transport_security_type"]) == [b"insecure"]


@pytest.mark.parametrize(
    "uris",
    [
        [],
        ["https://dht.local/node/ams/x"],
        ["spiffe://dht.local/node/ams/x/"],  # gRPC takes it for a SPIFFE ID; we do not
        ["spiffe://dht.local/node/ams/x", "spiffe://dht.local/node/ams/y"],
        ["spiffe://dht.local/node/ams/x", "https://example.com/"],
    ],
    ids=["no-uri", "other-scheme", "bad-shape", "two-ids", "id-and-other-uri"],
)
async def test_a_certificate_that_names_no_one_identity_yields_none(
    served: Served, uris: list[str]
) -> None:
    key, cert = signed_by_ca(served.dir, uris)
    await call(served.tls, grpc.ssl_channel_credentials(served.ca, key, cert))
    who, auth = served.seen[0]
    assert who is None
    # The same verdict from the certificate itself.
    assert identity_of_pem(cert) is None
    assert identity_of_auth_context({"x509_pem_cert": list(auth["x509_pem_cert"])}) is None


async def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
    served: Served, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    init_ca(other, CLUSTER)
    cert, key = issue(other, FORWARDER)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(served.tls, client_creds(served, cert, key))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # No certificate at all is refused too (require_client_auth).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(served.tls, grpc.ssl_channel_credentials(served.ca))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert served.seen == []


def test_without_peer_spiffe_id_the_uri_or_the_certificate_is_read(tmp_path: Path) -> None:
    init_ca(tmp_path, CLUSTER)
    cert, _ = issue(tmp_path, FORWARDER)
    pem = cert.read_bytes()
    uri = b"spiffe://dht.local/forwarder/ams/fw"
    assert identity_of_auth_context({"peer_spiffe_id": [uri]}) == FORWARDER
    assert identity_of_auth_context({"peer_spiffe_id": [uri, uri]}) is None
    assert identity_of_auth_context({"peer_spiffe_id": [b"spiffe://dht.local/x/a/b"]}) is None
    assert identity_of_auth_context({"peer_spiffe_id": [b"\xff"]}) is None
    assert identity_of_auth_context({"peer_uri": [uri]}) == FORWARDER
    assert identity_of_auth_context({"peer_uri": [uri, b"https://x/"]}) is None
    assert identity_of_auth_context({"x509_pem_cert": [pem]}) == FORWARDER
    assert identity_of_auth_context({"x509_pem_cert": [b"not a certificate"]}) is None
    assert identity_of_auth_context({"transport_security_type": [b"insecure"]}) is None
    assert identity_of_cert(x509.load_pem_x509_certificate(pem)) == FORWARDER
    # The certificate is parsed once per distinct PEM.
    before = identity_of_pem.cache_info()
    for _ in range(3):
        assert identity_of_auth_context({"x509_pem_cert": [pem]}) == FORWARDER
    after = identity_of_pem.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)
