"""Engine x509/unauth handshakes against real openssl and GnuTLS peers on loopback.

Each success case ends the way the kernel would continue: the crypto_info the
engine handed to install_ktls is read back by tests/ktls_oracle.py, which then
exchanges application data with the real peer over the same socket.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from tlshd.workers.engine import perform_handshake

from tests.ktls_oracle import RecordLayer, read_application_data
from tests.peers import (
    Capture,
    FakeKeys,
    Pki,
    engine_context,
    gnutls_client,
    gnutls_server,
    loopback_listener,
    openssl_client,
    openssl_server,
)
from tlshd.credentials import RoleCredentials
from tlshd.ipc import X509_SERVER_PEER_ID
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import AuthMode, MsgType

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]

SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
]
GNUTLS_CIPHER = {
    "TLS_AES_128_GCM_SHA256": "AES-128-GCM",
    "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
    "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305",
    "TLS_AES_128_CCM_SHA256": "AES-128-CCM",
}


def gnutls_priority(suite: str) -> str:
    return f"NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+{GNUTLS_CIPHER[suite]}"


def client_params(
    sock: socket.socket, peername: str | None = "localhost", **kw: object
) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(),
        message_type=MsgType.CLIENTHELLO,
        auth_mode=kw.pop("auth_mode", AuthMode.UNAUTH),  # type: ignore[arg-type]
        peername=peername,
        **kw,  # type: ignore[arg-type]
    )


def server_params(sock: socket.socket, **kw: object) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(),
        message_type=MsgType.SERVERHELLO,
        auth_mode=AuthMode.X509,
        **kw,  # type: ignore[arg-type]
    )


def layers(capture: Capture) -> tuple[RecordLayer, RecordLayer]:
    assert len(capture.calls) == 1, "install_ktls must be called exactly once"
    tx, rx = capture.calls[0]
    return RecordLayer(tx), RecordLayer(rx)


def assert_ok(result: HandshakeResult, suite: str | None = None) -> None:
    assert result.status == 0, result.detail
    if suite is not None:
        assert result.cipher == suite


def assert_refused(result: HandshakeResult, capture: Capture, status: int = errno.EACCES) -> None:
    assert result.status == status, result
    assert capture.calls == [], "no keys may reach the kernel after a failed handshake"


def echo_through_reversing_server(sock: socket.socket, capture: Capture) -> None:
    """s_server -rev: our TX record must decrypt there, its reply must decrypt here."""
    tx, rx = layers(capture)
    sock.sendall(tx.seal(b"hello kernel\n"))
    data, types = read_application_data(sock, rx, b"lenrek olleh")
    assert b"lenrek olleh" in data
    assert types[-1] == 23


def s_server_args(pki: Pki, suite: str, *extra: str, issued: object = None) -> list[str]:
    issued = issued or pki.server
    return [
        "-cert",
        str(issued.cert_path),  # type: ignore[attr-defined]
        "-key",
        str(issued.key_path),  # type: ignore[attr-defined]
        "-tls1_3",
        "-ciphersuites",
        suite,
        "-rev",
        *extra,
    ]


# ------------------------------------------------------------------ client role


@pytest.mark.parametrize("suite", SUITES)
def test_client_unauth_openssl(pki: Pki, tmp_path: Path, suite: str) -> None:
    with openssl_server(s_server_args(pki, suite), tmp_path / "s_server.log") as peer:
        ctx, capture, phases = engine_context(pki)
        result = perform_handshake(peer.sock, client_params(peer.sock), ctx)
        assert_ok(result, suite)
        assert result.remote_auth == ()
        assert phases[0] == "clienthello" and phases[-1] == "ktls"
        echo_through_reversing_server(peer.sock, capture)


@pytest.mark.parametrize("suite", SUITES)
def test_client_unauth_gnutls(pki: Pki, tmp_path: Path, suite: str) -> None:
    args = [
        "--echo",
        "--priority",
        gnutls_priority(suite),
        "--x509certfile",
        str(pki.server.cert_path),
        "--x509keyfile",
        str(pki.server.key_path),
    ]
    with gnutls_server(args, tmp_path / "gnutls-serv.log") as peer:
        ctx, capture, _ = engine_context(pki)
        result = perform_handshake(peer.sock, client_params(peer.sock), ctx)
        assert_ok(result, suite)
        tx, rx = layers(capture)
        peer.sock.sendall(tx.seal(b"echo me\n"))
        data, _ = read_application_data(peer.sock, rx, b"echo me")
        assert data.startswith(b"echo me")


@pytest.mark.parametrize("peername", ["127.0.0.1", "localhost"])
def test_client_ip_and_dns_peernames(pki: Pki, tmp_path: Path, peername: str) -> None:
    args = s_server_args(pki, SUITES[0], "-tlsextdebug")
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(pki)
        assert_ok(perform_handshake(peer.sock, client_params(peer.sock, peername), ctx))
        echo_through_reversing_server(peer.sock, capture)
    # SNI carries DNS names only (RFC 6066 §3)
    assert ('"server name"' in peer.output()) == (peername == "localhost")


def test_client_ipv6_peername(pki: Pki, tmp_path: Path) -> None:
    with openssl_server(s_server_args(pki, SUITES[0]), tmp_path / "s.log", host="::1") as peer:
        ctx, capture, _ = engine_context(pki)
        assert_ok(perform_handshake(peer.sock, client_params(peer.sock, "::1"), ctx))
        echo_through_reversing_server(peer.sock, capture)


def test_client_without_peername_checks_numeric_address(pki: Pki, tmp_path: Path) -> None:
    with openssl_server(s_server_args(pki, SUITES[0]), tmp_path / "s.log") as peer:
        ctx, _capture, _ = engine_context(pki)
        assert_ok(perform_handshake(peer.sock, client_params(peer.sock, None), ctx))


@pytest.mark.parametrize(
    ("case", "peername"),
    [
        ("wrong-hostname", "wrong.example"),
        ("wrong-ip", "127.0.0.2"),
        ("expired", "localhost"),
        ("revoked", "localhost"),
        ("unknown-ca", "localhost"),
        ("system-store", "localhost"),
    ],
)
def test_client_rejects_bad_server(pki: Pki, tmp_path: Path, case: str, peername: str) -> None:
    issued = {"expired": pki.expired, "revoked": pki.revoked, "unknown-ca": pki.other_server}.get(
        case, pki.server
    )
    trust = RoleCredentials(truststore_pem=pki.ca.cert_pem, crl_pem=pki.crl_pem)
    if case == "system-store":
        trust = RoleCredentials()  # the test CA is not in the system store
    with openssl_server(s_server_args(pki, SUITES[0], issued=issued), tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(pki, client=trust)
        result = perform_handshake(peer.sock, client_params(peer.sock, peername), ctx)
        assert_refused(result, capture)
    expected = {
        "wrong-hostname": "hostname mismatch",
        "wrong-ip": "IP address mismatch",
        "expired": "expired",
        "revoked": "revoked",
        "unknown-ca": "local issuer",
        "system-store": "local issuer",
    }[case]
    assert expected in result.detail


def test_client_crl_configured_good_server(pki: Pki, tmp_path: Path) -> None:
    trust = RoleCredentials(truststore_pem=pki.ca.cert_pem, crl_pem=pki.crl_pem)
    with openssl_server(s_server_args(pki, SUITES[0]), tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(pki, client=trust)
        assert_ok(perform_handshake(peer.sock, client_params(peer.sock), ctx))
        echo_through_reversing_server(peer.sock, capture)


@pytest.mark.parametrize("source", ["config", "keyring"])
def test_client_x509_mutual(pki: Pki, tmp_path: Path, source: str) -> None:
    keys = FakeKeys()
    extra: dict[str, int] = {}
    client = RoleCredentials(pki.client.cert_pem, pki.client.key_pem, pki.ca.cert_pem)
    if source == "keyring":
        extra = {
            "cert_serial": keys.add("client cert", pki.client.cert_der),
            "privkey_serial": keys.add("client key", pki.client.key_der),
        }
        client = RoleCredentials(truststore_pem=pki.ca.cert_pem)  # no configured cert
    args = s_server_args(pki, SUITES[1], "-Verify", "1", "-CAfile", str(pki.ca.cert_path))
    with openssl_server(args, tmp_path / "s.log") as peer:
        ctx, capture, _ = engine_context(pki, keys=keys, client=client)
        params = client_params(peer.sock, auth_mode=AuthMode.X509, **extra)
        result = perform_handshake(peer.sock, params, ctx)
        assert_ok(result, SUITES[1])
        echo_through_reversing_server(peer.sock, capture)
    assert "client.test" in peer.output()
    # as upstream: every certificate the server sent becomes an asymmetric key;
    # s_server completes its chain from -CAfile, so it sends leaf and CA
    assert [d for _der, d in keys.added] == ["TLS x509 localhost"] * 2
    assert [der for der, _d in keys.added] == [pki.server.cert_der, pki.ca.cert_der]
    assert result.remote_auth == (0x7001, 0x7002)


def test_client_x509_without_certificate_is_eio_without_handshake(pki: Pki) -> None:
    listener = loopback_listener()
    sock = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    try:
        ctx, capture, _ = engine_context(
            pki, client=RoleCredentials(truststore_pem=pki.ca.cert_pem)
        )
        result = perform_handshake(sock, client_params(sock, auth_mode=AuthMode.X509), ctx)
        assert_refused(result, capture, errno.EIO)
        server_side.setblocking(False)
        with pytest.raises(BlockingIOError):
            server_side.recv(1)  # not even a ClientHello was sent
    finally:
        for s in (sock, server_side, listener):
            s.close()


# ------------------------------------------------------------------ server role


def _server_exchange(peer_sock: socket.socket, peer: object, capture: Capture) -> None:
    """We send "pong" (peer must print it), the peer sends "ping" (we must decrypt it)."""
    tx, rx = layers(capture)
    peer_sock.sendall(tx.seal(b"pong from kernel\n"))
    peer.wait_output("pong from kernel")  # type: ignore[attr-defined]
    peer.send_stdin(b"ping from peer\n")  # type: ignore[attr-defined]
    data, _ = read_application_data(peer_sock, rx, b"ping from peer")
    assert b"ping from peer" in data


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("with_cert", [False, True])
def test_server_openssl(pki: Pki, tmp_path: Path, suite: str, with_cert: bool) -> None:
    args = ["-quiet", "-CAfile", str(pki.ca.cert_path), "-tls1_3", "-ciphersuites", suite]
    if with_cert:
        args += ["-cert", str(pki.client.cert_path), "-key", str(pki.client.key_path)]
    listener = loopback_listener()
    with openssl_client(args, tmp_path / "s_client.log", listener) as peer:
        ctx, capture, phases = engine_context(pki)
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert_ok(result, suite)
        assert phases[0] == "serverhello"
        # UINT_MAX per certificate sent (upstream); s_client adds the CA from -CAfile
        assert result.remote_auth == ((X509_SERVER_PEER_ID,) * 2 if with_cert else ())
        _server_exchange(peer.sock, peer, capture)
    listener.close()


@pytest.mark.parametrize("suite", SUITES)
def test_server_gnutls(pki: Pki, tmp_path: Path, suite: str) -> None:
    args = [
        "--x509cafile",
        str(pki.ca.cert_path),
        "--priority",
        gnutls_priority(suite),
        "--x509certfile",
        str(pki.client.cert_path),
        "--x509keyfile",
        str(pki.client.key_path),
    ]
    listener = loopback_listener()
    with gnutls_client(args, tmp_path / "gnutls-cli.log", listener) as peer:
        ctx, capture, _ = engine_context(pki)
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert_ok(result, suite)
        assert result.remote_auth == (X509_SERVER_PEER_ID,)
        _server_exchange(peer.sock, peer, capture)
    listener.close()


def test_server_keyring_certificate(pki: Pki, tmp_path: Path) -> None:
    keys = FakeKeys()
    extra = {
        "cert_serial": keys.add("server cert", pki.server.cert_der),
        "privkey_serial": keys.add("server key", pki.server.key_der),
    }
    listener = loopback_listener()
    args = ["-quiet", "-CAfile", str(pki.ca.cert_path), "-verify_return_error"]
    with openssl_client(args, tmp_path / "c.log", listener) as peer:
        ctx, capture, _ = engine_context(
            pki, keys=keys, server=RoleCredentials(truststore_pem=pki.ca.cert_pem)
        )
        assert_ok(perform_handshake(peer.sock, server_params(peer.sock, **extra), ctx))
        _server_exchange(peer.sock, peer, capture)
    listener.close()


@pytest.mark.parametrize("case", ["unknown-ca", "revoked", "expired"])
def test_server_rejects_client_with_access_denied(pki: Pki, tmp_path: Path, case: str) -> None:
    issued = {"unknown-ca": pki.other_client, "revoked": pki.revoked, "expired": pki.expired}[case]
    args = [
        "-CAfile",
        str(pki.ca.cert_path),
        "-cert",
        str(issued.cert_path),
        "-key",
        str(issued.key_path),
    ]
    server = RoleCredentials(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem, pki.crl_pem)
    listener = loopback_listener()
    with openssl_client(args, tmp_path / "c.log", listener) as peer:
        ctx, capture, _ = engine_context(pki, server=server)
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert_refused(result, capture)
        peer.sock.close()  # what the kernel consumer does after a failed DONE
        peer.sock = None
        out = peer.wait_output("alert")
    assert "access denied" in out, out
    listener.close()


def test_server_without_certificate_sends_access_denied(pki: Pki, tmp_path: Path) -> None:
    listener = loopback_listener()
    with openssl_client(["-CAfile", str(pki.ca.cert_path)], tmp_path / "c.log", listener) as peer:
        ctx, capture, _ = engine_context(
            pki, server=RoleCredentials(truststore_pem=pki.ca.cert_pem)
        )
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        assert_refused(result, capture, errno.EIO)
        peer.sock.close()
        peer.sock = None
        out = peer.wait_output("alert")
    assert "access denied" in out, out
    listener.close()


def test_server_x509_ignores_a_client_psk(pki: Pki, tmp_path: Path) -> None:
    """A client that also offers a PSK still gets the certificate handshake."""
    args = ["-quiet", "-CAfile", str(pki.ca.cert_path), "-psk", "ab" * 32, "-psk_identity", "x"]
    listener = loopback_listener()
    with openssl_client(args, tmp_path / "c.log", listener) as peer:
        ctx, capture, _ = engine_context(pki)
        assert_ok(perform_handshake(peer.sock, server_params(peer.sock), ctx))
        _server_exchange(peer.sock, peer, capture)
    listener.close()
