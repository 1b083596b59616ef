"""Before DONE(0) the supervisor checks, on its own copy of the socket, that
the tls ULP and both kTLS directions are installed (issue 11 #5): a worker
that reports success without them gets its request failed with EIO."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
from tlshd.supervisor import handoff

from tests.fakekernel import FakeKernel, fake_install_ktls, fake_ktls_state
from tests.helpers.daemon import running_daemon, tcp_pair
from tests.helpers.engines import FAKE_CRYPTO_INFO, Peer, gated_engine
from tlshd.params import HandshakeParams, HandshakeResult

pytestmark = pytest.mark.timeout(120)


def lying_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Reports success after installing only what `params.peername` names."""
    steps = (params.peername or "").split(",")
    if "tx" in steps:  # the ULP and TX; RX is not TLS 1.3, so the fake refuses it
        fake_install_ktls(sock, FAKE_CRYPTO_INFO, b"\x03\x03")
    return HandshakeResult(status=0, cipher="LIE")


def run(kernel: FakeKernel, peername: str | None) -> tuple[int, tuple[int, ...]]:
    peer = Peer(kernel, peername=peername)
    try:
        return peer.request.wait_done(15)
    finally:
        peer.close()


def lying_engine_safe(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    try:
        return lying_engine(sock, params, ctx)
    except OSError:
        return HandshakeResult(status=0, cipher="LIE")


def test_success_without_ktls_becomes_eio() -> None:
    with FakeKernel() as kernel, running_daemon(kernel, lying_engine_safe) as daemon:
        assert run(kernel, "none") == (errno.EIO, ())
        assert run(kernel, "tx") == (errno.EIO, ())  # ULP and TX, no RX
        daemon.wait_for_log("worker reported success, but the socket has ULP")
        assert "ULP 'tls', TLS_TX set, TLS_RX unset" in daemon.log()


def test_success_with_ktls_is_done_zero() -> None:
    with FakeKernel() as kernel, running_daemon(kernel, gated_engine):
        peer = Peer(kernel)
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10) == (0, ())
        peer.close()


def test_ktls_state_of_a_plain_socket() -> None:
    """The real probe on this kernel: no ULP, no TLS_TX/RX (and no exception)."""
    client, server = tcp_pair()
    try:
        assert handoff.ktls_state(server) == ("", False, False)
        assert fake_ktls_state(server) == ("", False, False)
        fake_install_ktls(server, FAKE_CRYPTO_INFO, FAKE_CRYPTO_INFO)
        assert fake_ktls_state(server) == ("tls", True, True)
    finally:
        client.close()
        server.close()
