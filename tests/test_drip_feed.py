"""A peer that drips one byte at a time cannot hold a worker past its deadline
(issue 11 #7).  OpenSSL reading a record from a blocking socket stayed in one
read loop as long as each byte came before SO_RCVTIMEO; the worker was then
SIGKILLed by the supervisor instead of answering ETIMEDOUT itself."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from tlshd.workers.engine import perform_handshake

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon, tcp_pair
from tests.peers import Pki, engine_context
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(60)

DRIP_INTERVAL_S = 0.1  # each byte well within any per-read timeout
RECORD_LEN = 1000  # at one byte per interval: 100 s for the record


def drip(sock: socket.socket, stop: threading.Event) -> None:
    """Read the ClientHello, then send a handshake record one byte at a time."""
    try:
        sock.recv(65536)
        data = struct.pack("!BHH", 22, 0x0303, RECORD_LEN) + b"\x02" * RECORD_LEN
        for byte in data:
            if stop.wait(DRIP_INTERVAL_S):
                return
            sock.send(bytes([byte]))
    except OSError:
        pass


@contextmanager
def dripping_peer(ours: socket.socket, theirs: socket.socket) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=drip, args=(theirs, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


@pytest.mark.parametrize("blocking", [True, False])
def test_engine_enforces_its_deadline_between_reads(pki: Pki, blocking: bool) -> None:
    ours, theirs = tcp_pair()
    ours.setblocking(blocking)  # the consumer's choice; the engine never changes it
    with dripping_peer(ours, theirs):
        ctx, capture, _ = engine_context(pki, timeout=0.8)
        params = HandshakeParams(
            sockfd=ours.fileno(),
            message_type=MsgType.CLIENTHELLO,
            auth_mode=AuthMode.UNAUTH,
            peername="localhost",
        )
        started = time.monotonic()
        result = perform_handshake(ours, params, ctx)
        elapsed = time.monotonic() - started
    assert result.status == errno.ETIMEDOUT, result
    assert elapsed < 0.8 + 3 * DRIP_INTERVAL_S, elapsed
    assert ours.getblocking() is blocking
    assert capture.calls == []
    ours.close()
    theirs.close()


def test_worker_answers_etimedout_itself(pki: Pki) -> None:
    """Through the fake kernel: the worker reports ETIMEDOUT before the
    supervisor's deadline, so nobody is killed."""
    credentials = Credentials(client=RoleCredentials(truststore_pem=pki.ca.cert_pem))
    with (
        FakeKernel() as kernel,
        running_daemon(kernel, perform_handshake, credentials=credentials) as daemon,
    ):
        ours, theirs = tcp_pair()
        with dripping_peer(ours, theirs):
            request = kernel.submit(
                ours, MsgType.CLIENTHELLO, AuthMode.UNAUTH, peername="localhost", timeout_ms=1500
            )
            assert request.wait_done(10)[0] == errno.ETIMEDOUT
        daemon.wait_for_log("handshake failed with ETIMEDOUT")
        assert "overran the handshake deadline" not in daemon.log()
        ours.close()
        theirs.close()
