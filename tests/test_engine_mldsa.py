"""ML-DSA certificates beside the classic ones (x509.pq.*), chosen by the
peer's signature_algorithms.

The bundled OpenSSL (4.0) signs and verifies ML-DSA; bookworm's OpenSSL 3.0
on this host does not, so it must be given the classic certificate.  The
ML-DSA leaf here is issued by the test PKI's (ECDSA) CA, so both leaves
verify against the same trust store.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from tlshd.workers.engine import perform_handshake

from tests.helpers.certs import cert_pem, issue_cert, key_pem
from tests.peers import (
    SERVER_SANS,
    FakeKeys,
    Pki,
    engine_context,
    loopback_listener,
    openssl_client,
)
from tlshd.credentials import RoleCredentials
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(60)
PQ_CN = "localhost ML-DSA-65"


def server_credentials(pki: Pki, with_pq: bool = True) -> RoleCredentials:
    ca_key = load_pem_private_key(pki.ca.key_pem, None)
    pq_key = mldsa.MLDSA65PrivateKey.generate()
    pq_leaf = issue_cert(
        PQ_CN, pq_key, (x509.load_pem_x509_certificate(pki.ca.cert_pem), ca_key),  # type: ignore[arg-type]
        eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=SERVER_SANS, key_ids=True,
    )  # fmt: skip
    return RoleCredentials(
        pki.server.cert_pem,
        pki.server.key_pem,
        pki.ca.cert_pem,
        pq_cert_chain_pem=cert_pem(pq_leaf) if with_pq else None,
        pq_private_key_pem=key_pem(pq_key) if with_pq else None,  # type: ignore[arg-type]
    )


def engine_pair(
    pki: Pki, server: RoleCredentials
) -> tuple[HandshakeResult, HandshakeResult, FakeKeys]:
    listener = loopback_listener()
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    results: dict[str, HandshakeResult] = {}
    server_ctx, _, _ = engine_context(pki, server=server)

    def serve() -> None:
        params = HandshakeParams(sockfd=server_sock.fileno(), message_type=MsgType.SERVERHELLO,
                                 auth_mode=AuthMode.X509)  # fmt: skip
        results["server"] = perform_handshake(server_sock, params, server_ctx)

    thread = threading.Thread(target=serve)
    thread.start()
    keys = FakeKeys()
    # x509 (mTLS) client: the one mode whose client keeps the server's chain
    mine = RoleCredentials(pki.client.cert_pem, pki.client.key_pem, pki.ca.cert_pem)
    client_ctx, _, _ = engine_context(pki, keys=keys, client=mine)
    params = HandshakeParams(sockfd=client_sock.fileno(), message_type=MsgType.CLIENTHELLO,
                             auth_mode=AuthMode.X509, peername="localhost")  # fmt: skip
    client = perform_handshake(client_sock, params, client_ctx)
    if client.status:
        client_sock.close()
    thread.join(10)
    client_sock.close()
    server_sock.close()
    return client, results["server"], keys


def presented_leaf(keys: FakeKeys) -> x509.Certificate:
    """The server leaf our client added to its (fake) keyring."""
    assert keys.added, "no peer certificate reached the keyring"
    return x509.load_der_x509_certificate(keys.added[0][0])


def test_ml_dsa_peer_gets_the_ml_dsa_certificate(pki: Pki) -> None:
    client, server, keys = engine_pair(pki, server_credentials(pki))
    assert (client.status, server.status) == (0, 0), (client, server)
    leaf = presented_leaf(keys)
    assert isinstance(leaf.public_key(), mldsa.MLDSA65PublicKey)
    assert leaf.subject.rfc4514_string() == f"CN={PQ_CN}"


def test_without_pq_pair_the_classic_certificate(pki: Pki) -> None:
    client, server, keys = engine_pair(pki, server_credentials(pki, with_pq=False))
    assert (client.status, server.status) == (0, 0), (client, server)
    assert not isinstance(presented_leaf(keys).public_key(), mldsa.MLDSA65PublicKey)


@pytest.mark.peers
def test_peer_without_ml_dsa_gets_the_classic_certificate(pki: Pki, tmp_path: Path) -> None:
    """bookworm's openssl 3.0 offers no ML-DSA signature scheme."""
    listener = loopback_listener()
    args = ["-CAfile", str(pki.ca.cert_path), "-verify_return_error", "-tls1_3"]
    with openssl_client(args, tmp_path / "c.log", listener) as peer:
        ctx, _capture, _ = engine_context(pki, server=server_credentials(pki))
        params = HandshakeParams(sockfd=peer.sock.fileno(), message_type=MsgType.SERVERHELLO,
                                 auth_mode=AuthMode.X509)  # fmt: skip
        result = perform_handshake(peer.sock, params, ctx)
        assert result.status == 0, result.detail
        out = peer.wait_output("Verify return code")
        assert "subject=CN = localhost\n" in out or "subject=CN=localhost\n" in out, out
        assert "ML-DSA" not in out
    listener.close()
