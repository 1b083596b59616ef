"""RFC 8449 record_size_limit: what OpenSSL allows, and what the engine does.

The kernel half (TLS_TX_MAX_PAYLOAD_LEN on 7.3, ENOPROTOOPT on 6.12) needs a
kernel with kTLS and runs in the lab; here the engine's decision is checked
against real peers with the capping step recorded instead of executed.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from tlshd.supervisor import tlsmodule
from tlshd.workers import kernelcaps, ktls, tlsctx
from tlshd.workers.engine import perform_handshake

from tests.peers import (
    Pki,
    engine_context,
    gnutls_client,
    gnutls_server,
    loopback_listener,
    openssl_client,
)
from tlshd.params import HandshakeParams
from tlshd.uapi import SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, AuthMode, MsgType

pytestmark = pytest.mark.timeout(60)


class CapRecorder:
    """A cap_tx_records stand-in: records (fd, max_payload), optionally fails."""

    def __init__(self, fail: OSError | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def __call__(self, sock: socket.socket, max_payload: int) -> None:
        self.calls.append((sock.fileno(), max_payload))
        if self.fail is not None:
            raise self.fail


def server_params(sock: socket.socket) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(), message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509
    )


# --- what the bundled OpenSSL can do (evidence for workers/engine.py) -----------


def _client_offering_limit(limit: int) -> tuple[SSL.Context, list[object]]:
    """A TLS 1.3 client context that offers record_size_limit through the only
    custom-extension API the cryptography wheel binds (the pre-TLS 1.3 one)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *_args: True)
    body = ffi.new("unsigned char[]", struct.pack("!H", limit))

    @ffi.callback("int(SSL *, unsigned int, unsigned char **, size_t *, int *, void *)")
    def add(_ssl, _type, out, outlen, _alert, _arg):  # type: ignore[no-untyped-def]
        out[0] = body
        outlen[0] = 2
        return 1

    assert (
        lib.SSL_CTX_add_client_custom_ext(
            ctx._context, tlsctx.EXT_RECORD_SIZE_LIMIT, add, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL
        )
        == 1
    )
    return ctx, [body, add]


def test_openssl_has_no_record_size_limit() -> None:
    """If this fails, OpenSSL handles the extension itself: negotiate it."""
    assert lib.SSL_extension_supported(tlsctx.EXT_RECORD_SIZE_LIMIT) == 0


@pytest.mark.peers
def test_openssl_client_cannot_take_the_servers_answer(pki: Pki, tmp_path: Path) -> None:
    """Offered through the bound API, the extension goes out in the ClientHello,
    but a server that implements RFC 8449 answers in EncryptedExtensions, which
    that API does not cover: OpenSSL aborts with "bad extension".  So the
    client role cannot offer it (if this fails, it can)."""
    ctx, keep = _client_offering_limit(16385)
    args = ["--x509certfile", str(pki.server.cert_path), "--x509keyfile", str(pki.server.key_path)]
    with gnutls_server([*args, "--recordsize=512"], tmp_path / "serv.log") as peer:
        conn = SSL.Connection(ctx, peer.sock)
        conn.set_connect_state()
        with pytest.raises(SSL.Error, match="bad extension"):
            conn.do_handshake()
    del keep


# --- parsing and arithmetic ------------------------------------------------------


def client_hello_with_limit(limit: int | None) -> bytes:
    """A real OpenSSL ClientHello handshake message, with record_size_limit
    `limit` (None: without the extension)."""
    if limit is None:
        ctx, keep = SSL.Context(SSL.TLS_METHOD), []
    else:
        ctx, keep = _client_offering_limit(limit)
    seen: list[bytes] = []

    @ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)")
    def on_message(write_p, _version, content_type, buf, length, _ssl, _arg):  # type: ignore[no-untyped-def]
        if write_p and content_type == tlsctx.CT_HANDSHAKE and length:
            seen.append(bytes(ffi.buffer(buf, length)))

    lib.SSL_CTX_set_msg_callback(ctx._context, on_message)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    del keep
    assert seen and seen[0][0] == tlsctx.HS_CLIENT_HELLO
    return seen[0]


@pytest.mark.parametrize("limit", [64, 512, 16385, 65535])
def test_client_hello_extension_found(limit: int) -> None:
    body = tlsctx.client_hello_extension(client_hello_with_limit(limit), 28)
    assert body == struct.pack("!H", limit)


def test_client_hello_extension_absent_or_malformed() -> None:
    hello = client_hello_with_limit(None)
    assert tlsctx.client_hello_extension(hello, 28) is None
    with_limit = client_hello_with_limit(512)
    for cut in (0, 10, 40, len(with_limit) // 2):
        assert tlsctx.client_hello_extension(with_limit[:cut], 28) in (None, b"\x02\x00")
    assert tlsctx.client_hello_extension(b"\x01\x00\x00\x02\xff", 28) is None


@pytest.mark.parametrize(
    ("limit", "payload"), [(64, 63), (512, 511), (16384, 16383), (16385, None), (65535, None)]
)
def test_tx_max_payload_for(limit: int, payload: int | None) -> None:
    """TLS 1.3's limit counts the ContentType byte; the kernel's option does not."""
    assert ktls.tx_max_payload_for(limit) == payload


def test_limit_below_rfc_minimum_is_an_error() -> None:
    with pytest.raises(ktls.KtlsError, match="below 64"):
        ktls.tx_max_payload_for(63)


# --- the kernel step -------------------------------------------------------------


class RecordingSocket:
    def __init__(self, err: int | None = None) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.err = err

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        if self.err is not None:
            raise OSError(self.err, "refused")
        self.calls.append((level, option, value))


def test_cap_tx_records_sets_a_host_endian_u16() -> None:
    sock = RecordingSocket()
    ktls.cap_tx_records(sock, 511)  # type: ignore[arg-type]
    assert sock.calls == [(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", 511))]


def test_cap_tx_records_error_names_the_option() -> None:
    with pytest.raises(ktls.KtlsError, match="TLS_TX_MAX_PAYLOAD_LEN=511") as info:
        ktls.cap_tx_records(RecordingSocket(errno.ENOPROTOOPT), 511)  # type: ignore[arg-type]
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize(
    ("loaded", "probe", "expected"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
def test_ensure_tls_module_tells_the_engine(
    monkeypatch: pytest.MonkeyPatch, loaded: bool, probe: bool, expected: bool
) -> None:
    monkeypatch.setattr(tlsmodule, "_load_tls_module", lambda: loaded)
    monkeypatch.setattr(tlsmodule, "tx_max_payload_len_supported", lambda: probe)
    monkeypatch.setattr(kernelcaps, "_caps_tx_records", not expected)
    assert tlsmodule.ensure_tls_module() is loaded
    assert kernelcaps.caps_tx_records() is expected
    assert (ktls.tx_record_capper() is ktls.cap_tx_records) is expected
    ctx, _capture, _phases = engine_context()
    assert (ctx.cap_tx_records is not None) is expected


def test_a_process_that_never_probed_never_caps() -> None:
    assert kernelcaps._caps_tx_records is False  # module default
    assert engine_context()[0].cap_tx_records is None


# --- the engine against real peers -----------------------------------------------


def gnutls_args(pki: Pki, *extra: str) -> list[str]:
    return ["--x509cafile", str(pki.ca.cert_path), *extra]


@pytest.mark.peers
@pytest.mark.parametrize("recordsize", [512, 1000, 4096])  # gnutls-cli refuses 64
def test_server_caps_records_at_the_clients_limit(
    pki: Pki, tmp_path: Path, recordsize: int
) -> None:
    """gnutls-cli --recordsize=N counts data bytes: in TLS 1.3 it sends the
    limit N + 1 (the ContentType byte), so the kernel is told N."""
    listener = loopback_listener()
    args = gnutls_args(pki, f"--recordsize={recordsize}")
    with gnutls_client(args, tmp_path / "cli.log", listener) as peer:
        ctx, capture, _ = engine_context(pki)
        ctx.cap_tx_records = cap = CapRecorder()
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        assert len(capture.calls) == 1  # TLS_TX and TLS_RX first, then the cap
        assert cap.calls == [(peer.sock.fileno(), recordsize)]
    listener.close()


@pytest.mark.peers
def test_server_without_the_kernel_option_keeps_working(pki: Pki, tmp_path: Path) -> None:
    """6.12: no TLS_TX_MAX_PAYLOAD_LEN.  The limit was not negotiated (we do
    not acknowledge it), so full-size records are correct: status 0."""
    listener = loopback_listener()
    with gnutls_client(gnutls_args(pki, "--recordsize=512"), tmp_path / "c.log", listener) as peer:
        ctx, capture, _ = engine_context(pki)
        assert ctx.cap_tx_records is None
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        assert len(capture.calls) == 1
    listener.close()


@pytest.mark.peers
def test_server_cap_refused_is_not_fatal(pki: Pki, tmp_path: Path) -> None:
    """Upstream 1.4.0's failure mode (EIO on ENOPROTOOPT) is not ours."""
    listener = loopback_listener()
    with gnutls_client(gnutls_args(pki, "--recordsize=512"), tmp_path / "c.log", listener) as peer:
        ctx, _capture, _ = engine_context(pki)
        ctx.cap_tx_records = cap = CapRecorder(OSError(errno.ENOPROTOOPT, "Protocol not available"))
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        assert cap.calls == [(peer.sock.fileno(), 512)]
    listener.close()


@pytest.mark.peers
@pytest.mark.parametrize("client", ["openssl", "gnutls-default"])
def test_server_without_a_limit_does_not_cap(pki: Pki, tmp_path: Path, client: str) -> None:
    """s_client sends no record_size_limit; gnutls-cli by default sends one
    that allows full records: nothing to cap."""
    listener = loopback_listener()
    if client == "openssl":
        args = ["-quiet", "-CAfile", str(pki.ca.cert_path), "-tls1_3"]
        peer_cm = openssl_client(args, tmp_path / "c.log", listener)
    else:
        peer_cm = gnutls_client(gnutls_args(pki), tmp_path / "c.log", listener)
    with peer_cm as peer:
        ctx, _capture, _ = engine_context(pki)
        ctx.cap_tx_records = cap = CapRecorder()
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        assert cap.calls == []
    listener.close()


def test_client_role_never_offers_the_extension() -> None:
    """Offering it would abort the handshake with any RFC 8449 server (above)."""
    listener = loopback_listener()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    received: list[bytes] = []

    def read_hello_and_close() -> None:
        header = server.recv(5, socket.MSG_WAITALL)
        received.append(server.recv(int.from_bytes(header[3:5], "big"), socket.MSG_WAITALL))
        server.close()

    reader = threading.Thread(target=read_hello_and_close)
    reader.start()
    ctx, _capture, _ = engine_context(timeout=10)
    params = HandshakeParams(
        sockfd=client.fileno(),
        message_type=MsgType.CLIENTHELLO,
        auth_mode=AuthMode.UNAUTH,
        peername="localhost",
    )
    result = perform_handshake(client, params, ctx)
    reader.join(10)
    client.close()
    assert result.status == errno.ETIMEDOUT  # we hung up after the ClientHello
    assert received and received[0][0] == tlsctx.HS_CLIENT_HELLO
    assert tlsctx.client_hello_extension(received[0], 43) is not None  # supported_versions
    assert tlsctx.client_hello_extension(received[0], tlsctx.EXT_RECORD_SIZE_LIMIT) is None
