"""One handshake in a worker: from the `handshake` message to the `result`.

Ownership: the worker receives its own copy of the accepted socket by
SCM_RIGHTS and closes it (close, never shutdown) before reporting the result;
the supervisor keeps its copy and sends DONE.  The socket's flags are never
changed: `socket.socket(fileno=...)` leaves O_NONBLOCK as the kernel consumer
set it.

Everything a worker runs is imported in the zygote, before its privilege
drop (workers/zygote.py): afterwards a worker may not be able to read the
Python installation, and each lazy import would cost every worker again.

Keys: a worker has no privilege to read kernel keys, so `IpcKeyService` asks
the supervisor over the worker's channel and waits (bounded by the handshake
deadline) for the matching `key_reply`.
"""

from __future__ import annotations

import dataclasses
import errno
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from setproctitle import setproctitle
from tlshd.workers import Engine
from tlshd.workers.engine import HandshakeContext
from tlshd.workers.ktls import install_ktls

from tlshd import ipc
from tlshd.keys import KeyMaterial, KeyServiceError
from tlshd.log import HandshakeLogAdapter, handshake_logger, log
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import MsgType


class IpcKeyService:
    """tlshd.keys.KeyService over the worker's channel to the supervisor."""

    def __init__(self, channel: socket.socket, req_id: int, deadline: float) -> None:
        self._channel = channel
        self._req_id = req_id
        self._deadline = deadline
        self._next_id = 1

    def read_key(self, serial: int) -> KeyMaterial:
        reply = self._ask("key_read", serial=serial)
        return self._material(reply, f"key {serial}")

    def search_psk(self, identity: str, keyring: int | None) -> KeyMaterial | None:
        reply = self._ask("psk_search", identity=identity, keyring=keyring)
        if not reply.get("ok") and reply.get("errno") == errno.ENOKEY:
            return None
        if reply.get("ok") and not reply.get("serial"):
            return None
        return self._material(reply, f"PSK {identity!r}")

    def add_peer_certificate(self, der: bytes, description: str) -> int:
        reply = self._ask("add_cert", der_b64=ipc.b64encode(der), description=description)
        if not reply.get("ok"):
            return 0
        serial = reply.get("serial")
        return serial if type(serial) is int and serial > 0 else 0

    def _material(self, reply: dict[str, Any], what: str) -> KeyMaterial:
        if not reply.get("ok"):
            err = reply.get("errno") if type(reply.get("errno")) is int else errno.ENOKEY
            raise KeyServiceError(
                f"{what}: {reply.get('message') or errno.errorcode.get(err)}", err
            )
        payload = ipc.b64decode(reply.get("payload_b64", ""), ipc.MAX_MESSAGE)
        return KeyMaterial(
            serial=int(reply.get("serial") or 0),
            description=str(reply.get("description") or ""),
            payload=payload,
        )

    def _ask(self, op: str, **args: Any) -> dict[str, Any]:
        request_id = self._next_id
        self._next_id += 1
        ipc.send_message(self._channel, {"op": op, "req": self._req_id, "id": request_id, **args})
        while True:
            reply = self._receive_reply()
            if reply.get("id") == request_id:
                return reply

    def _receive_reply(self) -> dict[str, Any]:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise KeyServiceError("no key reply before the deadline", errno.ETIMEDOUT)
        ready, _, _ = select.select([self._channel], [], [], remaining)
        if not ready:
            raise KeyServiceError("no key reply before the deadline", errno.ETIMEDOUT)
        message, fds = ipc.recv_message(self._channel, frozenset({"key_reply"}))
        for fd in fds:  # a key reply never carries fds
            socket.close(fd)
        if message is None:
            raise KeyServiceError("supervisor closed the channel", errno.EIO)
        return message


def phase_for(params: HandshakeParams) -> str:
    try:
        return MsgType(params.message_type).name.lower()
    except ValueError:
        return "handshake"


def worker_peer_name(sock: socket.socket, params: HandshakeParams) -> str:
    try:
        host, port = sock.getpeername()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        address = ""
    if params.peername:
        return f"{params.peername} ({address})" if address else params.peername
    return address or "unknown peer"


class HandshakeJob:
    """Runs the engine for one `handshake` message and reports the result."""

    def __init__(
        self,
        channel: socket.socket,
        message: dict[str, Any],
        fd: int,
        generation: Any,
        engine: Engine,
        install_ktls: Callable[[socket.socket, bytes, bytes], None] | None = None,
    ) -> None:
        self.channel = channel
        self.req_id = int(message["req"])
        self.params = HandshakeParams.from_wire(message["params"])
        self.deadline = time.monotonic() + float(message["deadline_s"])
        self.fd = fd
        self.generation = generation
        self.engine = engine
        self.install_ktls = install_ktls
        self.log: HandshakeLogAdapter = handshake_logger(self.req_id, None)
        self.peer = ""

    def run(self) -> HandshakeResult:
        sock = socket.socket(fileno=self.fd)
        try:
            self.peer = worker_peer_name(sock, self.params)
            self.log = handshake_logger(self.req_id, self.peer)
            self.set_phase(phase_for(self.params))
            result = self._call_engine(sock)
        finally:
            sock.close()
        self._report(result)
        return result

    def _call_engine(self, sock: socket.socket) -> HandshakeResult:
        try:
            ctx = HandshakeContext(
                config=self.generation.config,
                credentials=self.generation.credentials,
                keys=IpcKeyService(self.channel, self.req_id, self.deadline),
                deadline=self.deadline,
                log=self.log,
                set_phase=self.set_phase,
                install_ktls=self._install_ktls(),
            )
            result = self.engine(sock, self.params, ctx)
        except Exception:
            # The engine contract says it never raises; fail closed if it does.
            self.log.exception("handshake engine raised")
            return HandshakeResult(status=errno.EIO, detail="internal error in the worker")
        if not isinstance(result, HandshakeResult):
            self.log.error("handshake engine returned %r", type(result).__name__)
            return HandshakeResult(status=errno.EIO, detail="internal error in the worker")
        return result

    def _install_ktls(self) -> Callable[[socket.socket, bytes, bytes], None]:
        return self.install_ktls if self.install_ktls is not None else install_ktls

    def set_phase(self, phase: str) -> None:
        phase = phase[: ipc.MAX_PHASE_LEN]
        setproctitle(f"tlshd: worker {self.peer} {phase}")
        try:
            ipc.send_message(
                self.channel,
                {
                    "op": "phase",
                    "req": self.req_id,
                    "phase": phase,
                    "peer": self.peer[: ipc.MAX_PEER_LEN],
                },
            )
        except OSError as err:
            log.debug("phase report failed: %s", err)

    def _report(self, result: HandshakeResult) -> None:
        # The supervisor kills a worker whose strings pass ipc's bounds: trim them here.
        cipher = result.cipher[: ipc.MAX_CIPHER_LEN] if result.cipher is not None else None
        detail = result.detail[: ipc.MAX_DETAIL_LEN]
        if (cipher, detail) != (result.cipher, result.detail):
            result = dataclasses.replace(result, cipher=cipher, detail=detail)
        message = {"op": "result", "req": self.req_id, "result": result.to_wire()}
        try:
            ipc.send_message(self.channel, message)
        except ipc.IpcError:
            # Too large to send (an oversized `extra`): the status still matters.
            message["result"] = dataclasses.replace(result, extra={}).to_wire()
            ipc.send_message(self.channel, message)
