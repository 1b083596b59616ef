"""Test PKI and real TLS peers (Debian's openssl and GnuTLS tools) on loopback.

Peers run with a clean environment (no OPENSSL_CONF), so they behave like
stock installs: an openssl s_server sends two NewSessionTickets, which the
kTLS oracle must then skip, exactly as a kernel consumer would receive them.

gnutls-serv has no option to choose its listening address and binds every
interface, so it runs in a private network namespace (unshare -rn) where only
loopback exists; a helper there connects to it and passes the connected socket
back over SCM_RIGHTS.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.helpers.certs import (
    CA_KEY_USAGE,
    DAY,
    LEAF_KEY_USAGE,
    PrivateKey,
    cert_pem,
    issue_cert,
    key_der,
    key_pem,
    make_key,
)

# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path
    cert_der: bytes
    key_der: bytes  # PKCS#8 DER, as a keyring "asymmetric"/user key payload


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Issued
    server: Issued  # SAN localhost, 127.0.0.1, ::1; serverAuth
    client: Issued  # clientAuth
    expired: Issued  # server+client EKU, not valid any more
    revoked: Issued  # server+client EKU, listed in crl
    crl_pem: bytes
    crl_path: Path
    other_ca: Issued  # unrelated CA
    other_server: Issued  # issued by other_ca
    other_client: Issued  # issued by other_ca


def _write(directory: Path, stem: str, cert: x509.Certificate, key: PrivateKey) -> Issued:
    issued = Issued(
        cert_pem(cert),
        key_pem(key),
        directory / f"{stem}.pem",
        directory / f"{stem}.key",
        cert.public_bytes(serialization.Encoding.DER),
        key_der(key),
    )
    issued.cert_path.write_bytes(issued.cert_pem)
    issued.key_path.write_bytes(issued.key_pem)
    issued.key_path.chmod(0o600)
    return issued


def _ca(cn: str, now: datetime.datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = make_key()
    cert = issue_cert(
        cn, key, ca=True, not_before=now - DAY, not_after=now + 30 * DAY,
        key_usage=CA_KEY_USAGE, key_ids=True,
    )  # fmt: skip
    return cert, key


def _leaf(
    cn: str,
    issuer: tuple[x509.Certificate, PrivateKey],
    ekus: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[x509.Certificate, PrivateKey]:
    key = make_key()
    cert = issue_cert(
        cn, key, issuer, not_before=not_before, not_after=not_after, eku=ekus, sans=sans,
        key_usage=LEAF_KEY_USAGE, key_ids=True,
    )  # fmt: skip
    return cert, key


SERVER_SANS: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(IPv4Address("127.0.0.1")),
    x509.IPAddress(IPv6Address("::1")),
]


def make_pki(directory: Path) -> Pki:
    """ECDSA P-256 test PKI written to `directory`."""
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7))
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca = _ca("tlshd test CA", now)
    server = _leaf("localhost", ca, [ExtendedKeyUsageOID.SERVER_AUTH], SERVER_SANS, *valid)
    client = _leaf(
        "client.test", ca, [ExtendedKeyUsageOID.CLIENT_AUTH], [x509.DNSName("client.test")], *valid
    )
    expired = _leaf(
        "expired",
        ca,
        both,
        SERVER_SANS,
        now - datetime.timedelta(days=10),
        now - datetime.timedelta(days=1),
    )
    revoked = _leaf("revoked", ca, both, SERVER_SANS, *valid)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[0].subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=7))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked[0].serial_number)
            .revocation_date(now - datetime.timedelta(minutes=30))
            .build()
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False
        )
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(ca[1], hashes.SHA256())
    )
    crl_pem = crl.public_bytes(serialization.Encoding.PEM)
    crl_path = directory / "crl.pem"
    crl_path.write_bytes(crl_pem)
    other = _ca("unrelated CA", now)
    other_server = _leaf("localhost", other, both, SERVER_SANS, *valid)
    other_client = _leaf("client.test", other, both, [x509.DNSName("client.test")], *valid)
    return Pki(
        directory,
        _write(directory, "ca", *ca),
        _write(directory, "server", *server),
        _write(directory, "client", *client),
        _write(directory, "expired", *expired),
        _write(directory, "revoked", *revoked),
        crl_pem,
        crl_path,
        _write(directory, "other-ca", *other),
        _write(directory, "other-server", *other_server),
        _write(directory, "other-client", *other_client),
    )


# ------------------------------------------------------------------ processes


def peer_env() -> dict[str, str]:
    """Our environment minus OPENSSL_CONF: peers behave like stock installs."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "TLSHD_OPENSSL_CONF")}
    env["LC_ALL"] = "C"
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PeerProcess:
    """An openssl or GnuTLS command-line peer running as a child process, its
    output in `log_path`.  (tests.helpers.engines.Peer is something else: the
    remote end of one consumer request handed to the daemon.)"""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    sock: socket.socket | None = None

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_output(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                # The tool wrote its log file itself: once it has exited, the
                # file holds everything it will ever say.
                out = self.output()
                if text in out:
                    return out
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in peer output:\n{self.output()}")

    def send_stdin(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()


def _start(args: list[str], log_path: Path) -> PeerProcess:
    log = log_path.open("wb")
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=peer_env()
    )
    log.close()
    return PeerProcess(proc, log_path)


def _stop(peer: PeerProcess) -> None:
    if peer.sock is not None:
        peer.sock.close()
    if peer.proc.poll() is None:
        peer.proc.terminate()
        try:
            peer.proc.wait(5)
        except subprocess.TimeoutExpired:
            peer.proc.kill()
            peer.proc.wait()
    if peer.proc.stdin is not None:
        with contextlib.suppress(OSError):
            peer.proc.stdin.close()


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=None)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextlib.contextmanager
def openssl_server(
    args: list[str], log_path: Path, host: str = "127.0.0.1"
) -> Iterator[PeerProcess]:
    """`openssl s_server` on loopback; yields once it accepts, with `.sock` connected."""
    port = free_port()
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    peer = _start(["openssl", "s_server", "-accept", bind, "-naccept", "1", *args], log_path)
    peer.port = port
    try:
        peer.wait_output("ACCEPT")
        peer.sock = connect(port, host)
        yield peer
    finally:
        _stop(peer)


@contextlib.contextmanager
def _accepted(peer: PeerProcess, listener: socket.socket) -> Iterator[PeerProcess]:
    """Accept the client `peer` started on `listener` into `.sock`; stop it afterwards."""
    try:
        listener.settimeout(10)
        peer.sock, _ = listener.accept()
        peer.sock.settimeout(None)
        yield peer
    finally:
        _stop(peer)


@contextlib.contextmanager
def openssl_client(
    args: list[str], log_path: Path, listener: socket.socket
) -> Iterator[PeerProcess]:
    """`openssl s_client` connecting to our loopback `listener`; `.sock` is our side."""
    host, port = listener.getsockname()[:2]
    peer = _start(["openssl", "s_client", "-connect", f"{host}:{port}", *args], log_path)
    with _accepted(peer, listener):
        yield peer


@contextlib.contextmanager
def gnutls_client(
    args: list[str], log_path: Path, listener: socket.socket
) -> Iterator[PeerProcess]:
    """`gnutls-cli` connecting to our loopback `listener`."""
    host, port = listener.getsockname()[:2]
    peer = _start(["gnutls-cli", "--port", str(port), *args, host], log_path)
    with _accepted(peer, listener):
        yield peer


_NETNS_HELPER = textwrap.dedent(
    """
    import socket, subprocess, sys, time
    ctl = socket.socket(fileno=int(sys.argv[1]))
    port, log = int(sys.argv[2]), open(sys.argv[3], "wb")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = subprocess.Popen(["gnutls-serv", "--port", str(port), *sys.argv[4:]],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline or server.poll() is not None:
                socket.send_fds(ctl, [b"fail"], [])
                sys.exit(1)
            time.sleep(0.02)
    socket.send_fds(ctl, [b"ok"], [conn.fileno()])
    conn.close()
    ctl.recv(1)
    server.terminate()
    server.wait()
    """
)


@contextlib.contextmanager
def gnutls_server(args: list[str], log_path: Path) -> Iterator[PeerProcess]:
    """`gnutls-serv` in a private network namespace; `.sock` is connected to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [
            "unshare",
            "-rn",
            sys.executable,
            "-c",
            _NETNS_HELPER,
            str(theirs.fileno()),
            "5556",
            str(log_path),
            *args,
        ],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.PIPE,
        env=peer_env(),
    )
    theirs.close()
    peer = PeerProcess(proc, log_path, 5556)
    try:
        ours.settimeout(15)
        msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        if msg != b"ok" or not fds:
            raise AssertionError(f"gnutls-serv did not start:\n{peer.output()}")
        peer.sock = socket.socket(fileno=fds[0])
        yield peer
    finally:
        with contextlib.suppress(OSError):
            ours.send(b"x")
        ours.close()
        _stop(peer)


def loopback_listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, 0), family=family)


def psk_session_pem(key: bytes, cipher_id: bytes) -> bytes:
    """An openssl `-psk_session` file: an SSL_SESSION (ssl/ssl_asn1.c) for TLS 1.3
    with `key` as master key and `cipher_id` (2 bytes) fixing the PSK's hash.

    Hand-encoded DER, so that the openssl peer's view of the PSK does not depend
    on the engine's own session code.
    """

    def tlv(tag: int, body: bytes) -> bytes:
        n = len(body)
        length = (
            bytes([n])
            if n < 128
            else bytes([0x81, n])
            if n < 256
            else bytes([0x82]) + n.to_bytes(2, "big")
        )
        return bytes([tag]) + length + body

    def integer(value: int) -> bytes:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big")
        return tlv(0x02, raw)

    now = int(time.time())
    body = (
        integer(1)  # SSL_SESSION_ASN1_VERSION
        + integer(0x0304)  # ssl_version
        + tlv(0x04, cipher_id)
        + tlv(0x04, b"")  # session_id
        + tlv(0x04, key)  # master_key
        + tlv(0xA1, integer(now))  # [1] time
        + tlv(0xA2, integer(86400))  # [2] timeout
    )
    der = tlv(0x30, body)
    import base64

    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    label = "SSL SESSION PARAMETERS"
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----\n".encode()


# ------------------------------------------------------------- engine plumbing


class FakeKeys:
    """In-memory KeyService: keys by serial, PSK search by description."""

    def __init__(self) -> None:
        from tlshd.keys import KeyMaterial

        self._material = KeyMaterial
        self.keys: dict[int, object] = {}
        self.added: list[tuple[bytes, str]] = []
        self.searches: list[tuple[tuple[str, ...], int | None]] = []
        self.next_serial = 0x1000

    def add(self, description: str, payload: bytes, serial: int | None = None) -> int:
        if serial is None:
            self.next_serial += 1
            serial = self.next_serial
        self.keys[serial] = self._material(serial, description, payload)
        return serial

    def read_key(self, serial: int):  # type: ignore[no-untyped-def]
        import errno

        from tlshd.keys import KeyServiceError

        try:
            return self.keys[serial]
        except KeyError:
            raise KeyServiceError(f"no key {serial:#x}", errno.ENOKEY) from None

    def search_psks(self, identities, keyring: int | None):  # type: ignore[no-untyped-def]
        self.searches.append((tuple(identities), keyring))
        for identity in identities:
            for material in self.keys.values():
                if material.description == identity:  # type: ignore[attr-defined]
                    return material
        return None

    def add_peer_certificate(self, der: bytes, description: str) -> int:
        self.added.append((der, description))
        return 0x7000 + len(self.added)


@dataclass
class Capture:
    """An install_ktls stand-in that keeps the structs instead of calling setsockopt."""

    calls: list[tuple[bytes, bytes]]

    def __call__(self, _sock: socket.socket, tx: bytes, rx: bytes) -> None:
        self.calls.append((tx, rx))


def engine_context(
    pki: Pki | None = None,
    timeout: float = 10.0,
    keys: FakeKeys | None = None,
    client: object | None = None,
    server: object | None = None,
):  # type: ignore[no-untyped-def]
    """A HandshakeContext with the test PKI as both roles' configuration."""
    import logging

    from tlshd.workers.engine import HandshakeContext

    from tlshd.config import Config
    from tlshd.credentials import Credentials, RoleCredentials
    from tlshd.log import handshake_logger

    if client is None:
        client = RoleCredentials(truststore_pem=pki.ca.cert_pem if pki else None)
    if server is None and pki is not None:
        server = RoleCredentials(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem)
    capture = Capture([])
    phases: list[str] = []
    ctx = HandshakeContext(
        config=Config(),
        credentials=Credentials(client=client, server=server or RoleCredentials()),  # type: ignore[arg-type]
        keys=keys or FakeKeys(),
        deadline=time.monotonic() + timeout,
        log=handshake_logger("test", "peer"),
        set_phase=phases.append,
        install_ktls=capture,
    )
    logging.getLogger("tlshd").setLevel(logging.DEBUG)
    return ctx, capture, phases


class InProcessTlsPeer:
    """A pyOpenSSL TLS 1.3 peer handshaking on `sock` in a thread: cheaper
    than an openssl process when a test needs hundreds of handshakes.
    `identity` is the certificate it presents; `ca` makes it verify the other side."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        server: bool = False,
        identity: Issued | None = None,
        ca: Issued | None = None,
        timeout: float = 20.0,
    ) -> None:
        import threading

        from OpenSSL import SSL

        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        if identity is not None:
            context.use_certificate_file(str(identity.cert_path))
            context.use_privatekey_file(str(identity.key_path))
        if ca is not None:
            context.load_verify_locations(str(ca.cert_path))
            context.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
        sock.setblocking(False)
        self._deadline = time.monotonic() + timeout
        self.conn = SSL.Connection(context, sock)
        if server:
            self.conn.set_accept_state()
        else:
            self.conn.set_tlsext_host_name(b"localhost")
            self.conn.set_connect_state()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select

        from OpenSSL import SSL

        try:
            while True:
                try:
                    self.conn.do_handshake()
                    return
                except (SSL.WantReadError, SSL.WantWriteError):
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("TLS handshake timed out") from None
                    select.select([self.conn], [], [], min(remaining, 0.5))
        except BaseException as err:
            self.error = err

    def wait(self, timeout: float = 30.0) -> bool:
        """True if the handshake completed."""
        self._thread.join(timeout)
        return not self._thread.is_alive() and self.error is None
