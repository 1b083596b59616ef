"""OpenSSL contexts: TLS 1.3 policy, callbacks, credentials, trust.

Every callback closes over the one `TlsState` it feeds, so nothing about a
handshake lives in module globals.  A context serves exactly one handshake:
either it is built for that handshake, or it is one the zygote built per
configuration generation for a shape that only uses configured material
(workers/contexts.py), taken once by the single-use worker it was forked
into.  Parsing the configured PEM material is costly (loading an RSA key
validates it, tens of milliseconds), so the parsed objects, never contexts,
are also cached per PEM bytes for the contexts still built per handshake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from tlshd.credentials import RoleCredentials
from tlshd.keyformats import load_der_private_key, load_pem_private_key

# kTLS-capable suites only (upstream ktls.c), in OpenSSL's default preference order.
TLS13_SUITES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
)

# TLS record content types and handshake message types (RFC 8446 §5.1, §4)
CT_ALERT = 21
CT_HANDSHAKE = 22
HS_CLIENT_HELLO = 1
HS_NEW_SESSION_TICKET = 4

# Alert descriptions (RFC 8446 §6)
ALERT_ACCESS_DENIED = 49
ALERT_UNKNOWN_PSK_IDENTITY = 115

# Extension types (IANA TLS ExtensionType registry)
EXT_RECORD_SIZE_LIMIT = 28  # RFC 8449

SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2

X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS = 0x4

_KEYLOG_LABELS = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")


@dataclass
class TlsState:
    """What the OpenSSL callbacks learn during one handshake."""

    # (label, client_random) -> secret, from the keylog callback
    secrets: dict[tuple[str, bytes], bytes] = field(default_factory=dict)
    nsts_written: int = 0
    alerts_received: list[int] = field(default_factory=list)
    alerts_sent: list[int] = field(default_factory=list)
    verify_errors: list[str] = field(default_factory=list)
    # server role, x509: chain failures recorded but not acted on by OpenSSL
    deferred_verify_failure: bool = False
    # PSK bookkeeping (workers/psk.py fills these)
    psk_identities_seen: int = 0
    psk_serial: int | None = None
    # server role: the first ClientHello as received (the msg callback runs
    # before OpenSSL parses its extensions), for the offered PSK identities
    client_hello: bytes | None = None
    # keeps cffi callbacks and buffers alive as long as the handshake
    keepalive: list[Any] = field(default_factory=list)

    def traffic_secret(self, label: str, client_random: bytes) -> bytes | None:
        return self.secrets.get((label, client_random))


def client_hello_extension(client_hello: bytes, ext_type: int) -> bytes | None:
    """The body of extension `ext_type` in a ClientHello handshake message
    (RFC 8446 §4.1.2), or None when absent or the message is malformed."""
    view = memoryview(client_hello)
    try:
        pos = 4 + 2 + 32  # msg_type, uint24 length; legacy_version, random
        for length_size in (1, 2, 1):  # session id, cipher suites, compression
            _, pos = _opaque(view, pos, length_size)
        extensions, _ = _opaque(view, pos, 2)
        pos = 0
        while pos < len(extensions):
            this_type = int.from_bytes(extensions[pos : pos + 2], "big")
            body, pos = _opaque(extensions, pos + 2, 2)
            if this_type == ext_type:
                return bytes(body)
    except ValueError:
        pass
    return None


def _opaque(view: memoryview, pos: int, length_size: int) -> tuple[memoryview, int]:
    end_of_length = pos + length_size
    if end_of_length > len(view):
        raise ValueError("truncated")
    end = end_of_length + int.from_bytes(view[pos:end_of_length], "big")
    if end > len(view):
        raise ValueError("truncated")
    return view[end_of_length:end], end


class CredentialError(Exception):
    """Local certificate or key material is missing or unusable (status EIO)."""


def new_context(state: TlsState, suites: tuple[str, ...] = TLS13_SUITES) -> SSL.Context:
    """A TLS 1.3-only context whose callbacks report into `state`."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(":".join(suites).encode("ascii"))
    # NO_TICKET alone still lets OpenSSL send stateful TLS 1.3 tickets; the
    # OPENSSL_CONF NumTickets=0 does the real work (tlshd/openssl_conf.py).
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_keylog_callback(_keylog_callback(state))
    _install_msg_callback(ctx, state)
    return ctx


def _keylog_callback(state: TlsState) -> Callable[[SSL.Connection, bytes], None]:
    def on_keylog(_conn: SSL.Connection, line: bytes) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[0] in _KEYLOG_LABELS:
            state.secrets[(parts[0].decode(), bytes.fromhex(parts[1].decode()))] = bytes.fromhex(
                parts[2].decode()
            )

    return on_keylog


def _install_msg_callback(ctx: SSL.Context, state: TlsState) -> None:
    """Count NewSessionTickets we write (they use up TX record numbers) and
    alerts; keep the first ClientHello received."""

    # A cffi callback: its types are the C signature given to ffi.callback.
    @ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)")
    def on_message(write_p, _version, content_type, buf, length, _ssl, _arg):  # type: ignore[no-untyped-def]
        if length == 0:
            return
        data = ffi.cast("unsigned char *", buf)
        if content_type == CT_HANDSHAKE and write_p and data[0] == HS_NEW_SESSION_TICKET:
            state.nsts_written += 1
        elif (
            content_type == CT_HANDSHAKE
            and not write_p
            and data[0] == HS_CLIENT_HELLO
            and state.client_hello is None
        ):
            state.client_hello = bytes(ffi.buffer(buf, length))
        elif content_type == CT_ALERT and length >= 2:
            (state.alerts_sent if write_p else state.alerts_received).append(data[1])

    state.keepalive.append(on_message)
    lib.SSL_CTX_set_msg_callback(ctx._context, on_message)


def install_servername_callback(
    ctx: SSL.Context, state: TlsState, decide_alert: Callable[[], int | None]
) -> None:
    """Run `decide_alert` once the ClientHello (including the PSK extension) is parsed.

    OpenSSL calls the servername callback even without SNI, after all ClientHello
    extensions were parsed; it is the one bound hook that may abort with an
    alert of our choosing (the PSK find callback can only cause internal_error).
    """

    # A cffi callback: its types are the C signature given to ffi.callback.
    @ffi.callback("int(SSL *, int *, void *)")
    def on_servername(_ssl, alert, _arg):  # type: ignore[no-untyped-def]
        description = decide_alert()
        if description is None:
            return SSL_TLSEXT_ERR_OK
        alert[0] = description
        return SSL_TLSEXT_ERR_ALERT_FATAL

    state.keepalive.append(on_servername)
    lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, on_servername)


# ---------------------------------------------------------------- credentials


def use_configured_certificate(ctx: SSL.Context, creds: RoleCredentials, role: str) -> None:
    """The role's configured certificate chain and key, and the ML-DSA pair
    beside them if one is configured; raises CredentialError."""
    if creds.cert_chain_pem is None or creds.private_key_pem is None:
        raise CredentialError(f"no {role} certificate or private key configured")
    use_pem_credentials(ctx, creds.cert_chain_pem, creds.private_key_pem)
    if creds.pq_cert_chain_pem is not None and creds.pq_private_key_pem is not None:
        use_pq_credentials(ctx, creds.pq_cert_chain_pem, creds.pq_private_key_pem)


def use_pem_credentials(ctx: SSL.Context, chain_pem: bytes, key_pem: bytes) -> None:
    """Leaf first, then intermediates; raises CredentialError."""
    certs, key = _parse_pem_credentials(chain_pem, key_pem)
    _use_credentials(ctx, certs, key)


@functools.lru_cache(maxsize=4)
def _parse_pem_credentials(
    chain_pem: bytes, key_pem: bytes
) -> tuple[tuple[x509.Certificate, ...], Any]:
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise CredentialError(f"cannot parse certificate or private key: {err}") from err
    return tuple(certs), key


def use_pq_credentials(ctx: SSL.Context, chain_pem: bytes, key_pem: bytes) -> None:
    """Add an ML-DSA pair beside the classic one (x509.pq.*).

    OpenSSL keeps one certificate per key type and, as a server (or a client
    asked for a certificate), presents the first the peer's
    signature_algorithms accept: ML-DSA for peers offering it (OpenSSL 3.5+,
    GnuTLS 3.8.x), the classic one for others.  pyOpenSSL's use_privatekey
    takes no ML-DSA key (cryptography's is "unsupported", its own PKey is
    deprecated), so the key is read by OpenSSL from PEM and installed with
    SSL_CTX_use_PrivateKey, which pairs it with the certificate just set.
    Intermediates of the PQ chain join the shared extra chain."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        ctx.use_certificate(certs[0])
        if lib.SSL_CTX_use_PrivateKey(ctx._context, key._pkey) != 1:
            raise ValueError("OpenSSL refused the key (SSL_CTX_use_PrivateKey)")
        ctx.check_privatekey()
        for extra in certs[1:]:
            ctx.add_extra_chain_cert(extra)
    except (SSL.Error, crypto.Error, TypeError, ValueError, IndexError) as err:
        raise CredentialError(f"ML-DSA certificate and key unusable: {err}") from err


def use_der_credentials(ctx: SSL.Context, cert_der: bytes, key_der: bytes) -> None:
    """One DER certificate and one DER private key, as keyring payloads carry them."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        key = load_der_private_key(key_der, password=None)
    except (ValueError, TypeError) as err:
        raise CredentialError(f"cannot parse certificate or private key: {err}") from err
    _use_credentials(ctx, [cert], key)


def _use_credentials(ctx: SSL.Context, certs: Sequence[x509.Certificate], key: Any) -> None:
    if not certs:
        raise CredentialError("no certificate in the certificate file")
    try:
        ctx.use_certificate(certs[0])
        for extra in certs[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as err:
        raise CredentialError(f"certificate and private key unusable: {err}") from err


# ---------------------------------------------------------------------- trust


def configure_trust(ctx: SSL.Context, creds: RoleCredentials) -> None:
    """Trust anchors (configured PEM or the system store) and an optional CRL.

    With a CRL configured, CRL_CHECK checks the leaf against it and fails closed
    when the leaf's issuer has no CRL loaded.
    """
    store = ctx.get_cert_store()
    assert store is not None
    if creds.truststore_pem is None:
        ctx.set_default_verify_paths()
    else:
        for anchor in _trust_anchors(creds.truststore_pem):
            store.add_cert(anchor)
    if creds.crl_pem is not None:
        for crl in _load_crls(creds.crl_pem):
            store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


@functools.lru_cache(maxsize=4)
def _trust_anchors(pem: bytes) -> tuple[crypto.X509, ...]:
    try:
        anchors = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise CredentialError(f"cannot parse the truststore: {err}") from err
    return tuple(crypto.X509.from_cryptography(anchor) for anchor in anchors)


@functools.lru_cache(maxsize=4)
def _load_crls(pem: bytes) -> tuple[x509.CertificateRevocationList, ...]:
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + chunk for chunk in pem.split(marker)[1:]]
    try:
        crls = [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError as err:
        raise CredentialError(f"cannot parse the CRL: {err}") from err
    if not crls:
        raise CredentialError("CRL file holds no CRL")
    return tuple(crls)


def verify_error_string(code: int) -> str:
    return str(ffi.string(lib.X509_verify_cert_error_string(code)).decode(errors="replace"))


def set_verify_client_role(ctx: SSL.Context, state: TlsState) -> None:
    """Require a valid server chain; OpenSSL aborts with its own alert on failure."""

    def on_verify(_conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        if not ok:
            state.verify_errors.append(_describe(cert, code, depth))
        return bool(ok)

    ctx.set_verify(SSL.VERIFY_PEER, on_verify)


def set_verify_server_role(ctx: SSL.Context, state: TlsState) -> None:
    """Request (not require) a client certificate; judge it after the handshake.

    OpenSSL maps chain errors to bad_certificate/unknown_ca/... alerts and has no
    error that maps to access_denied, which upstream sends (RFC 8446 §6.2).  So
    failures are only recorded here; the engine then sends access_denied itself
    under the server's application traffic key and reports EACCES.
    """

    def on_verify(_conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        if not ok:
            state.verify_errors.append(_describe(cert, code, depth))
            state.deferred_verify_failure = True
        return True

    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, on_verify)


def _describe(cert: crypto.X509, code: int, depth: int) -> str:
    subject = cert.to_cryptography().subject.rfc4514_string()
    return f"{verify_error_string(code)} (depth {depth}, {subject or 'no subject'})"
