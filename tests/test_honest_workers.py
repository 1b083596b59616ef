"""Honest workers are not killed over data the peer controls (issue 11 #6, #8, #4).

Each case used to end in DONE(EIO) and a killed worker: a certificate the
kernel refuses (serial 0 in REMOTE_AUTH), a chain of more than five
certificates, a PSK identity over 1,024 characters.  Now each gets a clean
status and the worker lives on; the limits the worker trims to are the ones
the supervisor enforces (tlshd/ipc.py).  Real engine, fake kernel, real peers.
"""

from __future__ import annotations

import datetime
import errno
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from tlshd.workers.engine import perform_handshake

from tests.fakekernel import FakeKernel
from tests.helpers.clienthello import read_alert, send_client_hello
from tests.helpers.daemon import Daemon, running_daemon, tcp_pair
from tests.helpers.engines import accept_ktls
from tests.peers import SERVER_SANS, FakeKeys, Pki, engine_context, openssl_server
from tlshd import ipc
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.log import log
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]

ALERT_UNKNOWN_PSK_IDENTITY = 115
ALERT_HANDSHAKE_FAILURE = 40


class Keys:
    """A key service for the daemon: certificates get serials 5000, 5001, ...
    unless `refuse_certs` (as the kernel refuses an Ed25519 key with ENOPKG);
    PSK searches are logged and find nothing."""

    def __init__(self, refuse_certs: bool = False) -> None:
        self.refuse_certs = refuse_certs
        self.next_serial = 5000

    def answer(self, scope: Any, request: ipc.KeyRequest) -> ipc.KeyReply:
        if request.op == "add_cert":
            if self.refuse_certs:
                return ipc.KeyReply.failure(errno.EKEYREJECTED)
            self.next_serial += 1
            return ipc.KeyReply(True, 0, self.next_serial, request.description)
        if request.op == "psk_search":
            log.info(
                "TEST psk_search: %d identities, longest %d",
                len(request.identities),
                max(map(len, request.identities)),
            )
        return ipc.KeyReply.failure(errno.ENOKEY)


def assert_not_killed(daemon: Daemon) -> None:
    text = daemon.log()
    assert "sent an invalid message" not in text and "killing it" not in text, text


def client_x509(pki: Pki) -> Credentials:
    return Credentials(
        client=RoleCredentials(pki.client.cert_pem, pki.client.key_pem, pki.ca.cert_pem)
    )


def long_chain(directory: Path, intermediates: int) -> tuple[Path, Path, Path, bytes]:
    """(leaf cert, leaf key, intermediates file, root PEM): root -> n CAs -> leaf."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject: str, issuer: Any, ca: bool) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)])
        issuer_cert, issuer_key = issuer if issuer else (None, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_cert.subject if issuer_cert else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            ).add_extension(x509.SubjectAlternativeName(SERVER_SANS), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()), key

    root = issue("chain root", None, True)
    chain = [root]
    for depth in range(intermediates):
        chain.append(issue(f"chain CA {depth}", chain[-1], True))
    leaf = issue("localhost", chain[-1], False)
    pem = serialization.Encoding.PEM
    paths = directory / "leaf.pem", directory / "leaf.key", directory / "chain.pem"
    paths[0].write_bytes(leaf[0].public_bytes(pem))
    paths[1].write_bytes(
        leaf[1].private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].write_bytes(b"".join(c.public_bytes(pem) for c, _ in reversed(chain[1:])))
    return *paths, root[0].public_bytes(pem)


def test_certificate_the_kernel_refuses_is_success_without_ids(
    pki: Pki, tmp_path: Path, openssl_bin: str
) -> None:
    """add_cert fails (the kernel lacks the key's algorithm): the verified session
    still succeeds, REMOTE_AUTH without the certificate, no kill."""
    args = ["-cert", str(pki.server.cert_path), "-key", str(pki.server.key_path), "-tls1_3"]
    with (
        FakeKernel() as kernel,
        running_daemon(
            kernel,
            perform_handshake,
            credentials=client_x509(pki),
            keyservice=Keys(refuse_certs=True),
            install_ktls=accept_ktls,
        ) as daemon,
        openssl_server(args, tmp_path / "s_server.log") as peer,
    ):
        request = kernel.submit(peer.sock, MsgType.CLIENTHELLO, AuthMode.X509, peername="localhost")
        assert request.wait_done(30) == (0, ())
        assert_not_killed(daemon)


def test_chain_of_more_than_five_certificates_gives_five_ids(
    pki: Pki, tmp_path: Path, openssl_bin: str
) -> None:
    leaf, key, chain, root_pem = long_chain(tmp_path, intermediates=6)
    client = Credentials(client=RoleCredentials(pki.client.cert_pem, pki.client.key_pem, root_pem))
    args = ["-cert", str(leaf), "-key", str(key), "-cert_chain", str(chain), "-tls1_3"]
    with (
        FakeKernel() as kernel,
        running_daemon(
            kernel,
            perform_handshake,
            credentials=client,
            keyservice=Keys(),
            install_ktls=accept_ktls,
        ) as daemon,  # fmt: skip
        openssl_server(args, tmp_path / "s_server.log") as peer,
    ):
        request = kernel.submit(peer.sock, MsgType.CLIENTHELLO, AuthMode.X509, peername="localhost")
        status, ids = request.wait_done(30)
        assert (status, len(ids)) == (0, ipc.MAX_REMOTE_AUTH)
        assert_not_killed(daemon)


def hostile_psk_client(kernel: FakeKernel, identities: list[bytes]) -> tuple[Any, int | None]:
    """Submit a PSK server request whose peer sends `identities`; (request, alert)."""
    client, server = tcp_pair()
    request = kernel.submit(
        server, MsgType.SERVERHELLO, AuthMode.PSK, peer_identities=(0,), keyring=0
    )
    send_client_hello(client, identities)
    alert = read_alert(client)
    client.close()
    server.close()
    return request, alert


def psk_daemon(kernel: FakeKernel) -> Any:
    return running_daemon(kernel, perform_handshake, keyservice=Keys(), install_ktls=accept_ktls)


def test_psk_identity_over_1024_characters_is_looked_up_not_killed() -> None:
    with FakeKernel() as kernel, psk_daemon(kernel) as daemon:
        request, alert = hostile_psk_client(kernel, [b"x" * 2000])
        assert alert == ALERT_UNKNOWN_PSK_IDENTITY
        assert request.wait_done(30) == (errno.EKEYREJECTED, ())
        daemon.wait_for_log("TEST psk_search: 1 identities, longest 2000")
        assert_not_killed(daemon)


def test_psk_identity_longer_than_any_key_description_is_not_asked_for() -> None:
    with FakeKernel() as kernel, psk_daemon(kernel) as daemon:
        request, _alert = hostile_psk_client(kernel, [b"y" * 5000])
        assert request.wait_done(30) == (errno.EKEYREJECTED, ())
        assert "TEST psk_search" not in daemon.log()
        assert_not_killed(daemon)


def test_1400_identities_are_one_capped_search() -> None:
    """One ClientHello with 1,400 identities: one key request to the supervisor,
    for MAX_PSK_IDENTITIES of them (issue 11 #8)."""
    with FakeKernel() as kernel, psk_daemon(kernel) as daemon:
        request, alert = hostile_psk_client(kernel, [b"i%04d" % i for i in range(1400)])
        assert alert == ALERT_UNKNOWN_PSK_IDENTITY
        assert request.wait_done(30) == (errno.EKEYREJECTED, ())
        text = daemon.log()
        assert text.count("TEST psk_search") == 1, text
        assert f"TEST psk_search: {ipc.MAX_PSK_IDENTITIES} identities" in text
        assert_not_killed(daemon)


def test_server_psk_engine_searches_once_for_the_offered_identities() -> None:
    """In-process engine: the search names exactly the identities offered,
    in order, and is made once although OpenSSL calls back per identity."""
    keys = FakeKeys()
    ctx, _capture, _phases = engine_context(keys=keys)
    client, server = tcp_pair()
    params = HandshakeParams(
        sockfd=server.fileno(),
        message_type=MsgType.SERVERHELLO,
        auth_mode=AuthMode.PSK,
        peer_identities=(0,),
        keyring=77,
    )
    offered = [b"first", b"\xff\xfe not utf-8", b"third"]
    sender = threading.Thread(target=send_client_hello, args=(client, offered))
    sender.start()
    result = perform_handshake(server, params, ctx)
    sender.join()
    client.close()
    server.close()
    assert result.status == errno.EKEYREJECTED
    assert keys.searches == [(("first", "third"), 77)]


def test_ipc_key_service_leaves_out_what_cannot_be_asked(tmp_path: Path) -> None:
    """The worker side trims to the limits the supervisor enforces."""
    from tlshd.workers.handshake import IpcKeyService

    worker, supervisor = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keys = IpcKeyService(worker, req_id=1, deadline=float("inf"))
    assert keys.search_psks(["z" * 5000, "", "a\0b"], None) is None  # nothing asked
    assert keys.add_peer_certificate(b"\x30" * (ipc.MAX_CERT_DER + 1), "d") == 0
    supervisor.setblocking(False)
    with pytest.raises(BlockingIOError):
        supervisor.recv(1)
    worker.close()
    supervisor.close()


def test_ipc_key_service_does_not_ask_for_impossible_serials() -> None:
    """A serial from ACCEPT that no key can have (0, over 2^31-1) is ENOKEY in
    the worker; asked for, the supervisor would take the worker for hostile."""
    from tlshd.workers.handshake import IpcKeyService

    from tlshd.keys import KeyServiceError

    worker, supervisor = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keys = IpcKeyService(worker, req_id=1, deadline=float("inf"))
    for serial in (0, -1, 2**31, 2**32 - 1):
        with pytest.raises(KeyServiceError) as info:
            keys.read_key(serial)
        assert info.value.errno == errno.ENOKEY
    supervisor.setblocking(False)
    with pytest.raises(BlockingIOError):
        supervisor.recv(1)
    worker.close()
    supervisor.close()
