"""Shared fixtures.  OPENSSL_CONF must be set before anything imports OpenSSL or
cryptography (tlshd/openssl_conf.py), so it is done here, at import time."""

from __future__ import annotations

from tlshd.openssl_conf import ensure_openssl_conf

ensure_openssl_conf()

import shutil  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fakekernel import FakeKernel  # noqa: E402
from tests.peers import Pki, make_pki  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI of tests/peers.py, written once per session."""

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


# --- the fake kernel (tests/fakekernel.py) -----------------------------------------------


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    """A fake net/handshake kernel of its own for each test."""
    with FakeKernel() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_kernel() -> Iterator[FakeKernel]:
    """One fake kernel for a whole test module, for modules that start one daemon
    for all their tests (a daemon per test would dominate their run time)."""
    with FakeKernel() as fake:
        yield fake


# --- kernel keyrings ------------------------------------------------------------------------


def unique(prefix: str = "tlshd-test") -> str:
    """A key or keyring name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def scratch() -> Iterator[int]:
    """A fresh keyring linked into this process's process keyring, which nothing
    else on the machine shares; cleared and unlinked after the test."""
    from tlshd import keyring as kr

    ring = kr.add_key("keyring", unique("tlshd-scratch"), b"", kr.KEY_SPEC_PROCESS_KEYRING)
    yield ring
    kr._keyctl("clear", kr.KEYCTL_CLEAR, ring)
    kr.unlink_key(ring, kr.KEY_SPEC_PROCESS_KEYRING)
