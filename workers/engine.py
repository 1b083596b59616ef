"""The TLS engine: one TLS 1.3 handshake on a kernel-owned TCP socket, then kTLS.

`perform_handshake` is the worker's whole job for a request.  It never raises,
never changes the socket's O_NONBLOCK flag, never calls shutdown() and never
sends close_notify: the fd is shared with the kernel consumer that takes the
socket back after DONE.  Status values follow upstream tlshd (upstream-tlshd.md
§5.2): EACCES for handshake and verification failures, ETIMEDOUT for a premature
close or the deadline, EKEYREJECTED for an unknown PSK identity (the
unknown_psk_identity alert, received or sent), EIO for
missing local material and any failure after the handshake.  Status 0 is only
reported once both TLS_TX and TLS_RX were installed.
"""

from __future__ import annotations

import contextlib
import encodings.idna
import encodings.punycode  # noqa: F401
import errno
import functools
import logging
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from tlshd.workers import contexts, ktls, priority, psk, tlsctx, verify
from tlshd.workers.contexts import Shape
from tlshd.workers.tlsctx import ALERT_ACCESS_DENIED, ALERT_UNKNOWN_PSK_IDENTITY, TlsState

from tlshd.config import Config
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.ipc import X509_SERVER_PEER_ID
from tlshd.keyformats import Encoding
from tlshd.keys import KeyMaterial, KeyService, KeyServiceError
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import IPPROTO_TCP, MAX_REMOTE_AUTH, AuthMode, MsgType

# Everything the engine uses is imported at module level, in the supervisor,
# before a worker forks and drops privileges: afterwards the Python installation
# may be unreadable to the worker's account (a pyenv under /root, mode 0700), so
# a lazy import fails.  The `idna` codec is such a lazy import: str.encode("idna")
# (verify.expect_peer, for a non-ASCII PEERNAME) imports encodings.idna (with
# stringprep and unicodedata) and encodings.punycode on first use.
_PREMATURE_CLOSE_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
ALERT_FLUSH_S = 0.5  # at most this long to send a failure alert, within the deadline


@dataclass
class HandshakeContext:
    """Everything the engine needs besides the socket and the ACCEPT parameters."""

    config: Config
    credentials: Credentials
    keys: KeyService
    deadline: float  # time.monotonic() value
    log: logging.LoggerAdapter[logging.Logger]
    set_phase: Callable[[str], None] = lambda _phase: None
    install_ktls: Callable[[socket.socket, bytes, bytes], None] = ktls.install_ktls
    # (sock, max data bytes per TX record), or None where the kernel cannot cap
    # kTLS records (TLS_TX_MAX_PAYLOAD_LEN, Linux 6.19)
    cap_tx_records: Callable[[socket.socket, int], None] | None = field(
        default_factory=ktls.tx_record_capper
    )


class HandshakeFailure(Exception):
    """Ends a handshake with `status`; the message goes to the log and DONE detail."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    """Per-handshake state; never shared between handshakes.  `state` is
    replaced by a prepared context's own (workers/contexts.py) when one is used."""

    sock: socket.socket
    params: HandshakeParams
    ctx: HandshakeContext
    is_server: bool
    state: TlsState = field(default_factory=TlsState)
    conn: SSL.Connection | None = None
    peername: str = ""
    remote_auth: tuple[int, ...] = ()

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        return self.ctx.log


def perform_handshake(
    sock: socket.socket, params: HandshakeParams, ctx: HandshakeContext
) -> HandshakeResult:
    """Run the handshake the kernel asked for and program kTLS. Never raises."""
    try:
        return _perform(sock, params, ctx)
    except HandshakeFailure as failure:
        ctx.log.error("handshake failed: %s", failure)
        return HandshakeResult(status=failure.status, detail=str(failure))
    except Exception as exc:  # a bug must still produce a DONE
        ctx.log.exception("handshake aborted by an internal error")
        return HandshakeResult(status=errno.EIO, detail=f"internal error: {exc!r}")


def _perform(
    sock: socket.socket, params: HandshakeParams, ctx: HandshakeContext
) -> HandshakeResult:
    _require_tcp(sock)
    mode = (params.message_type, params.auth_mode)
    prepare = _PREPARERS.get(mode)
    if prepare is None:
        raise HandshakeFailure(
            errno.EIO,
            f"unsupported handshake: message type {params.message_type}, "
            f"auth mode {params.auth_mode}",
        )
    req = _Request(sock, params, ctx, is_server=params.message_type == MsgType.SERVERHELLO)
    prepare(req)
    with _NoDelay(sock):
        ctx.set_phase("serverhello" if req.is_server else "clienthello")
        _drive_handshake(req)
        _after_handshake(req)
        ctx.set_phase("ktls")
        cipher = _hand_off_to_ktls(req)
    group = _negotiated_group(req)
    ctx.log.info("handshake with %s completed (%s, %s)", req.peername or "peer", cipher, group)
    return HandshakeResult(status=0, remote_auth=req.remote_auth, cipher=cipher, group=group)


def _negotiated_group(req: _Request) -> str:
    """The key exchange group (X25519MLKEM768 where both sides have ML-KEM;
    OpenSSL's default groups offer it first and fall back to X25519), or
    "psk_ke" for a PSK handshake without (EC)DHE."""
    conn = req.conn
    assert conn is not None
    name = lib.SSL_get0_group_name(conn._ssl)
    return ffi.string(name).decode() if name != ffi.NULL else "psk_ke"


def _require_tcp(sock: socket.socket) -> None:
    try:
        proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    except OSError as err:
        raise HandshakeFailure(errno.EIO, f"getsockopt(SO_PROTOCOL): {err.strerror}") from err
    if proto != IPPROTO_TCP:
        raise HandshakeFailure(errno.EOPNOTSUPP, f"socket protocol {proto} is not TCP")


# ------------------------------------------------------------------ preparing


def _new_connection(req: _Request, context: SSL.Context) -> SSL.Connection:
    # Memory BIOs: the engine moves the bytes itself (see _drive_handshake).
    conn = SSL.Connection(context, None)
    if req.is_server:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    req.conn = conn
    return conn


def _resolve_peer(req: _Request) -> verify.PeerName:
    """PEERNAME from ACCEPT, else the numeric peer address (which then needs an IP SAN)."""
    name = req.params.peername
    if not name:
        try:
            name = req.sock.getpeername()[0]
        except OSError as err:
            raise HandshakeFailure(errno.EIO, f"getpeername: {err.strerror}") from err
    try:
        peer = verify.parse_peername(name)
    except verify.PeerNameError as err:
        raise HandshakeFailure(errno.EIO, str(err)) from err
    req.peername = peer.text
    return peer


def _prepare_client_x509_common(req: _Request, shape: Shape) -> None:
    peer = _resolve_peer(req)
    try:
        context = _x509_context(req, shape, req.ctx.credentials.client)
    except tlsctx.CredentialError as err:
        raise HandshakeFailure(errno.EIO, str(err)) from err
    conn = _new_connection(req, context)
    try:
        verify.expect_peer(conn, peer)
    except verify.PeerNameError as err:
        raise HandshakeFailure(errno.EIO, str(err)) from err


def _prepare_client_unauth(req: _Request) -> None:
    _prepare_client_x509_common(req, Shape.CLIENT_UNAUTH)


def _prepare_client_x509(req: _Request) -> None:
    _prepare_client_x509_common(req, Shape.CLIENT_X509)


def _prepare_server_x509(req: _Request) -> None:
    _resolve_peer_for_logs(req)
    try:
        context = _x509_context(req, Shape.SERVER_X509, req.ctx.credentials.server)
    except tlsctx.CredentialError as err:
        # upstream 1.4.0 tells the client why instead of just dropping it
        _send_plaintext_alert(req, ALERT_ACCESS_DENIED)
        raise HandshakeFailure(errno.EIO, str(err)) from err
    _new_connection(req, context)


def _x509_context(req: _Request, shape: Shape, creds: RoleCredentials) -> SSL.Context:
    """The context the zygote prepared for `shape`, if this process has not
    used it yet and the ACCEPT names no certificate of its own; else one built
    for this handshake.  Raises tlsctx.CredentialError."""
    from_accept = shape.uses_certificate and _accept_names_certificate(req.params)
    if not from_accept:
        prepared = contexts.take_prepared(shape, creds)
        if prepared is not None:
            # The callbacks of a prepared context report into its own TlsState.
            req.state = prepared.state
            req.log.debug("%s context prepared by the zygote", shape.value)
            return prepared.context
    install = functools.partial(_use_accept_certificate, req) if from_accept else None
    return contexts.build_context(shape, req.state, creds, install)


def _prepare_client_psk(req: _Request) -> None:
    _resolve_peer_for_logs(req)
    _log_accept_keyring(req)
    chosen = _first_usable_psk(req)
    context = tlsctx.new_context(req.state, psk.suites_for(chosen.hash_name))
    _refuse_certificates(context)
    psk.install_client_psk(context, req.state, chosen)
    _new_connection(req, context)


def _prepare_server_psk(req: _Request) -> None:
    # No certificate is loaded, so a handshake can only complete with a PSK; and
    # no VERIFY_PEER: OpenSSL then insists on a session id context for "resumption".
    _resolve_peer_for_logs(req)
    _log_accept_keyring(req)
    context = tlsctx.new_context(req.state, psk.SERVER_PSK_SUITES)
    context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    keys, keyring = req.ctx.keys, req.params.keyring

    def search(identities: Sequence[str]) -> KeyMaterial | None:
        try:
            return keys.search_psks(identities, keyring)
        except KeyServiceError as err:
            req.log.warning("PSK search failed: %s", err)
            return None

    psk.install_server_psk(context, req.state, search)
    _new_connection(req, context)


def _log_accept_keyring(req: _Request) -> None:
    # Linux 6.17+ names the consumer's keyring (nvme connect --keyring); its
    # keys are this request's alone (supervisor/keyservice.RequestScope)
    if req.params.keyring:
        req.log.debug("ACCEPT keyring %d", req.params.keyring)


def _resolve_peer_for_logs(req: _Request) -> None:
    try:
        req.peername = req.params.peername or req.sock.getpeername()[0]
    except OSError:
        req.peername = "?"


def _refuse_certificates(context: SSL.Context) -> None:
    """PSK mode: a certificate from the peer means the PSK was not used; reject it
    (otherwise a server ignoring the PSK would get an unauthenticated session)."""
    context.set_verify(SSL.VERIFY_PEER, lambda *_args: False)


def _first_usable_psk(req: _Request) -> psk.Psk:
    """The first identity whose key can be read and used.

    OpenSSL's TLS 1.3 client offers one external PSK per ClientHello, and a
    server that rejects it ends the connection, so later identities cannot be
    tried on this socket; the kernel (nvme-tcp) sends exactly one anyway.
    """
    problems: list[str] = []
    for serial in req.params.peer_identities:
        try:
            chosen = psk.psk_from_key(req.ctx.keys.read_key(serial))
        except (KeyServiceError, psk.PskError) as err:
            problems.append(f"{serial:#x}: {err}")
            continue
        if len(req.params.peer_identities) > 1:
            req.log.info(
                "offering PSK %#x, the first usable of %d identities",
                serial,
                len(req.params.peer_identities),
            )
        return chosen
    if not problems:
        raise HandshakeFailure(errno.EIO, "no PSK identity in the request")
    raise HandshakeFailure(errno.EIO, "no usable PSK: " + "; ".join(problems))


def _accept_names_certificate(params: HandshakeParams) -> bool:
    return bool(params.cert_serial or params.privkey_serial)


def _use_accept_certificate(req: _Request, context: SSL.Context) -> None:
    """Certificate and key from the ACCEPT serials (DER), which override the config."""
    params = req.params
    if not (params.cert_serial and params.privkey_serial):
        raise tlsctx.CredentialError("ACCEPT names only one of certificate and private key")
    try:
        cert = req.ctx.keys.read_key(params.cert_serial).payload
        key = req.ctx.keys.read_key(params.privkey_serial).payload
    except KeyServiceError as err:
        raise tlsctx.CredentialError(f"cannot read key material: {err}") from err
    tlsctx.use_der_credentials(context, cert, key)


_PREPARERS: dict[tuple[int, int], Callable[[_Request], None]] = {
    (MsgType.CLIENTHELLO, AuthMode.UNAUTH): _prepare_client_unauth,
    (MsgType.CLIENTHELLO, AuthMode.X509): _prepare_client_x509,
    (MsgType.CLIENTHELLO, AuthMode.PSK): _prepare_client_psk,
    (MsgType.SERVERHELLO, AuthMode.X509): _prepare_server_x509,
    (MsgType.SERVERHELLO, AuthMode.PSK): _prepare_server_psk,
}


# ------------------------------------------------------------------- driving


class _NoDelay:
    """TCP_NODELAY on during the handshake (as upstream); the old value is put back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.saved: int | None = None

    def __enter__(self) -> _NoDelay:
        self.saved = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def __exit__(self, *_exc: object) -> None:
        # if the fd went away, the kernel consumer sees that failure itself
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, self.saved or 0)


class _RecordReader:
    """Reads the peer's bytes for OpenSSL's memory BIO, never past the record
    OpenSSL is waiting for.

    OpenSSL on a socket BIO reads a record header, then its body, in blocking
    read() calls that a peer dripping one byte at a time keeps alive forever;
    SO_RCVTIMEO bounds each read, not the handshake.  Here every read is a
    recv(MSG_DONTWAIT) after a poll() bounded by the deadline, so the deadline
    is checked between any two bytes, and the socket's O_NONBLOCK flag (the
    consumer's) is never touched.  Reading stops at the end of the current
    record (RFC 8446 §5.1 header: type, version, uint16 length): bytes after the
    last handshake record belong to the kernel once kTLS is installed.
    """

    HEADER = 5

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.header = b""
        self.body_left = 0

    def want(self) -> int:
        return self.body_left if self.body_left else self.HEADER - len(self.header)

    def read_into(self, conn: SSL.Connection, deadline: float) -> None:
        _wait(self.sock, select.POLLIN, deadline)
        try:
            data = self.sock.recv(self.want(), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            raise _io_failure(err) from err
        if not data:
            raise _premature_close()
        conn.bio_write(data)
        if self.body_left:
            self.body_left -= len(data)
            return
        self.header += data
        if len(self.header) == self.HEADER:
            self.body_left = int.from_bytes(self.header[3:5], "big")
            self.header = b""


def _io_failure(err: OSError) -> HandshakeFailure:
    """A socket error during the handshake: a close by the peer (ETIMEDOUT, so
    the consumer may retry, as upstream) or any other error (EACCES)."""
    if err.errno in _PREMATURE_CLOSE_ERRNOS:
        return _premature_close()
    return HandshakeFailure(errno.EACCES, f"handshake I/O error: {err}")


def _premature_close() -> HandshakeFailure:
    # upstream maps GnuTLS's PREMATURE_TERMINATION to ETIMEDOUT so the
    # consumer retries (NFS writeback) instead of failing hard
    return HandshakeFailure(errno.ETIMEDOUT, "peer closed the connection during the handshake")


def _flush(req: _Request, deadline: float) -> None:
    """Send everything OpenSSL wrote to its memory BIO."""
    conn = req.conn
    assert conn is not None
    while True:
        try:
            data = conn.bio_read(65536)
        except SSL.WantReadError:
            return
        while data:
            _wait(req.sock, select.POLLOUT, deadline)
            try:
                sent = req.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                raise _io_failure(err) from err
            data = data[sent:]


def _drive_handshake(req: _Request) -> None:
    conn = req.conn
    assert conn is not None
    deadline = req.ctx.deadline
    reader = _RecordReader(req.sock)
    while True:
        if time.monotonic() >= deadline:
            raise HandshakeFailure(errno.ETIMEDOUT, "handshake timed out")
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            _flush(req, deadline)
            reader.read_into(conn, deadline)
            continue
        except SSL.ZeroReturnError as err:
            raise HandshakeFailure(errno.ETIMEDOUT, "peer closed the connection") from err
        except SSL.Error as err:
            failure = _tls_failure(req, err)
            _flush_alert(req)
            raise failure from err
        _flush(req, deadline)  # our last flight (the client's Finished)
        return


def _flush_alert(req: _Request) -> None:
    """Best effort: the alert OpenSSL queued when the handshake failed."""
    with contextlib.suppress(HandshakeFailure, OSError):
        _flush(req, min(req.ctx.deadline, time.monotonic() + ALERT_FLUSH_S))


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    priority.keep_up()  # after each stretch of CPU work: the oldest go first
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise HandshakeFailure(errno.ETIMEDOUT, "handshake timed out")
    poller = select.poll()
    poller.register(sock.fileno(), events)
    if not poller.poll(max(1, int(remaining * 1000 + 0.999))):
        raise HandshakeFailure(errno.ETIMEDOUT, "handshake timed out")


def _tls_failure(req: _Request, err: SSL.Error) -> HandshakeFailure:
    state = req.state
    reasons = _error_reasons(err)
    # Either side of an unknown PSK identity is EKEYREJECTED: the client learns
    # it from the alert (upstream main, PR #149: the NVMe host then revokes a
    # stale key and redoes in-band authentication); the server sent that alert
    # itself (workers/psk.py) because no offered identity has a key here.
    # Upstream's server reports EACCES there, as GnuTLS gives it no alert to
    # look at; nvmet only tests the status for zero, so the precise errno costs
    # nothing and tells the log what happened.
    if ALERT_UNKNOWN_PSK_IDENTITY in state.alerts_received:
        return HandshakeFailure(errno.EKEYREJECTED, "peer does not know our PSK identity")
    if ALERT_UNKNOWN_PSK_IDENTITY in state.alerts_sent:
        return HandshakeFailure(
            errno.EKEYREJECTED,
            f"no key for any of the {state.psk_identities_seen} PSK identities the peer offered",
        )
    if any("unexpected eof" in reason for reason in reasons):
        return HandshakeFailure(errno.ETIMEDOUT, "peer closed the connection during the handshake")
    detail = "; ".join(reasons) or str(err)
    if state.verify_errors:
        detail = f"certificate verification failed: {'; '.join(state.verify_errors)} ({detail})"
    return HandshakeFailure(errno.EACCES, f"TLS handshake failed: {detail}")


def _error_reasons(err: SSL.Error) -> list[str]:
    reasons: list[str] = []
    for entry in err.args[0] if err.args and isinstance(err.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return reasons


# ------------------------------------------------------------ after handshake


def _after_handshake(req: _Request) -> None:
    """Checks that decide the status before any key reaches the kernel."""
    conn = req.conn
    assert conn is not None
    if req.state.deferred_verify_failure:
        _send_encrypted_alert(req, ALERT_ACCESS_DENIED)
        raise HandshakeFailure(
            errno.EACCES,
            "client certificate rejected: " + "; ".join(req.state.verify_errors),
        )
    version = conn.get_protocol_version_name()
    if version != "TLSv1.3":
        raise HandshakeFailure(errno.EIO, f"negotiated {version}, kTLS consumers need TLSv1.3")
    mode = req.params.auth_mode
    _log_peer_certificate(req)
    if mode == AuthMode.PSK:
        _check_psk_used(req)
    elif mode == AuthMode.X509 and req.is_server:
        req.remote_auth = _server_x509_peer_ids(conn)
    elif mode == AuthMode.X509:
        req.remote_auth = _client_x509_peer_ids(req)


def _log_peer_certificate(req: _Request) -> None:
    """Which certificate the peer chose to present (x509.pq.* lets it pick
    ML-DSA or classic by signature_algorithms), for the debug log."""
    conn = req.conn
    assert conn is not None
    # The arguments cost a certificate conversion and two parses per handshake;
    # at the daemon's default level (INFO) nobody reads the line.
    if not req.log.isEnabledFor(logging.DEBUG):
        return
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is not None:
        req.log.debug(
            "peer certificate %s, %s",
            cert.subject.rfc4514_string(),
            type(cert.public_key()).__name__,
        )


def _check_psk_used(req: _Request) -> None:
    conn = req.conn
    assert conn is not None
    if not lib.SSL_session_reused(conn._ssl) or req.state.psk_serial is None:
        raise HandshakeFailure(errno.EACCES, "handshake completed without the PSK")
    req.remote_auth = (req.state.psk_serial,)


def _server_x509_peer_ids(conn: SSL.Connection) -> tuple[int, ...]:
    """UINT_MAX per certificate the (verified) client presented, at most
    MAX_REMOTE_AUTH of them; () without one."""
    if conn.get_peer_certificate() is None:
        return ()
    # OpenSSL leaves the leaf out of a server's view of the peer chain
    count = 1 + len(conn.get_peer_cert_chain() or [])
    return (X509_SERVER_PEER_ID,) * min(count, MAX_REMOTE_AUTH)


def _client_x509_peer_ids(req: _Request) -> tuple[int, ...]:
    """As upstream: each server certificate becomes an "asymmetric" key.

    Only the first MAX_REMOTE_AUTH certificates of the chain (leaf first) are
    added: the kernel keeps no more.  A certificate the kernel refuses (an
    Ed25519 key where the asymmetric key type lacks it: ENOPKG) gives no
    serial and is left out; the verified session still succeeds."""
    conn = req.conn
    assert conn is not None
    ids: list[int] = []
    for cert in (conn.get_peer_cert_chain(as_cryptography=True) or [])[:MAX_REMOTE_AUTH]:
        try:
            serial = req.ctx.keys.add_peer_certificate(
                cert.public_bytes(Encoding.DER), f"TLS x509 {req.peername}"
            )
        except Exception as err:  # a keyring problem must not fail a verified session
            req.log.warning("cannot add peer certificate to the keyring: %s", err)
            serial = 0
        if serial:
            ids.append(serial)
        else:
            req.log.warning("peer certificate %s not added to the keyring", cert.subject)
    return tuple(ids)


def _hand_off_to_ktls(req: _Request) -> str:
    """Derive both directions' keys and install them; returns the cipher name."""
    conn = req.conn
    assert conn is not None
    cipher = conn.get_cipher_name() or "?"
    try:
        tx_info, rx_info = _crypto_infos(req)
    except ktls.KtlsError as err:
        raise HandshakeFailure(errno.EIO, str(err)) from err
    try:
        req.ctx.install_ktls(req.sock, tx_info, rx_info)
    except ktls.KtlsError as err:
        raise HandshakeFailure(err.errno, str(err)) from err
    except OSError as err:
        raise HandshakeFailure(errno.EIO, f"kTLS setup failed: {err}") from err
    _honour_record_size_limit(req)
    return cipher


def _honour_record_size_limit(req: _Request) -> None:
    """Keep kTLS records within a client's record_size_limit (RFC 8449).

    Only the server role sees a limit: OpenSSL cannot negotiate the extension
    (it has no record_size_limit, and the custom-extension API bound in the
    cryptography wheel is the pre-TLS 1.3 one: a client offering it through
    that API aborts with "bad extension" when the server answers in
    EncryptedExtensions).  So we never offer or acknowledge the extension, and
    an unacknowledged limit does not bind us (RFC 8449 §4); capping our records
    anyway costs nothing and serves clients that need it.  Where the kernel
    cannot cap (before Linux 6.19) or refuses, records stay full size and the
    handshake still succeeds: upstream 1.4.0 fails every handshake there.
    """
    if not req.is_server or req.state.client_hello is None:
        return
    body = tlsctx.client_hello_extension(req.state.client_hello, tlsctx.EXT_RECORD_SIZE_LIMIT)
    if body is None:
        return
    try:
        if len(body) != 2:
            raise ktls.KtlsError(f"record_size_limit of {len(body)} bytes")
        max_payload = ktls.tx_max_payload_for(int.from_bytes(body, "big"))
    except ktls.KtlsError as err:
        req.log.warning("ignoring the client's record_size_limit: %s", err)
        return
    if max_payload is None:
        return
    cap = req.ctx.cap_tx_records
    if cap is None:
        req.log.info(
            "client asks for records of at most %d data bytes; this kernel cannot "
            "cap kTLS records (TLS_TX_MAX_PAYLOAD_LEN needs Linux 6.19), records stay full size",
            max_payload,
        )
        return
    try:
        cap(req.sock, max_payload)
    except (ktls.KtlsError, OSError) as err:
        req.log.warning("cannot cap kTLS records at %d bytes: %s", max_payload, err)
        return
    req.log.info("kTLS records capped at %d data bytes (client's record_size_limit)", max_payload)


def _traffic_keys(req: _Request) -> tuple[ktls.SuiteInfo, bytes, bytes]:
    """(suite, tx_secret, rx_secret) for our role."""
    conn = req.conn
    assert conn is not None
    suite = ktls.suite_info(conn.get_cipher_name() or "")
    client_random = conn.client_random()
    if client_random is None:
        raise ktls.KtlsError("no client random after the handshake")
    client = req.state.traffic_secret("CLIENT_TRAFFIC_SECRET_0", client_random)
    server = req.state.traffic_secret("SERVER_TRAFFIC_SECRET_0", client_random)
    if client is None or server is None:
        raise ktls.KtlsError("traffic secrets missing from the keylog callback")
    return (suite, server, client) if req.is_server else (suite, client, server)


def _crypto_infos(req: _Request) -> tuple[bytes, bytes]:
    conn = req.conn
    assert conn is not None
    # Bytes OpenSSL already pulled off the socket would never reach the kernel.
    if conn.pending():
        raise ktls.KtlsError(
            f"{conn.pending()} bytes of application data already buffered in user space"
        )
    suite, tx_secret, rx_secret = _traffic_keys(req)
    tx_seq = req.state.nsts_written  # tickets we wrote used TX records 0..n-1
    if tx_seq:
        req.log.warning("OpenSSL sent %d session tickets; is OPENSSL_CONF applied?", tx_seq)
    tx_info = ktls.crypto_info_from_secret(tx_secret, suite, tx_seq)
    rx_info = ktls.crypto_info_from_secret(rx_secret, suite, 0)
    return tx_info, rx_info


# ----------------------------------------------------------------- raw alerts


def _send_plaintext_alert(req: _Request, description: int) -> None:
    """A fatal alert before any keys exist (RFC 8446 §5.1: TLSPlaintext)."""
    _drain_client_hello(req)
    _send_raw(req, ktls.plaintext_alert(description))


def _send_encrypted_alert(req: _Request, description: int) -> None:
    """A fatal alert under our application traffic key, the key the peer expects
    once it sent its Finished (RFC 8446 §6)."""
    try:
        suite, tx_secret, _rx = _traffic_keys(req)
        record = ktls.seal_alert(suite, tx_secret, req.state.nsts_written, description)
    except ktls.KtlsError as err:
        req.log.warning("cannot send alert: %s", err)
        return
    _send_raw(req, record)


def _drain_client_hello(req: _Request) -> None:
    """Read what the client sent, so closing the socket does not answer with RST
    and destroy our alert in the client's receive queue."""
    try:
        _wait(req.sock, select.POLLIN, req.ctx.deadline)
        req.sock.recv(65536, socket.MSG_DONTWAIT)
    except (HandshakeFailure, OSError):
        pass


def _send_raw(req: _Request, data: bytes) -> None:
    try:
        _wait(req.sock, select.POLLOUT, req.ctx.deadline)
        req.sock.send(data, socket.MSG_DONTWAIT)
    except (HandshakeFailure, OSError) as err:
        req.log.debug("cannot send alert: %s", err)
