"""The daemon's own OpenSSL configuration, applied before OpenSSL initialises.

TLS 1.3 session tickets cannot be switched off through pyOpenSSL or the cffi
bindings (SSL_CTX_set_num_tickets is not bound, and SSL_OP_NO_TICKET only turns
them into stateful tickets).  A ticket written by our server would consume TX
record numbers, and a kernel consumer that receives one treats it as an
unexpected handshake record.  OpenSSL's config file can set `NumTickets = 0`,
but it is read once, when the library initialises, i.e. at the first import of
cryptography or pyOpenSSL.  So `ensure_openssl_conf()` must run before those
imports: the CLI calls it first thing, tests/conftest.py at import time.

This module therefore imports nothing from OpenSSL or cryptography at module
level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

ENV_VAR = "OPENSSL_CONF"
# Set alongside OPENSSL_CONF so that a second call (or a forked worker) can tell
# that the file in OPENSSL_CONF is ours.
MARKER_VAR = "TLSHD_OPENSSL_CONF"

CONF_TEXT = """\
# Written by tlshd; applies to every SSL_CTX the daemon creates.
openssl_conf = tlshd_openssl_init

[tlshd_openssl_init]
ssl_conf = tlshd_ssl_module

[tlshd_ssl_module]
system_default = tlshd_system_default

[tlshd_system_default]
# No NewSessionTickets: kernel consumers cannot use them (no resumption), and
# tickets our server wrote would shift the kTLS TX record sequence.
NumTickets = 0
MinProtocol = TLSv1.3
"""

# Modules whose import initialises OpenSSL (cryptography's Rust extension links it).
_OPENSSL_MODULES = ("OpenSSL", "cryptography.hazmat.bindings._rust")

_log = logging.getLogger("tlshd")
_probe_result: bool | None = None


def openssl_loaded() -> bool:
    """True once an import has initialised the wheel's OpenSSL."""
    return any(name in sys.modules for name in _OPENSSL_MODULES)


def ensure_openssl_conf() -> str:
    """Write the config to a private file and point OPENSSL_CONF at it.

    Idempotent: if OPENSSL_CONF already names our file, nothing changes.
    Returns the path.  Logs a warning if OpenSSL is already initialised, since
    the file can then no longer apply (the NST counter in the engine covers it).
    """
    current = os.environ.get(ENV_VAR)
    if current and os.environ.get(MARKER_VAR) == current and os.path.exists(current):
        return current
    if openssl_loaded():
        _log.warning(
            "OpenSSL was initialised before tlshd set %s; session tickets may not be disabled",
            ENV_VAR,
        )
    directory = tempfile.mkdtemp(prefix="tlshd-openssl-")  # mode 0700
    path = os.path.join(directory, "openssl.cnf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(CONF_TEXT)
    os.environ[ENV_VAR] = path
    os.environ[MARKER_VAR] = path
    return path


def tickets_disabled() -> bool:
    """Whether a TLS 1.3 server context in this process writes no NewSessionTicket.

    Runs one in-memory handshake (ephemeral P-256 key, no network) and counts
    NSTs; the result is cached because the config applies process-wide.
    """
    global _probe_result
    if _probe_result is None:
        _probe_result = _probe_tickets() == 0
    return _probe_result


def _probe_tickets() -> int:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlshd-ticket-probe")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=5))
        .sign(key, hashes.SHA256())
    )
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    server_ctx.use_certificate(cert)
    server_ctx.use_privatekey(key)
    server_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    written_nsts = [0]

    @ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)")
    def count_nst(write_p, _version, content_type, buf, length, _ssl, _arg):  # type: ignore[no-untyped-def]
        # content type 22 = handshake; message type 4 = NewSessionTicket
        if write_p and content_type == 22 and length and ffi.cast("unsigned char *", buf)[0] == 4:
            written_nsts[0] += 1

    lib.SSL_CTX_set_msg_callback(server_ctx._context, count_nst)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    for _ in range(10):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
    return written_nsts[0]
