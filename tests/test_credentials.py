"""Credentials loading and the PKI cross-checks of check-config.

Each test builds a throw-away PKI with cryptography, writes a config naming
it, and looks at what load_credentials / check_config make of it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.helpers.certs import DAY, cert_pem, issue_cert, key_pem, make_key, name
from tlshd.config import ConfigKey, Finding, check_config, load_config
from tlshd.credentials import (
    CredentialsError,
    load_credentials,
)

NOW = datetime.datetime.now(datetime.UTC)


def write(path: Path, data: bytes, mode: int = 0o644) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@dataclass
class Pki:
    """A CA, an intermediate and a server leaf, written to `root`."""

    root: Path
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=make_key)
    int_key: ec.EllipticCurvePrivateKey = field(default_factory=make_key)
    leaf_key: ec.EllipticCurvePrivateKey = field(default_factory=make_key)

    def __post_init__(self) -> None:
        self.ca = issue_cert("Test CA", self.ca_key, ca=True)
        self.intermediate = issue_cert(
            "Test Intermediate", self.int_key, ("Test CA", self.ca_key), ca=True
        )
        self.leaf = self.issue_leaf()
        self.truststore = write(self.root / "ca.pem", cert_pem(self.ca))
        self.certificate = self.write_chain(self.leaf)
        self.private_key = write(self.root / "server.key", key_pem(self.leaf_key), 0o600)

    def issue_leaf(self, **changes: Any) -> x509.Certificate:
        """The server leaf (for leaf_key, from the intermediate), with `changes`."""
        attrs: dict[str, Any] = {
            "eku": [ExtendedKeyUsageOID.SERVER_AUTH],
            "sans": [x509.DNSName("server.example")],
        }
        return issue_cert(
            "server.example", self.leaf_key, ("Test Intermediate", self.int_key), **attrs | changes
        )

    def write_chain(self, leaf: x509.Certificate) -> str:
        """Make `leaf` and the intermediate the configured x509.certificate."""
        return write(self.root / "server.pem", cert_pem(leaf, self.intermediate))

    def crl(self, issuer_name: str, issuer_key: ec.EllipticCurvePrivateKey) -> str:
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(name(issuer_name))
            .last_update(NOW - DAY)
            .next_update(NOW + 7 * DAY)
            .sign(issuer_key, hashes.SHA256())
        )
        return write(self.root / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))

    def config(self, extra: str = "", **overrides: str) -> str:
        keys = {
            "x509.truststore": self.truststore,
            "x509.certificate": self.certificate,
            "x509.private_key": self.private_key,
        }
        keys.update(
            {k.replace("x509_", "x509.").replace("pq_", "pq."): v for k, v in overrides.items()}
        )
        body = "".join(f"{k} = {v}\n" for k, v in keys.items() if v)
        path = self.root / "config"
        # An explicit worker account: whether this machine has `tlshd` must not
        # change what --check-config says about the credentials.
        path.write_text(f"[worker]\nuser=nobody\n[authenticate.server]\n{body}{extra}")
        return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def warnings(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "warning"]


def messages(findings: list[Finding]) -> str:
    return "\n".join(str(f) for f in findings)


# --- loading ---------------------------------------------------------------------------


def test_load_good_pki(pki: Pki) -> None:
    creds = load_credentials(load_config(pki.config()))
    server = creds.server
    assert server.cert_chain_pem == cert_pem(pki.leaf, pki.intermediate)
    assert server.truststore_pem == cert_pem(pki.ca)
    assert server.crl_pem is None
    loaded = serialization.load_pem_private_key(server.private_key_pem or b"", None)
    assert loaded.private_numbers() == pki.leaf_key.private_numbers()
    assert creds.client.cert_chain_pem is None


def test_load_missing_file_names_file_and_key(pki: Pki) -> None:
    missing = str(pki.root / "nope.pem")
    with pytest.raises(CredentialsError) as info:
        load_credentials(load_config(pki.config(x509_truststore=missing)))
    assert info.value.file == missing
    assert "[authenticate.server] x509.truststore" in str(info.value)
    assert "not found" in str(info.value)


def test_load_unreadable_file(pki: Pki) -> None:
    # A directory stands in for an unreadable file: root may read mode-000 files.
    with pytest.raises(CredentialsError, match="is a directory"):
        load_credentials(load_config(pki.config(x509_certificate=str(pki.root))))


def test_load_garbage_certificate(pki: Pki) -> None:
    bad = write(
        pki.root / "bad.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CredentialsError, match=r"x509.certificate: bad PEM certificate"):
        load_credentials(load_config(pki.config(x509_certificate=bad)))
    empty = write(pki.root / "empty.pem", b"hello\n")
    with pytest.raises(CredentialsError, match="no PEM CERTIFICATE block"):
        load_credentials(load_config(pki.config(x509_certificate=empty)))


def test_load_mismatched_key(pki: Pki) -> None:
    other = write(pki.root / "other.key", key_pem(make_key()), 0o600)
    with pytest.raises(CredentialsError, match="does not match the certificate"):
        load_credentials(load_config(pki.config(x509_private_key=other)))


def test_load_encrypted_key(pki: Pki) -> None:
    enc = pki.leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = write(pki.root / "enc.key", enc, 0o600)
    with pytest.raises(CredentialsError, match="encrypted private keys are not supported"):
        load_credentials(load_config(pki.config(x509_private_key=path)))


def test_load_pkcs11_url_is_rejected(pki: Pki) -> None:
    with pytest.raises(CredentialsError, match=r"URLs .* are not supported"):
        load_credentials(load_config(pki.config(x509_private_key="pkcs11:object=tls")))


def test_crl_is_loaded(pki: Pki) -> None:
    crl = pki.crl("Test CA", pki.ca_key)
    creds = load_credentials(load_config(pki.config(x509_crl=crl)))
    assert creds.server.crl_pem and b"BEGIN X509 CRL" in creds.server.crl_pem


# --- check-config ------------------------------------------------------------------------


def test_check_good_pki_is_clean(pki: Pki) -> None:
    findings = check_config(load_config(pki.config()))
    assert findings == [], messages(findings)


def test_check_mismatched_key(pki: Pki) -> None:
    other = write(pki.root / "other.key", key_pem(make_key()), 0o600)
    findings = errors(check_config(load_config(pki.config(x509_private_key=other))))
    assert len(findings) == 1
    assert findings[0].file == other
    assert findings[0].key == ConfigKey("authenticate.server", "x509.private_key")
    assert "does not match" in findings[0].message


def test_check_expired_and_not_yet_valid(pki: Pki) -> None:
    for kwargs, text in (
        ({"not_before": NOW - 10 * DAY, "not_after": NOW - DAY}, "expired"),
        ({"not_before": NOW + DAY, "not_after": NOW + 10 * DAY}, "not valid before"),
    ):
        pki.write_chain(pki.issue_leaf(**kwargs))
        found = errors(check_config(load_config(pki.config())))
        assert [f.key for f in found] == [ConfigKey("authenticate.server", "x509.certificate")]
        assert text in found[0].message


def test_check_expiring_soon_is_a_warning(pki: Pki) -> None:
    pki.write_chain(pki.issue_leaf(not_after=NOW + 3 * DAY))
    findings = check_config(load_config(pki.config()))
    assert not errors(findings)
    assert "expires soon" in messages(findings)


def test_check_unreadable_and_missing_files(pki: Pki) -> None:
    missing = str(pki.root / "missing.key")
    path = pki.config(x509_private_key=missing, x509_truststore=str(pki.root))
    found = errors(check_config(load_config(path)))
    by_key = {f.key: f for f in found}
    assert "not found" in by_key[ConfigKey("authenticate.server", "x509.private_key")].message
    assert "is a directory" in by_key[ConfigKey("authenticate.server", "x509.truststore")].message


def test_check_key_mode_and_owner(pki: Pki) -> None:
    os.chmod(pki.private_key, 0o644)
    os.chown(pki.certificate, 65534, -1)
    try:
        os.chmod(pki.truststore, 0o666)
        findings = check_config(load_config(pki.config()))
    finally:
        os.chown(pki.certificate, os.getuid(), -1)
    assert not errors(findings)
    text = messages(findings)
    assert "mode 0644 lets group/other read the key; expected 0600" in text
    assert "group/other-writable" in text
    if os.getuid() == 0:
        assert "owned by uid 65534, expected root" in text
    os.chmod(pki.private_key, 0o640)
    text = messages(check_config(load_config(pki.config())))
    assert "mode 0640 lets group/other read the key" in text


def test_check_chain_not_to_truststore(pki: Pki) -> None:
    other_ca = issue_cert("Other CA", make_key(), ca=True)
    write(pki.root / "ca.pem", cert_pem(other_ca))
    findings = check_config(load_config(pki.config()))
    assert not errors(findings)
    (warn,) = warnings(findings)
    assert "does not chain to [authenticate.server] x509.truststore" in warn.message
    assert "Test Intermediate" in warn.message


def test_check_chain_missing_intermediate(pki: Pki) -> None:
    write(pki.root / "server.pem", cert_pem(pki.leaf))
    (warn,) = warnings(check_config(load_config(pki.config())))
    assert "no issuer found for CN=server.example" in warn.message


def test_check_eku(pki: Pki) -> None:
    leaf = issue_cert(
        "client.example",
        pki.leaf_key,
        ("Test Intermediate", pki.int_key),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    cert = write(pki.root / "client.pem", cert_pem(leaf, pki.intermediate))
    path = pki.root / "config"
    path.write_text(
        "[authenticate.client]\n"
        f"x509.truststore = {pki.truststore}\n"
        f"x509.certificate = {cert}\n"
        f"x509.private_key = {pki.private_key}\n"
    )
    (warn,) = warnings(check_config(load_config(str(path))))
    assert warn.key == ConfigKey("authenticate.client", "x509.certificate")
    assert "lacks clientAuth" in warn.message


def test_check_crl_issuer(pki: Pki) -> None:
    good = pki.crl("Test CA", pki.ca_key)
    assert check_config(load_config(pki.config(x509_crl=good))) == []
    stranger = pki.crl("Stranger CA", make_key())
    (warn,) = warnings(check_config(load_config(pki.config(x509_crl=stranger))))
    assert "CRL issuer CN=Stranger CA is not in the trust store" in warn.message


def test_check_half_configured_role(pki: Pki) -> None:
    found = errors(check_config(load_config(pki.config(x509_private_key=""))))
    assert [f.key for f in found] == [ConfigKey("authenticate.server", "x509.private_key")]
    assert "x509.certificate is set but x509.private_key is not" in found[0].message


def write_pq_pair(pki: Pki, key: object | None = None) -> tuple[str, str, object]:
    """An ML-DSA-65 server leaf from the test intermediate: (cert, key, key object)."""
    pq_key = mldsa.MLDSA65PrivateKey.generate()
    leaf = issue_cert(
        "server.example",
        pq_key,
        ("Test Intermediate", pki.int_key),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[x509.DNSName("server.example")],
    )
    cert = write(pki.root / "server-mldsa.pem", cert_pem(leaf, pki.intermediate))
    stored = key if key is not None else pq_key
    keyfile = write(pki.root / "server-mldsa.key", key_pem(stored), 0o600)  # type: ignore[arg-type]
    return cert, keyfile, pq_key


def test_pq_pair_loads_and_checks_clean(pki: Pki) -> None:
    cert, key, _ = write_pq_pair(pki)
    config = load_config(pki.config(x509_pq_certificate=cert, x509_pq_private_key=key))
    findings = check_config(config)
    assert not errors(findings), messages(findings)
    assert not [f for f in findings if "pq" in str(f.key)], messages(findings)
    server = load_credentials(config).server
    assert server.pq_cert_chain_pem is not None and server.pq_private_key_pem is not None
    assert b"BEGIN PRIVATE KEY" in server.pq_private_key_pem
    assert server.cert_chain_pem != server.pq_cert_chain_pem


def test_pq_pair_half_configured(pki: Pki) -> None:
    cert, _key, _ = write_pq_pair(pki)
    config = load_config(pki.config(x509_pq_certificate=cert))
    found = errors(check_config(config))
    assert [f.key for f in found] == [ConfigKey("authenticate.server", "x509.pq.private_key")]
    with pytest.raises(CredentialsError, match=r"x509\.pq\.certificate is set"):
        load_credentials(config)


def test_pq_key_must_be_ml_dsa(pki: Pki) -> None:
    cert, key, _ = write_pq_pair(pki, key=make_key())
    config = load_config(pki.config(x509_pq_certificate=cert, x509_pq_private_key=key))
    found = errors(check_config(config))
    assert [f.key for f in found] == [ConfigKey("authenticate.server", "x509.pq.private_key")]
    assert "not an ML-DSA key" in found[0].message
    with pytest.raises(CredentialsError, match="not an ML-DSA key"):
        load_credentials(config)


def test_pq_key_must_match_its_certificate(pki: Pki) -> None:
    cert, key, _ = write_pq_pair(pki, key=mldsa.MLDSA65PrivateKey.generate())
    config = load_config(pki.config(x509_pq_certificate=cert, x509_pq_private_key=key))
    found = errors(check_config(config))
    assert [f.key for f in found] == [ConfigKey("authenticate.server", "x509.pq.private_key")]
    assert "does not match" in found[0].message
    with pytest.raises(CredentialsError, match="does not match"):
        load_credentials(config)


def test_check_url_key_is_error(pki: Pki) -> None:
    found = errors(check_config(load_config(pki.config(x509_private_key="pkcs11:id=%01"))))
    assert found and "not supported" in found[0].message
