"""Fake handshake engines for supervisor tests; they run in forked workers.

Each has the engine signature `(sock, params, ctx) -> HandshakeResult`.
"""

from __future__ import annotations

import base64
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


def _wait_for_go(sock: socket.socket, ctx: Any) -> HandshakeResult | None:
    """Wait for the peer's one byte: None once it came, else the failure."""
    remaining = ctx.deadline - time.monotonic()
    if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
        return HandshakeResult(status=errno.ETIMEDOUT, detail="fake engine timed out")
    if not sock.recv(1):
        return HandshakeResult(status=errno.ECONNRESET)
    return None


def gated_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Waits for one byte from the peer, then answers with the worker's
    handshake_timeout_ms (which tells the test which config generation ran it)."""
    if (failed := _wait_for_go(sock, ctx)) is not None:
        return failed
    sock.sendall(f"{ctx.config.worker.handshake_timeout_ms}\n".encode())
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE-CIPHER")


def pid_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Waits for one byte from the peer, then answers with the serving
    process's pid (8 digits), so a test can tell which process served it."""
    if (failed := _wait_for_go(sock, ctx)) is not None:
        return failed
    sock.sendall(f"{os.getpid():08d}".encode())
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


def deadline_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Answers with the seconds left until its deadline (`%06.3f`)."""
    sock.sendall(f"{ctx.deadline - time.monotonic():06.3f}".encode())
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE")


def pair_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Like a handshake, needs both ends of the connection: each half sends
    one byte and waits for the other half's, so a half whose peer never gets
    a worker times out."""
    sock.sendall(b"x")
    remaining = ctx.deadline - time.monotonic()
    if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
        return HandshakeResult(status=errno.ETIMEDOUT, detail="the other half never came")
    if sock.recv(1) != b"x":
        return HandshakeResult(status=errno.ECONNRESET)
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE")


class RandomKeyService:
    """Answers key_read with fresh random material each time (made in the
    supervisor at reply time, so no other process had it before)."""

    def answer(self, scope: Any, request: Any) -> Any:
        import secrets

        from tlshd.ipc import KeyReply

        if request.op != "key_read" or request.serial not in scope.allowed_serials:
            return KeyReply.failure(errno.EACCES, request.serial)
        return KeyReply(True, 0, request.serial, "d", secrets.token_hex(24).encode())


def residue_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Sends the serving process's pid (8 digits) and waits for one byte, so
    the test can scan this process's memory (`memory_holds`) while it lives.
    With a cert serial it first reads that key through the supervisor and
    sends it to the peer (2-byte length, payload)."""
    if params.cert_serial:
        payload = ctx.keys.read_key(params.cert_serial).payload
        sock.sendall(len(payload).to_bytes(2, "big") + payload)
    sock.sendall(f"{os.getpid():08d}".encode())
    recv_exactly(sock, 1, timeout=60)
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE")


def read_residue_key(reader: Peer) -> tuple[int, list[tuple[bytes, bytes]]]:
    """From the peer of a residue_engine request with a cert serial: the pid
    of the process that read the key, and the key (raw and base64) split in
    halves for `memory_holds`."""
    size = int.from_bytes(recv_exactly(reader.client, 2), "big")
    secret = recv_exactly(reader.client, size)
    encoded = base64.b64encode(secret)
    halves = [(part[: len(part) // 2], part[len(part) // 2 :]) for part in (secret, encoded)]
    return int(recv_exactly(reader.client, 8)), halves


def memory_holds(pid: int, head: bytes, tail: bytes) -> bool:
    """Whether process `pid`'s readable memory holds head + tail contiguously.

    Read from outside, by the (root) test: a worker is not dumpable after its
    setuid and its seccomp filter denies prctl, so it cannot read its own
    /proc/self/mem.  The halves are compared piecewise, so the scan never
    builds the whole secret in the scanning process itself."""
    with open(f"/proc/{pid}/maps") as maps:
        regions = [line.split() for line in maps]
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for fields in regions:
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            at = chunk.find(head)
            while at >= 0:
                if chunk[at + len(head) : at + len(head) + len(tail)] == tail:
                    return True
                at = chunk.find(head, at + 1)
    return False


def nice_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Waits for one byte from the peer, then answers with the worker's nice
    value (3 characters, "-04"): the priority its request's age gave it."""
    if (failed := _wait_for_go(sock, ctx)) is not None:
        return failed
    sock.sendall(f"{os.getpriority(os.PRIO_PROCESS, 0):03d}".encode())
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE-CIPHER")
