"""Start-up check that the private cffi bindings the TLS engine uses exist.

pyOpenSSL has no API for TLS 1.3 PSK, the msg callback, hostname/IP checks or
the verify-param object, so the engine calls cryptography's bindings
(`OpenSSL._util.lib`) directly.  cryptography does not treat those as public
API and has removed unused ones before (pyca/cryptography #8363, #14798), so
the daemon refuses to start, naming what is missing, rather than failing in the
middle of a handshake.
"""

from __future__ import annotations

# Every `lib.<name>` the engine (tlshd.workers.*) touches.  Keep in sync with the
# code: tests/test_engine_selfcheck.py greps the workers for lib.* uses.
REQUIRED_BINDINGS: tuple[str, ...] = (
    # TLS 1.3 external PSK (workers/psk.py)
    "SSL_CTX_set_psk_use_session_callback",
    "SSL_CTX_set_psk_find_session_callback",
    "SSL_get1_session",
    "SSL_SESSION_set1_master_key",
    "SSL_SESSION_set_cipher",
    "SSL_SESSION_set_protocol_version",
    "SSL_SESSION_free",
    "SSL_CIPHER_find",
    # record accounting and alerts (workers/tlsctx.py)
    "SSL_CTX_set_msg_callback",
    "SSL_CTX_set_tlsext_servername_callback",
    # peer verification (workers/tlsctx.py)
    "SSL_get0_param",
    "X509_VERIFY_PARAM_set1_host",
    "X509_VERIFY_PARAM_set1_ip",
    "X509_VERIFY_PARAM_set_hostflags",
    "SSL_session_reused",
    "X509_verify_cert_error_string",
    # the ML-DSA key of x509.pq.* (workers/tlsctx.py)
    "SSL_CTX_use_PrivateKey",
    # the negotiated key exchange group, for the log (workers/engine.py)
    "SSL_get0_group_name",
)


def check_bindings() -> list[str]:
    """Names from REQUIRED_BINDINGS that the installed bindings lack."""
    from OpenSSL._util import lib

    return [name for name in REQUIRED_BINDINGS if not hasattr(lib, name)]


def _version(dist: str) -> str:
    # Only on the error path: importlib.metadata costs start-up time.
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


class BindingsError(SystemExit):
    """Raised by require_bindings; a SystemExit so the CLI exits with the message."""


def require_bindings() -> None:
    """Raise BindingsError (exit status 1 with a clear message) if bindings are missing."""
    missing = check_bindings()
    if missing:
        raise BindingsError(
            "tlshd: the installed pyOpenSSL "
            f"{_version('pyOpenSSL')} / cryptography {_version('cryptography')} lack "
            f"OpenSSL bindings tlshd needs: {', '.join(missing)}. "
            "Install the versions tlshd was tested with (see pyproject.toml)."
        )
