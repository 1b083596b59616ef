"""Fake handshake engines for supervisor tests; they run in forked workers.

Each has the engine signature `(sock, params, ctx) -> HandshakeResult`.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import time
from typing import Any

from tests.fakekernel import FakeKernel, fake_install_ktls
from tests.helpers.daemon import recv_exactly, tcp_pair
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import AuthMode, MsgType


def gated_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Waits for one byte from the peer, then answers with the worker's
    handshake_timeout_ms (which tells the test which config generation ran it)."""
    remaining = ctx.deadline - time.monotonic()
    if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
        return HandshakeResult(status=errno.ETIMEDOUT, detail="fake engine timed out")
    if not sock.recv(1):
        return HandshakeResult(status=errno.ECONNRESET)
    sock.sendall(f"{ctx.config.worker.handshake_timeout_ms}\n".encode())
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE-CIPHER")


def _send(channel: socket.socket, message: dict[str, Any]) -> None:
    channel.send(json.dumps(message).encode())


def junk_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Misbehaves on the worker channel in the way `params.peername` names,
    then waits to be killed.  Without a peername it behaves like gated_engine."""
    kind = params.peername
    if kind is None:
        return gated_engine(sock, params, ctx)
    channel: socket.socket = ctx.keys._channel
    req = ctx.keys._req_id
    if kind == "not-json":
        channel.send(b"\xff\x00 this is not json")
    elif kind == "unknown-op":
        _send(channel, {"op": "exec", "req": req})
    elif kind == "wrong-req":
        _send(channel, {"op": "result", "req": req + 1000, "result": {"status": 0}})
    elif kind == "status-out-of-range":
        _send(channel, {"op": "result", "req": req, "result": {"status": 5000}})
    elif kind == "bool-status":
        _send(channel, {"op": "result", "req": req, "result": {"status": True}})
    elif kind == "foreign-remote-auth":
        _send(channel, {"op": "result", "req": req, "result": {"status": 0, "remote_auth": [7]}})
    elif kind == "sends-fd":
        r, _w = os.pipe()
        socket.send_fds(
            channel,
            [json.dumps({"op": "phase", "req": req, "phase": "x", "peer": "p"}).encode()],
            [r],
        )
    elif kind == "ready-again":
        _send(channel, {"op": "ready", "pid": os.getpid(), "generation": 1})
    elif kind == "phase-not-string":
        _send(channel, {"op": "phase", "req": req, "phase": ["x"], "peer": "p"})
    elif kind == "deep-nesting":
        channel.send(b"[" * 200_000)  # json.loads raises RecursionError
    elif kind == "deep-nesting-in-object":
        channel.send(b'{"op":"phase","req":%d,"phase":' % req + b"[" * 100_000)
    elif kind == "lone-surrogate":
        channel.send(b'{"op":"phase","req":%d,"phase":"\\ud800","peer":"p"}' % req)
    elif kind == "huge-int":
        channel.send(b'{"op":"key_read","req":%d,"id":' % req + b"9" * 5000 + b',"serial":1}')
    time.sleep(60)
    return HandshakeResult(status=0)


class Peer:
    """The remote peer of one consumer request: `client` is its end of a
    loopback TCP pair, `server` the consumer's end, submitted to the fake kernel
    as `request`.  (A TLS peer tool running as a process is tests.peers.PeerProcess.)"""

    def __init__(self, kernel: FakeKernel, **submit_args: Any) -> None:
        self.client, self.server = tcp_pair()
        args = {"message_type": MsgType.CLIENTHELLO, "auth_mode": AuthMode.UNAUTH, **submit_args}
        self.request = kernel.submit(self.server, **args)

    def release(self) -> bytes:
        """Let gated_engine finish; returns its answer line."""
        self.client.sendall(b"g")
        return recv_exactly(self.client, 5)

    def close(self) -> None:
        self.client.close()
        self.server.close()


class ScopedKeyService:
    """A SupervisorKeyService stand-in honouring the request scope: reads
    only serials named in ACCEPT, adds certificates as serial 4242."""

    def answer(self, scope: Any, request: Any) -> Any:
        from tlshd.ipc import KeyReply

        if request.op == "key_read":
            if request.serial not in scope.allowed_serials:
                return KeyReply.failure(errno.EACCES, request.serial)
            return KeyReply(True, 0, request.serial, "d", f"secret-{request.serial}".encode())
        if request.op == "add_cert":
            return KeyReply(True, 0, 4242, "d")
        return KeyReply.failure(errno.ENOKEY)


def key_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Reads the certificate key ACCEPT named, tries one it did not name, adds
    a peer certificate, and reports the new serial as REMOTE_AUTH."""
    from tlshd.keys import KeyServiceError

    material = ctx.keys.read_key(params.cert_serial)
    try:
        ctx.keys.read_key(params.cert_serial + 500)
        denied = b"no"
    except KeyServiceError as err:
        denied = b"yes" if err.errno == errno.EACCES else b"??"
    serial = ctx.keys.add_peer_certificate(b"\x30\x03\x02\x01\x01", "peer cert")
    sock.sendall(material.payload + b" " + denied + b"\n")
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, remote_auth=(serial,), cipher="FAKE")


# install_ktls stand-in for machines without tls.ko (tests/fakekernel.py)
accept_ktls = fake_install_ktls
# What the fake engines hand to ctx.install_ktls: TLS 1.3, AES-128-GCM, zero keys.
FAKE_CRYPTO_INFO = struct.pack("=HH", 0x0304, 51) + bytes(36)


def fake_ktls(sock: socket.socket, ctx: Any) -> None:
    """A fake engine's success also programs (fake) kTLS, as the real one must:
    the supervisor checks the socket before DONE(0)."""
    ctx.install_ktls(sock, FAKE_CRYPTO_INFO, FAKE_CRYPTO_INFO)


_HOARD: list[bytearray] = []


def hoarding_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """gated_engine that also keeps 48 MiB of touched memory (a leaky worker)."""
    _HOARD.append(bytearray(b"\x01" * (48 << 20)))
    return gated_engine(sock, params, ctx)


def verified_client_cert_engine(
    sock: socket.socket, params: HandshakeParams, ctx: Any
) -> HandshakeResult:
    """Reports what the x509 server engine reports for a verified client
    certificate: UINT_MAX, a peer id that names no key (upstream's sentinel)."""
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, remote_auth=(0xFFFFFFFF,), cipher="FAKE")


def key_reading_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Tries to read the key whose serial is in `params.peername` straight from
    the kernel (not through the supervisor) and tells the peer `READ!` or `DENY!`."""
    from tlshd.keyring import KeyringError, read_key

    try:
        read_key(int(params.peername or "0"))
        answer = b"READ!"
    except KeyringError:
        answer = b"DENY!"
    sock.sendall(answer)
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE")


def channel_closing_engine(
    sock: socket.socket, params: HandshakeParams, ctx: Any
) -> HandshakeResult:
    """Closes the worker's channel to the supervisor and lives on, holding the socket."""
    ctx.keys._channel.close()
    time.sleep(60)
    return HandshakeResult(status=0)
