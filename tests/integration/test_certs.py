"""The cluster's CA and certificates (dht.tools.certs) and `dht certs`, through
dht.tools.cli.main, into a temporary directory (docs/security.md#identities)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dht.core.identity import Identity, Role
from dht.tools.certs import (
    ca_cluster,
    cert_paths,
    default_dir,
    ensure_cluster_certs,
    init_ca,
    issue,
)
from dht.tools.cli import main

NODE = Identity(Role.NODE, "dht.local", "ams", "ams-1")
FORWARDER = Identity(Role.FORWARDER, "dht.local", "ams", "fw")
OPERATOR = Identity(Role.OPERATOR, "dht.local", "", "admin")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dht(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["certs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- dht certs


def test_cli_init_node_forwarder_operator_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "certs"
    code, out, _ = dht(capsys, "init", "--dir", str(d), "--cluster", "edge.example")
    assert code == 0
    assert out.split() == [str(d / "ca.pem"), str(d / "ca.key")]
    assert mode(d / "ca.key") == 0o600 and mode(d) == 0o700
    assert ca_cluster(d) == "edge.example"

    hosts = ["--host", "10.0.0.1", "--host", "node1.example"]
    code, out, _ = dht(capsys, "node", "--pop", "ams", "--id", "ams-1", *hosts, "--dir", str(d))
    assert code == 0
    assert out.split() == [
        "spiffe://edge.example/node/ams/ams-1",
        str(d / "node-ams-ams-1.pem"),
        str(d / "node-ams-ams-1.key"),
    ]
    code, out, _ = dht(capsys, "forwarder", "--pop", "fra", "--name", "fw1", "--dir", str(d))
    assert code == 0
    assert out.split()[0] == "spiffe://edge.example/forwarder/fra/fw1"
    code, out, _ = dht(capsys, "operator", "--name", "alice", "--dir", str(d))
    assert code == 0
    assert out.split()[0] == "spiffe://edge.example/operator/alice"
    names = sorted(p.name for p in d.iterdir())
    assert names == [
        "ca.key",
        "ca.pem",
        "forwarder-fra-fw1.key",
        "forwarder-fra-fw1.pem",
        "node-ams-ams-1.key",
        "node-ams-ams-1.pem",
        "operator-alice.key",
        "operator-alice.pem",
    ]
    assert {mode(p) for p in d.glob("*.key")} == {0o600}

    code, out, _ = dht(capsys, "show", str(d / "node-ams-ams-1.pem"))
    assert code == 0
    shown = dict(line.split(": ", 1) for line in out.splitlines())
    assert shown["identity"] == "spiffe://edge.example/node/ams/ams-1"
    assert shown["subject"] == "CN=ams-1"
    assert shown["issuer"] == "CN=dht CA edge.example"
    assert shown["sans"] == (
        "URI:spiffe://edge.example/node/ams/ams-1, IP:10.0.0.1, DNS:node1.example"
    )
    assert shown["not_after"] == load(d / "node-ams-ams-1.pem").not_valid_after_utc.isoformat()
    code, out, _ = dht(capsys, "show", str(d / "operator-alice.pem"))
    assert "identity: spiffe://edge.example/operator/alice\n" in out
    assert "sans: URI:spiffe://edge.example/operator/alice\n" in out  # client-only: no hosts
    code, out, _ = dht(capsys, "show", str(d / "ca.pem"))
    assert code == 0 and "identity: -\n" in out and "sans: URI:spiffe://edge.example\n" in out


def test_cli_refusals_and_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert dht(capsys, "init", "--dir", d)[0] == 0
    before = (tmp_path / "ca.pem").read_bytes()
    code, out, err = dht(capsys, "init", "--dir", d)
    assert (code, out) == (1, "")
    assert "ca.pem exists" in err and "--force" in err
    assert (tmp_path / "ca.pem").read_bytes() == before
    assert dht(capsys, "init", "--dir", d, "--force")[0] == 0
    assert (tmp_path / "ca.pem").read_bytes() != before

    code, _, err = dht(capsys, "node", "--pop", "a/b", "--id", "n1", "--dir", d)
    assert code == 2 and "dht certs: error: pop 'a/b'" in err
    code, _, err = dht(capsys, "node", "--pop", "ams", "--id", "n1", "--host", "a b", "--dir", d)
    assert code == 2 and "host 'a b'" in err
    code, _, err = dht(capsys, "init", "--dir", str(tmp_path / "x"), "--cluster", "Not_DNS")
    assert code == 2 and "trust domain 'Not_DNS'" in err
    code, _, err = dht(capsys, "operator", "--name", "bob", "--dir", str(tmp_path / "empty"))
    assert code == 1 and "no CA there (make one: dht certs init" in err
    (tmp_path / "junk.pem").write_text("junk")
    assert dht(capsys, "show", str(tmp_path / "junk.pem"))[0] == 2
    assert dht(capsys, "show", str(tmp_path / "missing.pem"))[0] == 1
    with pytest.raises(SystemExit) as exit_:
        main(["certs", "node", "--pop", "ams", "--dir", d])  # --id missing
    assert exit_.value.code == 2


def test_cli_defaults_to_dht_certs_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DHT_CERTS_DIR", str(tmp_path / "env"))
    assert dht(capsys, "init")[0] == 0
    assert dht(capsys, "forwarder", "--pop", "ams", "--name", "fw")[0] == 0
    assert (tmp_path / "env" / "forwarder-ams-fw.pem").exists()


def test_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DHT_CERTS_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dir() == tmp_path / "home" / ".config" / "dht" / "certs"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "dht" / "certs"
    monkeypatch.setenv("DHT_CERTS_DIR", str(tmp_path / "explicit"))
    assert default_dir() == tmp_path / "explicit"


# --------------------------------------------------------------------------- the library


def test_issued_certificates(tmp_path: Path) -> None:
    init_ca(tmp_path, "dht.local", days=30)
    ca = load(tmp_path / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for identity in (NODE, FORWARDER, OPERATOR):
        cert_path, key_path = issue(tmp_path, identity, hosts=("127.0.0.1", "::1", "h.example"))
        assert (cert_path, key_path) == cert_paths(tmp_path, identity)
        cert = load(cert_path)
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha256"
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cn] == [identity.name]
        ext = cert.extensions
        assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
        ku = ext.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign
        eku = list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
        if identity.role is Role.NODE:
            assert eku == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        else:
            assert eku == [ExtendedKeyUsageOID.CLIENT_AUTH]
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://dht.local/{identity.role}/{identity.pop + '/' if identity.pop else ''}"
            f"{identity.name}"
        ]
        assert san.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1"),
        ]
        assert san.get_values_for_type(x509.DNSName) == ["h.example"]
        # Never outlives the CA (30 days, against the leaf's default 90).
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
        assert mode(key_path) == 0o600
    assert [p.name for p in cert_paths(tmp_path, OPERATOR)] == [
        "operator-admin.pem",
        "operator-admin.key",
    ]


def test_issue_refuses_another_trust_domain_and_a_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CA there"):
        issue(tmp_path, NODE)
    init_ca(tmp_path, "other.example")
    with pytest.raises(ValueError, match=r"for trust domain 'other\.example', not 'dht\.local'"):
        issue(tmp_path, NODE)
    with pytest.raises(FileExistsError):
        init_ca(tmp_path)
    with pytest.raises(ValueError, match="days"):
        issue(tmp_path, Identity(Role.NODE, "other.example", "ams", "n"), days=0)


def test_ensure_cluster_certs_is_idempotent(tmp_path: Path) -> None:
    nodes = [("ams", "ams-1"), ("ams", "ams-2"), ("fra", "fra-1")]
    ensure_cluster_certs(tmp_path, "dht.local", nodes, ["ams", "fra"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{stem}.{ext}"
        for stem in [
            "ca",
            "node-ams-ams-1",
            "node-ams-ams-2",
            "node-fra-fra-1",
            "forwarder-ams-fw",
            "forwarder-fra-fw",
            "operator-admin",
        ]
        for ext in ("pem", "key")
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ensure_cluster_certs(tmp_path, "dht.local", nodes, ["ams", "fra"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    # A missing key, a certificate for other hosts, a key of another certificate: remade.
    (tmp_path / "node-ams-ams-1.key").unlink()
    (tmp_path / "forwarder-fra-fw.key").write_bytes(before["forwarder-ams-fw.key"])
    ensure_cluster_certs(tmp_path, "dht.local", nodes, ["ams", "fra"], hosts=["127.0.0.1"])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == [
        "forwarder-fra-fw.key",
        "forwarder-fra-fw.pem",
        "node-ams-ams-1.key",
        "node-ams-ams-1.pem",
    ]
    ensure_cluster_certs(tmp_path, "dht.local", nodes, ["ams", "fra"], hosts=["10.1.2.3"])
    after2 = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(n for n in after2 if after2[n] != after[n]) == [
        f"node-{n}.{e}" for n in ("ams-ams-1", "ams-ams-2", "fra-fra-1") for e in ("key", "pem")
    ]
    # Certificates of a replaced CA are remade; a CA of another trust domain is refused.
    init_ca(tmp_path, "dht.local", force=True)
    ensure_cluster_certs(tmp_path, "dht.local", nodes[:1], [])
    load(tmp_path / "node-ams-ams-1.pem").verify_directly_issued_by(load(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match=r"trust domain 'dht\.local', not 'x\.example'"):
        ensure_cluster_certs(tmp_path, "x.example", nodes, [])
