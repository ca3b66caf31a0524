"""The cluster's CA and certificates, and ``dht certs`` (docs/security.md#identities).

One directory holds one trust domain: ``ca.pem``/``ca.key`` and a certificate and key per
identity, named after it (``node-<pop>-<id>``, ``forwarder-<pop>-<name>``,
``operator-<name>``). Keys are EC P-256, signatures SHA-256; key files are mode 0600 and
every file is written whole or not at all (a temporary file renamed into place).

``cryptography`` is imported inside the functions: every ``dht`` command builds the parser
that registers ``dht certs``, and the import costs about as much again as the rest of the
command line's start.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dht.core.config import TlsConfig
from dht.core.identity import (
    SCHEME,
    Identity,
    Role,
    check_trust_domain,
    identity_uri,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# Names in the files ensure_cluster_certs makes: one forwarder per PoP, one operator.
FORWARDER_NAME = "fw"
OPERATOR_NAME = "admin"
# Certificates start 5 minutes in the past, so a peer whose clock is a little behind
# accepts a certificate made just now.
_BACKDATE = datetime.timedelta(minutes=5)
# ensure_cluster_certs replaces a certificate with less than this left to run.
_RENEW_BEFORE = datetime.timedelta(days=1)
_DNS = re.compile(
    r"(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


# --------------------------------------------------------------------------- paths


def default_dir() -> Path:
    """``$DHT_CERTS_DIR``, else ``$XDG_CONFIG_HOME/dht/certs`` (``~/.config/dht/certs``)."""
    if os.environ.get("DHT_CERTS_DIR"):
        return Path(os.environ["DHT_CERTS_DIR"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "dht" / "certs"


def add_certs_flags(p: Any, what: str) -> None:
    """``--certs-dir`` for the tools that start or call a local cluster."""
    p.add_argument(
        "--certs-dir",
        help=f"{what} (default: $DHT_CERTS_DIR, else ~/.config/dht/certs)",
    )


def certs_dir(args: argparse.Namespace) -> Path:
    return Path(args.certs_dir) if args.certs_dir else default_dir()


def client_tls(directory: Path | str, role: Role, pop: str = "") -> TlsConfig | None:
    """The TLS settings of the client certificate ``ensure_cluster_certs`` made for
    ``role`` (the operator, or the forwarder of ``pop``) in ``directory``: how ``dht ctl``,
    ``dht simulate`` and ``dht bench`` find a local cluster's credentials. None when the
    directory holds no such certificate."""
    directory = Path(directory)
    ca = directory / CA_CERT
    if not ca.exists():
        return None
    cluster = ca_cluster(directory)
    name = OPERATOR_NAME if role is Role.OPERATOR else FORWARDER_NAME
    cert, key = cert_paths(directory, Identity(role, cluster, pop, name))
    if not (cert.exists() and key.exists()):
        return None
    return TlsConfig(str(cert), str(key), str(ca))


def cert_paths(directory: Path | str, identity: Identity) -> tuple[Path, Path]:
    """(certificate, key) of an identity in directory."""
    if identity.role is Role.OPERATOR:
        stem = f"operator-{identity.name}"
    else:
        stem = f"{identity.role.value}-{identity.pop}-{identity.name}"
    d = Path(directory)
    return d / f"{stem}.pem", d / f"{stem}.key"


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes data whole or not at all, with exactly mode (the umask narrows os.open's)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- making


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _host_name(host: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS.fullmatch(host):
        raise ValueError(f"host {host!r}: want an IP address or a DNS name")
    return x509.DNSName(host.lower())


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days {days!r}: want a whole number >= 1")


def init_ca(
    directory: Path | str, cluster: str = "dht.local", days: int = 365, *, force: bool = False
) -> None:
    """Makes the CA of trust domain cluster: ``ca.pem`` and ``ca.key`` (mode 0600). Refuses
    to replace an existing CA unless force: every certificate it issued would stop working."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    check_trust_domain(cluster)
    _check_days(days)
    d = Path(directory)
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if not force:
        for p in (cert_path, key_path):
            if p.exists():
                raise FileExistsError(
                    f"{p} exists: a new CA would invalidate every certificate the old one "
                    "issued (force it with --force)"
                )
    key = _new_key()
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dht CA {cluster}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # The trust domain, as SPIFFE CA certificates carry it: what issue() reads back.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SCHEME + cluster)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)


def _read_ca(directory: Path, name: str) -> bytes:
    try:
        return (directory / name).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{directory / name}: no CA there (make one: dht certs init --dir {directory})"
        ) from None


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate(_read_ca(directory, CA_CERT))
    key = serialization.load_pem_private_key(_read_ca(directory, CA_KEY), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / CA_KEY}: not an EC private key")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
    return cert, key, _trust_domain(cert, directory / CA_CERT)


def _trust_domain(ca: x509.Certificate, where: Path) -> str:
    from cryptography import x509

    try:
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        domain = uri.removeprefix(SCHEME)
        if uri.startswith(SCHEME) and "/" not in domain:
            check_trust_domain(domain)
            return domain
    raise ValueError(f"{where}: no trust domain ({SCHEME}<cluster> SAN); not made by dht certs?")


def ca_cluster(directory: Path | str) -> str:
    """The trust domain of the CA in directory."""
    from cryptography import x509

    d = Path(directory)
    return _trust_domain(x509.load_pem_x509_certificate(_read_ca(d, CA_CERT)), d / CA_CERT)


def issue(
    directory: Path | str,
    identity: Identity,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 90,
) -> tuple[Path, Path]:
    """Issues identity a certificate signed by the CA in directory and returns (cert, key).
    SANs: the identity URI, then hosts (IP addresses as IP SANs, the rest as DNS names).
    Nodes may serve and call (serverAuth, clientAuth); forwarders and operators only call.
    The certificate never outlives the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _check_days(days)
    d = Path(directory)
    ca, ca_key, cluster = _load_ca(d)
    if identity.cluster != cluster:
        raise ValueError(
            f"{identity_uri(identity)}: the CA in {d} is for trust domain {cluster!r}, "
            f"not {identity.cluster!r}"
        )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(identity))]
    names += [_host_name(h) for h in dict.fromkeys(hosts)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.role is Role.NODE:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = cert_paths(d, identity)
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


# --------------------------------------------------------------------------- reusing


def _reusable(
    directory: Path, ca: x509.Certificate, identity: Identity, hosts: Sequence[str]
) -> bool:
    """Whether identity's files in directory can stay: a readable pair, issued by this CA
    for this identity and these hosts, with more than a day left."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    from dht.edge.identity import identity_of_cert

    cert_path, key_path = cert_paths(directory, identity)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    now = _now()
    have = {str(n.value).lower() for n in san if isinstance(n, x509.DNSName | x509.IPAddress)}
    want = {str(_host_name(h).value).lower() for h in hosts}
    return (
        key.public_key() == cert.public_key()
        and identity_of_cert(cert) == identity
        and cert.not_valid_before_utc <= now
        and cert.not_valid_after_utc > now + _RENEW_BEFORE
        and want <= have
    )


def ensure_cluster_certs(
    directory: Path | str,
    cluster: str,
    nodes: Sequence[tuple[str, str]],
    pops: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> None:
    """Everything a local cluster needs, made once: the CA if missing, a certificate per
    node (pop, node_id), a forwarder ``fw`` per PoP and an operator ``admin``. Files that
    are still good are kept, so running it again changes nothing."""
    d = Path(directory)
    if not (d / CA_CERT).exists() and not (d / CA_KEY).exists():
        init_ca(d, cluster)
    ca, _, have = _load_ca(d)
    if have != cluster:
        raise ValueError(f"the CA in {d} is for trust domain {have!r}, not {cluster!r}")
    if ca.not_valid_after_utc <= _now() + _RENEW_BEFORE:
        raise ValueError(f"the CA in {d} expires soon: make a new one (dht certs init --force)")
    wanted = [(Identity(Role.NODE, cluster, pop, node), tuple(hosts)) for pop, node in nodes]
    wanted += [(Identity(Role.FORWARDER, cluster, pop, FORWARDER_NAME), ()) for pop in pops]
    wanted.append((Identity(Role.OPERATOR, cluster, "", OPERATOR_NAME), ()))
    for identity, names in wanted:
        if not _reusable(d, ca, identity, names):
            issue(d, identity, hosts=names)


# --------------------------------------------------------------------------- reading


def describe(path: Path | str) -> dict[str, str]:
    """What ``dht certs show`` prints: identity URI, subject, issuer, SANs, not-after."""
    from cryptography import x509

    from dht.edge.identity import identity_of_cert

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    kinds: dict[type, str] = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
    }
    sans = [f"{kinds.get(type(n), type(n).__name__)}:{n.value}" for n in san]
    ident = identity_of_cert(cert)
    return {
        "identity": identity_uri(ident) if ident is not None else "-",
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": ", ".join(sans) or "-",
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


# --------------------------------------------------------------------------- dht certs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "certs",
        help="make the cluster's CA and certificates (mutual TLS)",
        description="Make and inspect the certificates of one trust domain. The directory "
        "defaults to $DHT_CERTS_DIR, else $XDG_CONFIG_HOME/dht/certs (~/.config/dht/certs).",
    )
    ops = p.add_subparsers(dest="certs_command", required=True)

    def op(name: str, help: str) -> argparse.ArgumentParser:
        o: argparse.ArgumentParser = ops.add_parser(name, help=help, description=help)
        o.add_argument("--dir", type=Path, default=None, help="certificate directory")
        return o

    o = op("init", "make the CA (ca.pem, ca.key)")
    o.add_argument("--cluster", default="dht.local", help="trust domain (default dht.local)")
    o.add_argument("--days", type=int, default=365, help="validity (default 365)")
    o.add_argument("--force", action="store_true", help="replace an existing CA")
    o = op("node", "issue a node certificate (server and client)")
    o.add_argument("--pop", required=True, help="PoP name")
    o.add_argument("--id", required=True, dest="name", metavar="ID", help="node id")
    o.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="DNS name or IP address the node is dialled at (repeatable; default "
        + " and ".join(DEFAULT_HOSTS)
        + ")",
    )
    o.add_argument("--days", type=int, default=90, help="validity (default 90, at most the CA's)")
    o = op("forwarder", "issue a forwarder certificate (client)")
    o.add_argument("--pop", required=True, help="PoP name")
    o.add_argument("--name", required=True)
    o.add_argument("--days", type=int, default=90, help="validity (default 90, at most the CA's)")
    o = op("operator", "issue an operator certificate (client)")
    o.add_argument("--name", required=True)
    o.add_argument("--days", type=int, default=90, help="validity (default 90, at most the CA's)")
    s = ops.add_parser("show", help="print a certificate's identity, subject, SANs, expiry")
    s.add_argument("file", type=Path)


def run_certs(args: argparse.Namespace) -> int:
    """``dht certs``. Exit status 0, 1 (a file problem), 2 (bad input)."""
    try:
        if args.certs_command == "show":
            for k, v in describe(args.file).items():
                print(f"{k}: {v}")
            return 0
        d: Path = args.dir if args.dir is not None else default_dir()
        if args.certs_command == "init":
            init_ca(d, args.cluster, args.days, force=args.force)
            print(f"{d / CA_CERT}\n{d / CA_KEY}")
            return 0
        role = Role(args.certs_command)
        pop = "" if role is Role.OPERATOR else args.pop
        identity = Identity(role, ca_cluster(d), pop, args.name)
        hosts = (args.hosts or DEFAULT_HOSTS) if role is Role.NODE else ()
        cert_path, key_path = issue(d, identity, hosts=hosts, days=args.days)
        print(f"{identity_uri(identity)}\n{cert_path}\n{key_path}")
        return 0
    except ValueError as e:
        print(f"dht certs: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dht certs: {e}", file=sys.stderr)
        return 1
