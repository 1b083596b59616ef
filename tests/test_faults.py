"""Fault injection through the whole daemon: fake kernel, real forked
supervisor and workers, the real TLS engine with in-process pyOpenSSL peers
(kTLS captured by accept_ktls, so status 0 means the handshake completed).

What tests/test_supervisor.py already covers is not repeated here (gated
engine: SIGKILL → EIO, SIGSTOP → ETIMEDOUT and replacement, a queue of three
in deadline order).  Here: the same faults during real TLS handshakes, with
the kill→DONE delay measured; a burst far beyond max_workers; hostile TLS
peers next to a good handshake; and mutual TLS in the server role.
"""

from __future__ import annotations

import errno
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from tlshd.workers.engine import perform_handshake

from tests.fakekernel import FakeKernel, FakeRequest
from tests.helpers.daemon import Daemon, config_text, running_daemon, short_tmpdir, tcp_pair
from tests.helpers.engines import Peer, accept_ktls, gated_engine
from tests.peers import InProcessTlsPeer, Pki
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(180)


def busy(doc: dict) -> list[dict]:  # type: ignore[type-arg]
    """Workers that started their handshake (holding the socket, pid known)."""
    return [
        w
        for w in doc["workers"]
        if w["state"] == "busy" and w["pid"] and w["phase"] not in (None, "handoff")
    ]


@pytest.fixture(scope="module")
def tls_daemon(module_kernel: FakeKernel, pki: Pki) -> Iterator[Daemon]:
    """The real engine, both roles configured; the x509 server asks for a client cert."""
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=4)
    credentials = Credentials(
        client=RoleCredentials(truststore_pem=pki.ca.cert_pem),
        server=RoleCredentials(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem),
    )
    with running_daemon(
        module_kernel,
        perform_handshake,
        config=text,
        directory=directory,
        credentials=credentials,
        install_ktls=accept_ktls,
    ) as daemon:
        yield daemon


class TlsRequest:
    """A consumer socket handed to the daemon as a TLS server (SERVERHELLO);
    `client` is the remote peer's end."""

    def __init__(self, kernel: FakeKernel, timeout_ms: int = 20000, **submit: object) -> None:
        self.client, self.server = tcp_pair()
        self.request: FakeRequest = kernel.submit(
            self.server, MsgType.SERVERHELLO, AuthMode.X509, timeout_ms=timeout_ms, **submit
        )

    def close(self) -> None:
        self.client.close()
        self.server.close()


def good_handshake(kernel: FakeKernel, pki: Pki, identity: object = None) -> None:
    tls = TlsRequest(kernel)
    try:
        peer = InProcessTlsPeer(tls.client, ca=pki.ca, identity=identity)  # type: ignore[arg-type]
        status, _ = tls.request.wait_done(30)
        assert status == 0, (status, peer.error)
        assert peer.wait(10), peer.error
        return None
    finally:
        tls.close()


def test_good_server_handshake(module_kernel: FakeKernel, tls_daemon: Daemon, pki: Pki) -> None:
    good_handshake(module_kernel, pki)
    tls_daemon.wait_for_log("serverhello handshake succeeded")


def test_mutual_tls_server_role(module_kernel: FakeKernel, tls_daemon: Daemon, pki: Pki) -> None:
    """A client certificate makes the engine report REMOTE_AUTH (UINT_MAX per
    certificate, as upstream); the supervisor must pass it on, not call it junk."""
    tls = TlsRequest(module_kernel)
    try:
        peer = InProcessTlsPeer(tls.client, ca=pki.ca, identity=pki.client)
        status, remote_auth = tls.request.wait_done(30)
        assert status == 0, tls_daemon.log()[-2000:]
        assert remote_auth and set(remote_auth) == {0xFFFFFFFF}
        assert peer.wait(10), peer.error
    finally:
        tls.close()


def worker_of(daemon: Daemon, request: FakeRequest) -> int:
    request.wait_accepted(10)
    doc = daemon.wait_for(lambda d: len(busy(d)) >= 1, what="a busy worker")
    (worker,) = busy(doc)
    return int(worker["pid"])


def test_sigkill_mid_tls_handshake(module_kernel: FakeKernel, tls_daemon: Daemon, pki: Pki) -> None:
    """The peer sent half a ClientHello; the worker waits for the rest and is killed."""
    tls = TlsRequest(module_kernel, timeout_ms=60000)
    try:
        tls.client.sendall(struct.pack("!BHH", 22, 0x0301, 512) + b"\x01" * 40)
        victim = worker_of(tls_daemon, tls.request)
        killed_at = time.monotonic()
        psutil.Process(victim).kill()
        assert tls.request.wait_done(10) == (errno.EIO, ())
        delay = time.monotonic() - killed_at
        print(f"SIGKILL -> DONE(EIO): {delay * 1000:.1f} ms")
        assert delay < 2.0  # generous: the deadline was a minute away
    finally:
        tls.close()
    tls_daemon.wait_for(
        lambda d: victim not in {w["pid"] for w in d["workers"]}, what="victim reaped"
    )
    good_handshake(module_kernel, pki)


def test_sigstop_mid_tls_handshake(module_kernel: FakeKernel, tls_daemon: Daemon, pki: Pki) -> None:
    tls = TlsRequest(module_kernel, timeout_ms=2000)
    try:
        victim = worker_of(tls_daemon, tls.request)
        psutil.Process(victim).suspend()
        started = time.monotonic()
        assert tls.request.wait_done(20) == (errno.ETIMEDOUT, ())
        print(f"SIGSTOP -> DONE(ETIMEDOUT): {(time.monotonic() - started) * 1000:.0f} ms")
    finally:
        tls.close()
    tls_daemon.wait_for(
        lambda d: victim not in {w["pid"] for w in d["workers"]}, what="stopped worker replaced"
    )
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    good_handshake(module_kernel, pki)


def _garbage(sock: socket.socket) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)


def _truncated_hello(sock: socket.socket) -> None:
    sock.sendall(struct.pack("!BHH", 22, 0x0301, 300) + b"\x01\x00\x01\x28" + b"\x03\x03" * 8)


def _nothing(sock: socket.socket) -> None:
    pass


def _close_mid_handshake(sock: socket.socket) -> None:
    sock.sendall(struct.pack("!BHH", 22, 0x0301, 300) + b"\x01" * 20)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (_garbage, {errno.EACCES}),
        (_truncated_hello, {errno.ETIMEDOUT}),
        (_nothing, {errno.ETIMEDOUT}),
        (_close_mid_handshake, {errno.ETIMEDOUT, errno.EACCES}),
    ],
    ids=["garbage", "truncated-clienthello", "nothing", "close-mid-handshake"],
)
def test_hostile_tls_peer_next_to_a_good_one(
    module_kernel: FakeKernel, tls_daemon: Daemon, pki: Pki, behaviour, expected: set[int]
) -> None:  # type: ignore[no-untyped-def]
    bad = TlsRequest(module_kernel, timeout_ms=2500)
    try:
        behaviour(bad.client)
        good_handshake(module_kernel, pki)  # while the bad one is still in a worker
        status, _ = bad.request.wait_done(20)
        assert status in expected, (status, tls_daemon.log()[-2000:])
    finally:
        bad.close()
    good_handshake(module_kernel, pki)


# --------------------------------------------------------------------------
# The pool full: requests queue and none is lost


SUCCEEDED = r"peer=127\.0\.0\.1:(\d+): clienthello handshake succeeded"


def test_burst_beyond_max_workers_is_served_in_deadline_order() -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=1, max_workers=2, timeout_ms=30000)
    with (
        FakeKernel() as kernel,
        running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon,
    ):
        holders = [Peer(kernel, timeout_ms=40000) for _ in range(2)]
        daemon.wait_for(lambda d: len(busy(d)) == 2, what="pool full")
        timeouts = [20000 + 500 * i for i in range(16)]
        random.Random(6).shuffle(timeouts)
        queued: dict[int, Peer] = {}

        def submit(chunk: list[int]) -> None:
            for timeout in chunk:
                peer = Peer(kernel, timeout_ms=timeout)
                peer.client.sendall(b"g")  # the engine answers as soon as it runs
                queued[peer.client.getsockname()[1]] = peer

        threads = [
            threading.Thread(target=submit, args=(timeouts[i::4],), daemon=True) for i in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        doc = daemon.wait_for(lambda d: d["queued"] == 16, what="sixteen queued")
        assert len(doc["workers"]) == 2
        holders[0].release()  # one worker drains the queue, one request at a time
        for peer in queued.values():
            assert peer.request.wait_done(30)[0] == 0
        holders[1].release()
        assert holders[1].request.wait_done(10)[0] == 0
        served = [
            int(port)
            for port in re.findall(
                r"peer=127\.0\.0\.1:(\d+): clienthello handshake succeeded", daemon.log()
            )
            if int(port) in queued
        ]
        by_deadline = sorted(queued, key=lambda port: queued[port].request.timeout_ms or 0)
        assert served == by_deadline
        assert all(r.done_count == 1 for r in kernel.requests)
        assert kernel.dones == 18 and kernel.pending == 0
        for peer in [*holders, *queued.values()]:
            peer.close()
