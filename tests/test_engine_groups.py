"""Post-quantum hybrid key exchange (X25519MLKEM768) and its fallback.

The bundled OpenSSL (4.0 in the cryptography wheel) offers X25519MLKEM768
first, with an X25519 key share beside it, and accepts it as a server; the
engine keeps OpenSSL's default groups.  Peers without ML-KEM (this host's
Debian bookworm OpenSSL 3.0 and GnuTLS 3.7) must still get a handshake, over
the classic group they sent a key share for.  Interop with ML-KEM peers
(OpenSSL 3.6, GnuTLS 3.8.13) is the engine against itself here.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tlshd.workers.engine import perform_handshake

from tests.peers import (
    FakeKeys,
    Pki,
    engine_context,
    gnutls_client,
    gnutls_server,
    loopback_listener,
    openssl_client,
    openssl_server,
)
from tests.test_engine_psk import psk_case, run_pair
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(60)
HYBRID = "X25519MLKEM768"
# what the peers without ML-KEM share first: OpenSSL 3.0 X25519, GnuTLS 3.7 P-256
CLASSIC = {"x25519", "secp256r1"}


def test_engine_to_engine_uses_the_hybrid_group() -> None:
    identity, key, _ = psk_case(32)
    client_keys, server_keys = FakeKeys(), FakeKeys()
    serial = client_keys.add(identity, key)
    server_keys.add(identity, key)
    client, server, _, _ = run_pair(client_keys, (serial,), server_keys)
    assert (client.status, server.status) == (0, 0), (client, server)
    assert client.group == server.group == HYBRID


def server_params(sock: socket.socket) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(), message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509
    )


def client_params(sock: socket.socket) -> HandshakeParams:
    return HandshakeParams(
        sockfd=sock.fileno(),
        message_type=MsgType.CLIENTHELLO,
        auth_mode=AuthMode.UNAUTH,
        peername="localhost",
    )


@pytest.mark.peers
@pytest.mark.parametrize("peer", ["openssl", "gnutls"])
def test_server_falls_back_for_a_client_without_ml_kem(pki: Pki, tmp_path: Path, peer: str) -> None:
    listener = loopback_listener()
    if peer == "openssl":
        cm = openssl_client(["-quiet", "-CAfile", str(pki.ca.cert_path)], tmp_path / "c", listener)
    else:
        cm = gnutls_client(["--x509cafile", str(pki.ca.cert_path)], tmp_path / "c", listener)
    with cm as client:
        ctx, capture, _ = engine_context(pki)
        result = perform_handshake(client.sock, server_params(client.sock), ctx)
        assert result.status == 0, result.detail
        assert result.group in CLASSIC
        assert len(capture.calls) == 1
    listener.close()


@pytest.mark.peers
@pytest.mark.parametrize("peer", ["openssl", "gnutls"])
def test_client_falls_back_for_a_server_without_ml_kem(pki: Pki, tmp_path: Path, peer: str) -> None:
    cert, key = str(pki.server.cert_path), str(pki.server.key_path)
    if peer == "openssl":
        cm = openssl_server(["-cert", cert, "-key", key, "-tls1_3"], tmp_path / "s")
    else:
        cm = gnutls_server(["--x509certfile", cert, "--x509keyfile", key], tmp_path / "s")
    with cm as server:
        ctx, capture, _ = engine_context(pki)
        result = perform_handshake(server.sock, client_params(server.sock), ctx)
        assert result.status == 0, result.detail
        assert result.group in CLASSIC
        assert len(capture.calls) == 1
