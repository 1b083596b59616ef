"""Key material of one configuration generation, parsed and checked.

Private keys are root-only files (mode 0600), and workers run unprivileged,
so the privileged supervisor reads every file named in the config
(tlshd/pemfiles.py), once per config generation, and the parsed material
reaches the workers through fork's copy-on-write memory.

`load_credentials` is strict: any configured file that is missing,
unreadable or unparseable raises `CredentialsError`, naming the file and the
key.  At start the zygote runs it on the bytes the supervisor read (`files=`),
and an error stops the daemon (exit 1); on reload the supervisor runs it
itself, and the old generation keeps serving if the new one does not load.

Upstream silently falls back to the system trust store when `x509.truststore`
is inaccessible.  We never do: a broken trust store is an error, because a
fallback would widen trust from one private CA to every public one.

`check_credentials` adds advisory cross-checks (expiry, key/cert match, chain,
CRL issuer, file modes, EKU) for `tlshd --check-config`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from tlshd.config import Config, ConfigKey, Finding, RoleConfig
from tlshd.keyformats import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from tlshd.pemfiles import ROLES, CredentialFiles, key_label, read_file, reject_url
from tlshd.pemfiles import CredentialsError as CredentialsError  # callers import it from here

Certs = list[x509.Certificate]
Crls = list[x509.CertificateRevocationList]

_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
# Key types a TLS 1.3 signature algorithm exists for.
_TLS13_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
               ed448.Ed448PrivateKey)  # fmt: skip
# ML-DSA (FIPS 204) keys for x509.pq.*: TLS 1.3 signature schemes 0x0904-0x0906
_PQ_KEYS = (mldsa.MLDSA44PrivateKey, mldsa.MLDSA65PrivateKey, mldsa.MLDSA87PrivateKey)
_EXPIRY_WARNING = datetime.timedelta(days=30)

log = logging.getLogger("tlshd")


@dataclass(frozen=True)
class RoleCredentials:
    """PEM bytes for one role; None means "not configured"."""

    cert_chain_pem: bytes | None = None  # leaf first, then intermediates
    private_key_pem: bytes | None = None
    truststore_pem: bytes | None = None  # None: use the system trust store
    crl_pem: bytes | None = None  # None: no CRL check
    # x509.pq.*: an ML-DSA pair beside the classic one; OpenSSL presents the
    # one the peer's signature_algorithms allow (ML-DSA first if both)
    pq_cert_chain_pem: bytes | None = None
    pq_private_key_pem: bytes | None = None


@dataclass(frozen=True)
class Credentials:
    client: RoleCredentials = field(default_factory=RoleCredentials)
    server: RoleCredentials = field(default_factory=RoleCredentials)

    def role(self, name: str) -> RoleCredentials:
        return self.client if name == "client" else self.server


# --- reading and parsing -----------------------------------------------------------


def pem_blocks(data: bytes, kind: bytes) -> list[bytes]:
    """DER bodies of the PEM blocks labelled `kind` (e.g. b"CERTIFICATE")."""
    blocks = []
    for label, body in _PEM_RE.findall(data):
        if label == kind:
            blocks.append(base64.b64decode(b"".join(body.split()), validate=True))
    return blocks


def parse_certificates(data: bytes, path: str, label: ConfigKey) -> list[x509.Certificate]:
    """Every CERTIFICATE block of a PEM file, in file order."""
    try:
        ders = pem_blocks(data, b"CERTIFICATE")
        certs = [x509.load_der_x509_certificate(der) for der in ders]
    except (ValueError, binascii.Error) as err:
        raise CredentialsError(path, label, f"bad PEM certificate: {err}") from None
    if not certs:
        raise CredentialsError(path, label, "no PEM CERTIFICATE block found")
    return certs


def parse_private_key(
    data: bytes, path: str, label: ConfigKey, *, pq: bool = False
) -> PrivateKeyTypes:
    """The PEM private key in `data`; CredentialsError if it is unusable for TLS
    1.3 (`pq`: unless it is an ML-DSA key, what x509.pq.private_key holds)."""
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise CredentialsError(path, label, "encrypted private keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CredentialsError(path, label, f"not a PEM private key: {err}") from None
    if pq and not isinstance(key, _PQ_KEYS):
        raise CredentialsError(path, label, f"not an ML-DSA key but {type(key).__name__}")
    if not pq and not isinstance(key, _TLS13_KEYS):
        raise CredentialsError(path, label, f"{type(key).__name__} keys cannot sign in TLS 1.3")
    return key


def parse_crls(data: bytes, path: str, label: ConfigKey) -> list[x509.CertificateRevocationList]:
    try:
        crls = [x509.load_der_x509_crl(der) for der in pem_blocks(data, b"X509 CRL")]
    except (ValueError, binascii.Error) as err:
        raise CredentialsError(path, label, f"bad PEM CRL: {err}") from None
    if not crls:
        raise CredentialsError(path, label, "no PEM X509 CRL block found")
    return crls


def _spki(key: object) -> bytes:
    # Any public key type of cryptography's has public_bytes; object keeps the callers simple.
    der: bytes = key.public_bytes(  # type: ignore[attr-defined]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    return der


def key_matches_certificate(key: object, cert: x509.Certificate) -> bool:
    # `key` is any private key type of cryptography's; each has public_key().
    return _spki(key.public_key()) == _spki(cert.public_key())  # type: ignore[attr-defined]


def _pem(objects: list[x509.Certificate] | list[x509.CertificateRevocationList]) -> bytes:
    return b"".join(o.public_bytes(Encoding.PEM) for o in objects)


# How a loader gets a file's bytes: read_file, or CredentialFiles.read.
Reader = Callable[[str, ConfigKey], bytes]


def _load_pair(
    role: str, cert_path: str | None, key_path: str | None, pq: bool, read: Reader
) -> tuple[bytes | None, bytes | None]:
    """(chain PEM, PKCS#8 key PEM) of x509.certificate/private_key, or with `pq`
    of x509.pq.certificate/pq.private_key; raises CredentialsError."""
    prefix = "x509.pq." if pq else "x509."
    chain_pem = key_pem = None
    chain: list[x509.Certificate] = []
    half = _half_pair(prefix, cert_path, key_path)
    if pq and half is not None:
        have, missing = half
        raise CredentialsError(
            cert_path or key_path or "",
            key_label(role, missing),
            f"missing: {have} is set but {missing} is not",
        )
    if cert_path:
        chain, chain_pem = _load_pem_file(
            role, prefix + "certificate", cert_path, parse_certificates, read
        )
    if key_path:
        label = key_label(role, prefix + "private_key")
        reject_url(key_path, label)
        key = parse_private_key(read(key_path, label), key_path, label, pq=pq)
        _warn_if_key_exposed(key_path, label)
        if chain and not key_matches_certificate(key, chain[0]):
            raise CredentialsError(
                key_path, label, f"does not match the certificate in {cert_path}"
            )
        key_pem = key.private_bytes(
            Encoding.PEM,
            PrivateFormat.PKCS8,
            NoEncryption(),
        )
    return chain_pem, key_pem


def _load_role(role: str, rc: RoleConfig, read: Reader = read_file) -> RoleCredentials:
    """Strict load of one role's files; raises CredentialsError."""
    trust_pem = crl_pem = None
    chain_pem, key_pem = _load_pair(role, rc.certificate, rc.private_key, False, read)
    pq_chain_pem, pq_key_pem = _load_pair(role, rc.pq_certificate, rc.pq_private_key, True, read)
    if rc.truststore:
        _, trust_pem = _load_pem_file(
            role, "x509.truststore", rc.truststore, parse_certificates, read
        )
    if rc.crl:
        _, crl_pem = _load_pem_file(role, "x509.crl", rc.crl, parse_crls, read)
    return RoleCredentials(
        chain_pem,
        key_pem,
        trust_pem,
        crl_pem,
        pq_cert_chain_pem=pq_chain_pem,
        pq_private_key_pem=pq_key_pem,
    )


def _load_pem_file(
    role: str,
    key: str,
    path: str,
    parse: Callable[[bytes, str, ConfigKey], list[Any]],
    read: Reader = read_file,
) -> tuple[list[Any], bytes]:
    """The objects in the PEM file a key names, and their canonical PEM."""
    label = key_label(role, key)
    objects = parse(read(path, label), path, label)
    return objects, _pem(objects)


def _warn_if_key_exposed(path: str, label: ConfigKey) -> None:
    """Said at every start and reload, not only by --check-config."""
    problem = key_exposure(path)
    if problem:
        log.warning("%s: %s: %s", path, label, problem)


def key_exposure(path: str) -> str | None:
    """Why the private key file at `path` is readable by others than its owner, or None."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"mode {mode:04o} lets group/other read the key; expected 0600"
    return None


def load_credentials(config: Config, files: CredentialFiles | None = None) -> Credentials:
    """Read every configured PEM file of both roles (or take their bytes from
    `files`, read earlier by the supervisor: tlshd/pemfiles.py); raises
    CredentialsError (naming the file and the key) on the first one that
    cannot be used."""
    read = files.read if files is not None else read_file
    return Credentials(
        client=_load_role("client", config.client, read),
        server=_load_role("server", config.server, read),
    )


# --- check-config ---------------------------------------------------------------------


class _Findings(list[Finding]):
    def error(self, file: str, key: ConfigKey, message: str) -> None:
        self.append(Finding("error", file, key, message))

    def warning(self, file: str, key: ConfigKey, message: str) -> None:
        self.append(Finding("warning", file, key, message))

    def add(self, err: CredentialsError) -> None:
        self.error(err.file, err.key, err.reason)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_credentials(config: Config) -> list[Finding]:
    """Every problem with the certificates, keys, trust stores and CRLs of both roles."""
    findings = _Findings()
    for role in ROLES:
        _check_role(findings, config, role)
    return list(findings)


def _check_role(out: _Findings, config: Config, role: str) -> None:
    rc = config.role(role)
    cfg = config.path or "<config>"
    _check_pq_pair(out, role, rc, cfg)
    _check_half_pair(out, role, cfg, "x509.", rc.certificate, rc.private_key)
    chain = _check_file(out, role, "x509.certificate", rc.certificate, parse_certificates)
    trust = _check_file(out, role, "x509.truststore", rc.truststore, parse_certificates)
    key = _check_private_key(out, role, rc)
    crls = _check_file(out, role, "x509.crl", rc.crl, parse_crls)
    if chain:
        _check_leaf(out, role, rc.certificate or "", chain[0])
        if key is not None and not key_matches_certificate(key, chain[0]):
            out.error(
                rc.private_key or "",
                key_label(role, "x509.private_key"),
                f"does not match the public key of the certificate in {rc.certificate}",
            )
        if trust:
            _check_chain(out, role, rc.certificate or "", chain, trust)
    if crls:
        _check_crls(out, role, rc.crl or "", crls, trust)


def _half_pair(prefix: str, cert: str | None, key: str | None) -> tuple[str, str] | None:
    """(the key that is set, the key missing) when only half of a certificate
    and private key pair is configured; None when both or neither are."""
    if bool(cert) == bool(key):
        return None
    set_, unset = ("certificate", "private_key") if cert else ("private_key", "certificate")
    return prefix + set_, prefix + unset


def _check_half_pair(
    out: _Findings, role: str, cfg: str, prefix: str, cert: str | None, key: str | None
) -> None:
    half = _half_pair(prefix, cert, key)
    if half is not None:
        have, missing = half
        out.error(cfg, key_label(role, missing), f"missing: {have} is set but {missing} is not")


def _check_pq_pair(out: _Findings, role: str, rc: RoleConfig, cfg: str) -> None:
    """x509.pq.*: both or neither, an ML-DSA key matching the certificate."""
    if not (rc.pq_certificate or rc.pq_private_key):
        return
    _check_half_pair(out, role, cfg, "x509.pq.", rc.pq_certificate, rc.pq_private_key)
    chain = _check_file(out, role, "x509.pq.certificate", rc.pq_certificate, parse_certificates)
    key = None
    if rc.pq_private_key:
        label = key_label(role, "x509.pq.private_key")
        try:
            reject_url(rc.pq_private_key, label)
            _check_path(out, rc.pq_private_key, label, secret=True)
            key = parse_private_key(
                read_file(rc.pq_private_key, label), rc.pq_private_key, label, pq=True
            )
        except CredentialsError as err:
            out.add(err)
    if chain:
        _check_leaf(out, role, rc.pq_certificate or "", chain[0], "x509.pq.certificate")
        if key is not None and not key_matches_certificate(key, chain[0]):
            out.error(
                rc.pq_private_key or "",
                key_label(role, "x509.pq.private_key"),
                f"does not match the public key of the certificate in {rc.pq_certificate}",
            )
    if (rc.pq_certificate or rc.pq_private_key) and not (rc.certificate and rc.private_key):
        out.warning(
            cfg,
            key_label(role, "x509.certificate"),
            "only an ML-DSA pair is configured: peers without ML-DSA cannot authenticate us",
        )


def _check_file(
    out: _Findings,
    role: str,
    key: str,
    path: str | None,
    parse: Callable[[bytes, str, ConfigKey], list[Any]],
) -> list[Any]:
    if not path:
        return []
    label = key_label(role, key)
    _check_path(out, path, label, secret=False)
    try:
        return parse(read_file(path, label), path, label)
    except CredentialsError as err:
        out.add(err)
        return []


def _check_private_key(out: _Findings, role: str, rc: RoleConfig) -> object | None:
    if not rc.private_key:
        return None
    label = key_label(role, "x509.private_key")
    try:
        reject_url(rc.private_key, label)
        _check_path(out, rc.private_key, label, secret=True)
        return parse_private_key(read_file(rc.private_key, label), rc.private_key, label)
    except CredentialsError as err:
        out.add(err)
        return None


def _check_path(out: _Findings, path: str, label: ConfigKey, secret: bool) -> None:
    """Upstream's expectations: owned by root, certificates 0644, keys 0600."""
    if not os.path.isabs(path):
        out.warning(path, label, "relative path: resolved against the daemon's working directory")
    try:
        st = os.stat(path)
    except OSError:
        return  # reading it reports the error
    if not stat.S_ISREG(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        out.warning(path, label, f"owned by uid {st.st_uid}, expected root")
    if secret and key_exposure(path):
        out.warning(path, label, key_exposure(path) or "")
    elif not secret and mode & 0o022:
        out.warning(path, label, f"mode {mode:04o} is group/other-writable; expected 0644")


def _check_leaf(
    out: _Findings, role: str, path: str, leaf: x509.Certificate, key: str = "x509.certificate"
) -> None:
    label = key_label(role, key)
    now = _now()
    if leaf.not_valid_after_utc < now:
        out.error(path, label, f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    elif leaf.not_valid_before_utc > now:
        out.error(
            path, label, f"certificate not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
        )
    elif leaf.not_valid_after_utc - now < _EXPIRY_WARNING:
        out.warning(
            path, label, f"certificate expires soon ({leaf.not_valid_after_utc:%Y-%m-%d %H:%M}Z)"
        )
    _check_eku(out, role, path, label, leaf)
    _check_key_usage(out, path, label, leaf)
    if role == "server":
        try:
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            out.warning(path, label, "no subjectAltName: clients checking the host name will fail")


def _check_eku(
    out: _Findings, role: str, path: str, label: ConfigKey, leaf: x509.Certificate
) -> None:
    wanted = (
        ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    )
    name = "clientAuth" if role == "client" else "serverAuth"
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        out.warning(path, label, f"no extendedKeyUsage {name}: peers that require it will reject")
        return
    if wanted not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        out.warning(path, label, f"extendedKeyUsage lacks {name}: peers will reject it")


def _check_key_usage(out: _Findings, path: str, label: ConfigKey, leaf: x509.Certificate) -> None:
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        out.warning(path, label, "keyUsage lacks digitalSignature, which TLS 1.3 needs")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_chain(out: _Findings, role: str, path: str, chain: Certs, trust: Certs) -> None:
    """Walk from the leaf through the configured intermediates to a trust anchor."""
    label = key_label(role, "x509.certificate")
    store_key = key_label(role, "x509.truststore")
    current, pool = chain[0], chain[1:]
    for _ in range(len(chain) + 1):
        if current in trust or any(_issued_by(current, anchor) for anchor in trust):
            return
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            break
        pool.remove(parent)
        current = parent
    out.warning(
        path,
        label,
        f"does not chain to {store_key}: no issuer found for "
        f"{current.subject.rfc4514_string() or '<empty subject>'}",
    )


def _check_crls(out: _Findings, role: str, path: str, crls: Crls, trust: Certs) -> None:
    label = key_label(role, "x509.crl")
    now = _now()
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            out.warning(
                path,
                label,
                f"CRL from {issuer} is stale (next update was "
                f"{crl.next_update_utc:%Y-%m-%d %H:%M}Z); peer verification may fail",
            )
        if not trust:
            out.warning(
                path, label, f"CRL issuer {issuer} cannot be checked: no x509.truststore is set"
            )
        elif not any(_crl_signed_by(crl, ca) for ca in trust):
            out.warning(path, label, f"CRL issuer {issuer} is not in the trust store")


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if ca.subject != crl.issuer:
        return False
    try:
        # A CA key type CRLs cannot be signed with (X25519...) raises TypeError below.
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False
