"""Engine failure paths: deadlines, stalled and hostile peers, socket hygiene, status mapping."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tlshd.workers import ktls
from tlshd.workers.engine import perform_handshake

from tests.ktls_oracle import RecordLayer, read_application_data
from tests.peers import FakeKeys, Pki, engine_context, loopback_listener, openssl_server
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(60)


def client_params(sock: socket.socket, **kw: object) -> HandshakeParams:
    kw.setdefault("auth_mode", AuthMode.UNAUTH)
    kw.setdefault("peername", "localhost")
    return HandshakeParams(sockfd=sock.fileno(), message_type=MsgType.CLIENTHELLO, **kw)  # type: ignore[arg-type]


@contextmanager
def scripted_peer(script: Callable[[socket.socket], None]) -> Iterator[socket.socket]:
    """A loopback TCP peer running `script` on its accepted socket in a thread."""
    listener = loopback_listener()
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    stop = threading.Event()

    def run() -> None:
        try:
            script(theirs)
            stop.wait(30)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield ours
    finally:
        stop.set()
        thread.join(5)
        ours.close()
        theirs.close()


def silent(_sock: socket.socket) -> None:
    pass


def read_hello_then_stall_mid_record(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.sendall(struct.pack("!BHH", 22, 0x0303, 100) + b"\x02" * 10)  # 10 of 100 bytes


def read_hello_then_close(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.close()


def read_hello_then_reset(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_hello_then_garbage(sock: socket.socket) -> None:
    sock.recv(65536)
    sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)


def set_blocking_flag(sock: socket.socket, blocking: bool) -> None:
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    flags = flags & ~os.O_NONBLOCK if blocking else flags | os.O_NONBLOCK
    fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, flags)


def socket_state(sock: socket.socket) -> tuple[int, int, bytes, bytes]:
    return (
        fcntl.fcntl(sock.fileno(), fcntl.F_GETFL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16),
    )


@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize(
    "script", [silent, read_hello_then_stall_mid_record], ids=["silent", "mid-record"]
)
def test_stalled_peer_times_out_at_deadline(
    pki: Pki, blocking: bool, script: Callable[[socket.socket], None]
) -> None:
    with scripted_peer(script) as sock:
        set_blocking_flag(sock, blocking)
        before = socket_state(sock)
        ctx, capture, _ = engine_context(pki, timeout=0.6)
        started = time.monotonic()
        result = perform_handshake(sock, client_params(sock), ctx)
        elapsed = time.monotonic() - started
        assert result.status == errno.ETIMEDOUT, result
        assert capture.calls == []
        assert 0.5 <= elapsed < 1.5, elapsed
        # O_NONBLOCK untouched; TCP_NODELAY and timeouts put back
        assert socket_state(sock) == before


def test_stalled_client_times_out_in_server_role(pki: Pki) -> None:
    with scripted_peer(silent) as sock:
        ctx, capture, _ = engine_context(pki, timeout=0.4)
        params = HandshakeParams(
            sockfd=sock.fileno(), message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509
        )
        result = perform_handshake(sock, params, ctx)
        assert result.status == errno.ETIMEDOUT
        assert capture.calls == []


@pytest.mark.parametrize(
    ("script", "status"),
    [
        (read_hello_then_close, errno.ETIMEDOUT),  # premature close: let the consumer retry
        (read_hello_then_reset, errno.ETIMEDOUT),
        (read_hello_then_garbage, errno.EACCES),
    ],
    ids=["close", "reset", "garbage"],
)
def test_hostile_peers(pki: Pki, script: Callable[[socket.socket], None], status: int) -> None:
    with scripted_peer(script) as sock:
        ctx, capture, _ = engine_context(pki, timeout=5)
        result = perform_handshake(sock, client_params(sock), ctx)
        assert result.status == status, result
        assert capture.calls == []


def test_deadline_already_passed(pki: Pki) -> None:
    with scripted_peer(silent) as sock:
        ctx, capture, _ = engine_context(pki, timeout=-1)
        assert perform_handshake(sock, client_params(sock), ctx).status == errno.ETIMEDOUT
        assert capture.calls == []


@pytest.mark.peers
def test_worker_healthy_after_failures(pki: Pki, tmp_path: Path) -> None:
    """Failures leave no state behind: the same process then completes a handshake."""
    for script in (read_hello_then_garbage, read_hello_then_close, silent):
        with scripted_peer(script) as sock:
            ctx, _capture, _ = engine_context(pki, timeout=0.3)
            assert perform_handshake(sock, client_params(sock), ctx).status != 0
    args = ["-cert", str(pki.server.cert_path), "-key", str(pki.server.key_path), "-rev"]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(pki)
        result = perform_handshake(peer.sock, client_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        tx, rx = (RecordLayer(x) for x in capture.calls[0])
        peer.sock.sendall(tx.seal(b"still alive\n"))
        assert b"evila llits" in read_application_data(peer.sock, rx, b"evila llits")[0]


def test_not_tcp_is_eopnotsupp(pki: Pki) -> None:
    a, b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for sock in (a, udp):
            ctx, capture, _ = engine_context(pki)
            result = perform_handshake(sock, client_params(sock), ctx)
            assert result.status == errno.EOPNOTSUPP
            assert capture.calls == []
    finally:
        for s in (a, b, udp):
            s.close()


@pytest.mark.parametrize(
    ("message_type", "auth_mode"),
    [
        (MsgType.SERVERHELLO, AuthMode.UNAUTH),  # upstream: not supported
        (MsgType.UNSPEC, AuthMode.X509),
        (MsgType.CLIENTHELLO, AuthMode.UNSPEC),
    ],
)
def test_unsupported_modes_are_eio(pki: Pki, message_type: int, auth_mode: int) -> None:
    with scripted_peer(silent) as sock:
        ctx, capture, _ = engine_context(pki)
        params = HandshakeParams(
            sockfd=sock.fileno(), message_type=message_type, auth_mode=auth_mode
        )
        result = perform_handshake(sock, params, ctx)
        assert result.status == errno.EIO
        assert capture.calls == []


class _BrokenKeys(FakeKeys):
    def read_key(self, serial: int):  # type: ignore[no-untyped-def]
        raise RuntimeError("supervisor went away")


def test_never_raises_on_unexpected_errors(pki: Pki) -> None:
    with scripted_peer(silent) as sock:
        ctx, _capture, _ = engine_context(pki, keys=_BrokenKeys())
        params = client_params(sock, auth_mode=AuthMode.X509, cert_serial=1, privkey_serial=2)
        result = perform_handshake(sock, params, ctx)
        assert result.status == errno.EIO
        assert "internal error" in result.detail


@pytest.mark.peers
@pytest.mark.parametrize(
    "failure",
    [
        ktls.KtlsError("setsockopt(TCP_ULP, tls): kernel does not support kTLS"),
        OSError(errno.ENOENT, "x"),
    ],
)
def test_ktls_failure_after_handshake_is_eio(pki: Pki, tmp_path: Path, failure: Exception) -> None:
    args = ["-cert", str(pki.server.cert_path), "-key", str(pki.server.key_path)]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, _capture, _ = engine_context(pki)

        def failing_install(_sock: socket.socket, _tx: bytes, _rx: bytes) -> None:
            raise failure

        ctx.install_ktls = failing_install
        result = perform_handshake(peer.sock, client_params(peer.sock), ctx)
        assert result.status == errno.EIO
        assert result.remote_auth == ()


@pytest.mark.peers
def test_peer_gone_before_ktls_is_etimedout(pki: Pki, tmp_path: Path) -> None:
    """The handshake completed, then the ULP found the socket closed by the
    peer: a premature close (ETIMEDOUT, retried by the NFS client), not EIO."""
    args = ["-cert", str(pki.server.cert_path), "-key", str(pki.server.key_path)]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, _capture, _ = engine_context(pki)

        def closed_socket_install(_sock: socket.socket, _tx: bytes, _rx: bytes) -> None:
            raise ktls.KtlsError("setsockopt(TCP_ULP, tls): not connected", errno.ETIMEDOUT)

        ctx.install_ktls = closed_socket_install
        result = perform_handshake(peer.sock, client_params(peer.sock), ctx)
        assert result.status == errno.ETIMEDOUT


@pytest.mark.peers
def test_real_install_ktls_without_kernel_support_is_eio_or_ok(pki: Pki, tmp_path: Path) -> None:
    """The default install_ktls on this kernel: EIO with the readable reason if the
    tls module is missing, status 0 if kTLS took the keys."""
    from tlshd.workers.engine import HandshakeContext

    args = ["-cert", str(pki.server.cert_path), "-key", str(pki.server.key_path)]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, _capture, _ = engine_context(pki)
        ctx.install_ktls = HandshakeContext.install_ktls  # the module default
        result = perform_handshake(peer.sock, client_params(peer.sock), ctx)
        if result.status:
            assert result.status == errno.EIO
            assert "TCP_ULP" in result.detail or "TLS_" in result.detail
