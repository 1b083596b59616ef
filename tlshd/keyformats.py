"""The few names of cryptography's `serialization` the daemon uses, without
importing that package.

`cryptography.hazmat.primitives.serialization` imports, in its __init__, the
SSH key and certificate code, PKCS#7, PKCS#12 and finite-field DH, none of
which a TLS handshake needs: 0.3 s of the zygote's start-up in the TCG lab
guest (python -X importtime: the package 616 ms, of which the Rust bindings
it shares with pyOpenSSL 290 ms), all of it on the way to READY.  The names
below are what that package re-exports: the enums from `_serialization`
(which exists to break cryptography's own import cycles) and the key loaders
from the Rust bindings, as `serialization/base.py` binds them.  Both are
private to cryptography, which is pinned below its next major version
(pyproject.toml); should either move, the public package is imported
instead, and tests/test_keyformats.py, which checks that the zygote's
imports leave it out, fails.
"""

from __future__ import annotations

try:
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl
    from cryptography.hazmat.primitives._serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    load_pem_private_key = _rust_openssl.keys.load_pem_private_key
    load_der_private_key = _rust_openssl.keys.load_der_private_key
except (ImportError, AttributeError):  # pragma: no cover - another cryptography layout
    from cryptography.hazmat.primitives import serialization as _serialization

    Encoding = _serialization.Encoding  # type: ignore[misc]  # same class, public path
    NoEncryption = _serialization.NoEncryption  # type: ignore[misc]  # same class, public path
    PrivateFormat = _serialization.PrivateFormat  # type: ignore[misc]  # same class, public path
    PublicFormat = _serialization.PublicFormat  # type: ignore[misc]  # same class, public path
    load_pem_private_key = _serialization.load_pem_private_key
    load_der_private_key = _serialization.load_der_private_key

__all__ = [
    "Encoding",
    "NoEncryption",
    "PrivateFormat",
    "PublicFormat",
    "load_der_private_key",
    "load_pem_private_key",
]
