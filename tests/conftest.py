"""Shared fixtures.  OPENSSL_CONF must be set before anything imports OpenSSL or
cryptography (tlshd/openssl_conf.py), so it is done here, at import time."""

from __future__ import annotations

from tlshd.openssl_conf import ensure_openssl_conf

ensure_openssl_conf()

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The test PKI of tests/peers.py, written once per session."""
    from tests.peers import make_pki

    return make_pki(Path(tmp_path_factory.mktemp("pki")))


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="session")
def openssl_bin() -> str:
    _need("openssl")
    return "openssl"


@pytest.fixture(scope="session")
def gnutls_bins() -> tuple[str, str]:
    _need("gnutls-serv")
    _need("gnutls-cli")
    return "gnutls-serv", "gnutls-cli"
