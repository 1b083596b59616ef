"""The tests' one X.509 certificate builder, and the PEM/DER encodings they write.

Every test certificate (the TLS peers' PKI in tests/peers.py, the chains that
`--check-config` is tested against, the DER blobs loaded into kernel keyrings)
is made by `issue_cert`, so a change in what a test certificate looks like is
made in one place.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# The issuer of a certificate: its certificate (or just its subject CN) and its key.
Issuer = tuple[x509.Certificate | str, PrivateKey]

DAY = datetime.timedelta(days=1)

# keyCertSign and cRLSign: what a CA certificate is for (RFC 5280, 4.2.1.3).
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip
# digitalSignature alone: all a TLS 1.3 end-entity key does (RFC 8446, 4.4.3).
LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def make_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key: quick to make and accepted by every TLS 1.3 stack under test."""
    return ec.generate_private_key(ec.SECP256R1())


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])


def issue_cert(
    subject: str,
    key: PrivateKey,
    issuer: Issuer | None = None,
    *,
    ca: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
    key_usage: x509.KeyUsage | None = None,
    key_ids: bool = False,
) -> x509.Certificate:
    """A certificate for `key` named CN=`subject`, signed by `issuer` (self-signed
    when None), valid from a day ago for a year unless told otherwise.

    Extensions beyond basicConstraints are added only when asked for, so a test
    can leave out exactly the one whose absence it is about.  `key_ids` adds the
    subject key identifier (and, when issued by another key, the authority key
    identifier) that OpenSSL and GnuTLS use to find an issuer.
    """
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer or (subject, key)
    issuer_name = issuer_cert.subject if isinstance(issuer_cert, x509.Certificate) else issuer_cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer_name if isinstance(issuer_name, x509.Name) else name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if key_ids:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def cert_pem(*certs: x509.Certificate) -> bytes:
    """The certificates as one PEM bundle, in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM, the form tlshd.conf's x509.private_key names."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_der(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER, the payload of a keyring key."""
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
