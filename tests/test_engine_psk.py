"""Engine TLS 1.3 PSK handshakes (NVMe/TCP) against openssl, GnuTLS and itself."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pytest
from tlshd.workers.engine import perform_handshake

from tests.ktls_oracle import RecordLayer, read_application_data
from tests.peers import (
    FakeKeys,
    engine_context,
    gnutls_client,
    gnutls_server,
    loopback_listener,
    openssl_client,
    openssl_server,
    psk_session_pem,
)
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(60)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
SUBNQN = "nqn.2014-08.org.example:target"
ID_SHA256 = f"NVMe0R01 {HOSTNQN} {SUBNQN}"
ID_SHA384 = f"NVMe0R02 {HOSTNQN} {SUBNQN}"
CIPHER_ID = {"TLS_AES_128_GCM_SHA256": b"\x13\x01", "TLS_AES_256_GCM_SHA384": b"\x13\x02"}
KEYRING = 0x3F00


def psk_case(key_len: int) -> tuple[str, bytes, str]:
    """(identity, key, suite) for a 32-byte (SHA-256) or 48-byte (SHA-384) PSK."""
    key = os.urandom(key_len)
    if key_len == 48:
        return ID_SHA384, key, "TLS_AES_256_GCM_SHA384"
    return ID_SHA256, key, "TLS_AES_128_GCM_SHA256"


def client_params(sock: socket.socket, serials: tuple[int, ...]) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(),
        message_type=MsgType.CLIENTHELLO,
        auth_mode=AuthMode.PSK,
        peer_identities=serials,
        timeout_ms=10000,
    )


def server_params(sock: socket.socket) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(),
        message_type=MsgType.SERVERHELLO,
        auth_mode=AuthMode.PSK,
        peer_identities=(0,),  # what nvmet sends
        keyring=KEYRING,
    )


def openssl_psk_args(tmp_path: Path, identity: str, key: bytes, suite: str) -> list[str]:
    """-psk for SHA-256 (openssl's default PSK hash), -psk_session for SHA-384."""
    args = ["-psk_identity", identity, "-tls1_3", "-ciphersuites", suite]
    if suite.endswith("SHA384"):
        session = tmp_path / "psk-session.pem"
        session.write_bytes(psk_session_pem(key, CIPHER_ID[suite]))
        return [*args, "-psk_session", str(session)]
    return [*args, "-psk", key.hex()]


@pytest.mark.peers
@pytest.mark.parametrize("key_len", [32, 48])
def test_client_psk_openssl(tmp_path: Path, key_len: int) -> None:
    identity, key, suite = psk_case(key_len)
    keys = FakeKeys()
    serial = keys.add(identity, key)
    args = [*openssl_psk_args(tmp_path, identity, key, suite), "-nocert", "-rev"]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, client_params(peer.sock, (serial,)), ctx)
        assert result.status == 0, result.detail
        assert result.cipher == suite
        assert result.remote_auth == (serial,)  # nvme-tcp key_lookup()s this serial
        tx, rx = (RecordLayer(x) for x in capture.calls[0])
        peer.sock.sendall(tx.seal(b"nvme icreq\n"))
        assert b"qerci emvn" in read_application_data(peer.sock, rx, b"qerci emvn")[0]


@pytest.mark.peers
def test_client_psk_ccm_openssl(tmp_path: Path) -> None:
    identity, key, _ = psk_case(32)
    keys = FakeKeys()
    serial = keys.add(identity, key)
    suite = "TLS_AES_128_CCM_SHA256"
    args = [*openssl_psk_args(tmp_path, identity, key, suite), "-nocert", "-rev"]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, client_params(peer.sock, (serial,)), ctx)
        assert (result.status, result.cipher) == (0, suite), result.detail
        tx, rx = (RecordLayer(x) for x in capture.calls[0])
        peer.sock.sendall(tx.seal(b"ccm\n"))
        assert b"mcc" in read_application_data(peer.sock, rx, b"mcc")[0]


@pytest.mark.peers
@pytest.mark.parametrize(
    ("key_len", "offered"),
    [
        (32, None),
        (48, None),
        # upstream tlshd's psk_sha384 list, and a SHA-256 PSK with SHA-384 listed first
        (48, "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"),
        (32, "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"),
    ],
)
def test_server_psk_openssl(tmp_path: Path, key_len: int, offered: str | None) -> None:
    identity, key, suite = psk_case(key_len)
    keys = FakeKeys()
    keys.add("some other key", os.urandom(32))
    serial = keys.add(identity, key)
    listener = loopback_listener()
    args = ["-quiet", *openssl_psk_args(tmp_path, identity, key, suite)]
    if offered is not None:
        args[args.index(suite)] = offered
    with openssl_client(args, tmp_path / "c.log", listener) as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        assert result.cipher == suite
        assert result.remote_auth == (serial,)
        assert keys.searches == [((identity,), KEYRING)]
        tx, rx = (RecordLayer(x) for x in capture.calls[0])
        peer.sock.sendall(tx.seal(b"icresp\n"))
        peer.wait_output("icresp")
        peer.send_stdin(b"icreq\n")
        assert b"icreq" in read_application_data(peer.sock, rx, b"icreq")[0]
    listener.close()


GNUTLS_PSK_PRIORITY = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"


@pytest.mark.peers
def test_server_psk_gnutls(tmp_path: Path) -> None:
    identity, key, _suite = psk_case(32)
    keys = FakeKeys()
    serial = keys.add(identity, key)
    listener = loopback_listener()
    args = ["--priority", GNUTLS_PSK_PRIORITY, "--pskusername", identity, "--pskkey", key.hex()]
    with gnutls_client(args, tmp_path / "cli.log", listener) as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == 0, result.detail
        assert result.remote_auth == (serial,)
        tx, rx = (RecordLayer(x) for x in capture.calls[0])
        peer.sock.sendall(tx.seal(b"from the target\n"))
        peer.wait_output("from the target")
        peer.send_stdin(b"from the host\n")
        assert b"from the host" in read_application_data(peer.sock, rx, b"from the host")[0]
    listener.close()


@pytest.mark.peers
def test_client_psk_gnutls(tmp_path: Path) -> None:
    # gnutls-serv's passwd file is "identity:hexkey", so no ':' (and no NQN) in it
    identity, key = "NVMe0R01 host-nqn subsystem-nqn", os.urandom(32)
    keys = FakeKeys()
    serial = keys.add(identity, key)
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"{identity}:{key.hex()}\n")
    args = ["--echo", "--priority", GNUTLS_PSK_PRIORITY, "--pskpasswd", str(passwd)]
    with gnutls_server(args, tmp_path / "serv.log") as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, client_params(peer.sock, (serial,)), ctx)
        assert result.status == 0, result.detail
        assert result.remote_auth == (serial,)
        tx, rx = (RecordLayer(x) for x in capture.calls[0])
        peer.sock.sendall(tx.seal(b"echo psk\n"))
        assert b"echo psk" in read_application_data(peer.sock, rx, b"echo psk")[0]


def run_pair(
    client_keys: FakeKeys, serials: tuple[int, ...], server_keys: FakeKeys
) -> tuple[HandshakeResult, HandshakeResult, list, list]:
    """Our client engine against our server engine over loopback TCP."""
    listener = loopback_listener()
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    server_ctx, server_capture, _ = engine_context(keys=server_keys, timeout=5)
    results: dict[str, HandshakeResult] = {}

    def serve() -> None:
        results["server"] = perform_handshake(server_sock, server_params(server_sock), server_ctx)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client_ctx, client_capture, _ = engine_context(keys=client_keys, timeout=5)
        client = perform_handshake(client_sock, client_params(client_sock, serials), client_ctx)
        if client.status:
            client_sock.close()  # as the kernel would; unblocks a waiting server
    finally:
        thread.join(10)
        client_sock.close()
        server_sock.close()
    return client, results["server"], client_capture.calls, server_capture.calls


@pytest.mark.parametrize("key_len", [32, 48])
def test_engine_to_engine_psk(key_len: int) -> None:
    identity, key, suite = psk_case(key_len)
    client_keys, server_keys = FakeKeys(), FakeKeys()
    client_serial = client_keys.add(identity, key)
    server_serial = server_keys.add(identity, key, serial=0x5555)
    client, server, client_calls, server_calls = run_pair(
        client_keys, (client_serial,), server_keys
    )
    assert (client.status, server.status) == (0, 0), (client, server)
    assert client.cipher == server.cipher == suite
    assert client.remote_auth == (client_serial,)
    assert server.remote_auth == (server_serial,)
    # one side's TX is the other side's RX
    assert client_calls[0][0] == server_calls[0][1]
    assert client_calls[0][1] == server_calls[0][0]


def test_unknown_identity_is_ekeyrejected() -> None:
    """The server answers unknown_psk_identity; the client reports EKEYREJECTED so
    the NVMe host can revoke the key and redo authentication."""
    identity, key, _ = psk_case(48)
    client_keys = FakeKeys()
    serial = client_keys.add(identity, key)
    server_keys = FakeKeys()
    server_keys.add(ID_SHA384.replace("target", "elsewhere"), key)
    client, server, client_calls, server_calls = run_pair(client_keys, (serial,), server_keys)
    assert client.status == errno.EKEYREJECTED, client
    assert server.status == errno.EKEYREJECTED, server
    assert client_calls == server_calls == []


@pytest.mark.peers
@pytest.mark.parametrize("key_len", [32, 48])
def test_server_unknown_identity_openssl_is_ekeyrejected(tmp_path: Path, key_len: int) -> None:
    """openssl s_client offers an identity we hold no key for: we answer
    unknown_psk_identity (the client sees it) and report EKEYREJECTED."""
    identity, key, suite = psk_case(key_len)
    keys = FakeKeys()
    keys.add(identity.replace("target", "elsewhere"), key)
    listener = loopback_listener()
    with openssl_client(
        openssl_psk_args(tmp_path, identity, key, suite), tmp_path / "c.log", listener
    ) as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert result.status == errno.EKEYREJECTED, result
        assert capture.calls == []
        assert keys.searches == [((identity,), KEYRING)]
        assert "unknown psk identity" in peer.wait_output("alert").lower()
    listener.close()


@pytest.mark.peers
def test_client_identity_refused_without_the_alert_is_eacces(tmp_path: Path) -> None:
    """openssl s_server knows only another identity and fails the handshake
    with handshake_failure, not unknown_psk_identity: nothing says our key is
    stale, so the status stays EACCES."""
    identity, key, suite = psk_case(32)
    keys = FakeKeys()
    serial = keys.add(identity, key)
    args = [*openssl_psk_args(tmp_path, "some other identity", key, suite), "-nocert"]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, client_params(peer.sock, (serial,)), ctx)
        assert result.status == errno.EACCES, result
        assert capture.calls == []


def test_wrong_key_is_eacces() -> None:
    identity, key, _ = psk_case(32)
    client_keys, server_keys = FakeKeys(), FakeKeys()
    serial = client_keys.add(identity, key)
    server_keys.add(identity, os.urandom(32))
    client, server, client_calls, server_calls = run_pair(client_keys, (serial,), server_keys)
    assert client.status == errno.EACCES, client
    assert server.status == errno.EACCES, server  # binder does not verify
    assert client_calls == server_calls == []


def test_first_usable_identity_is_offered() -> None:
    identity, key, _ = psk_case(32)
    client_keys, server_keys = FakeKeys(), FakeKeys()
    good = client_keys.add(identity, key)
    server_keys.add(identity, key)
    client, server, _, _ = run_pair(client_keys, (0xDEAD, good), server_keys)  # 0xDEAD unreadable
    assert (client.status, server.status) == (0, 0)
    assert client.remote_auth == (good,)


@pytest.mark.parametrize(
    ("serials", "description"),
    [((), None), ((0x10,), f"NVMe0R03 {HOSTNQN} {SUBNQN}"), ((0xBAD,), None)],
    ids=["no-identities", "invalid-hmac", "unreadable"],
)
def test_client_psk_local_problems_are_eio(
    serials: tuple[int, ...], description: str | None
) -> None:
    keys = FakeKeys()
    if description is not None:
        keys.add(description, os.urandom(32), serial=0x10)
    listener = loopback_listener()
    sock = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    try:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(sock, client_params(sock, serials), ctx)
        assert result.status == errno.EIO, result
        assert capture.calls == []
    finally:
        sock.close()
        peer.close()


@pytest.mark.peers
def test_client_psk_refuses_certificate_fallback(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server that ignores our PSK and authenticates with a certificate must not
    give us a session: nothing would authenticate it."""
    identity, key, _ = psk_case(32)
    keys = FakeKeys()
    serial = keys.add(identity, key)
    args = ["-cert", str(pki.server.cert_path), "-key", str(pki.server.key_path), "-tls1_3"]
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(keys=keys)
        result = perform_handshake(peer.sock, client_params(peer.sock, (serial,)), ctx)
        assert result.status == errno.EACCES, result
        assert capture.calls == []
