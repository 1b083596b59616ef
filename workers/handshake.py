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
from collections.abc import Callable, Sequence
from typing import Any

from tlshd.workers import priority
from tlshd.workers.engine import HandshakeContext
from tlshd.workers.ktls import install_ktls

from tlshd import ipc
from tlshd.keys import KeyMaterial, KeyServiceError
from tlshd.log import HandshakeLogAdapter, handshake_logger, log, peer_name
from tlshd.params import Engine, HandshakeParams, HandshakeResult, role_name
from tlshd.proctitle import set_title


class IpcKeyService:
    """tlshd.keys.KeyService over the worker's channel to the supervisor.

    Requests use tlshd.ipc.KeyRequest and its limits; what a peer chose that
    cannot fit them (a PSK identity longer than any key description, more
    identities than MAX_PSK_IDENTITIES, a huge certificate) is left out here,
    so the supervisor never sees a request it must treat as junk."""

    def __init__(self, channel: socket.socket, req_id: int, deadline: float) -> None:
        self._channel = channel
        self._req_id = req_id
        self._deadline = deadline
        self._next_id = 1

    def read_key(self, serial: int) -> KeyMaterial:
        if not 0 < serial <= ipc.MAX_SERIAL:  # from ACCEPT: no key has it
            raise KeyServiceError(f"key {serial}: not a key serial", errno.ENOKEY)
        reply = self._ask(ipc.KeyRequest("key_read", serial=serial))
        if not reply.ok:
            raise self._error(reply, f"key {serial}")
        return reply.material()

    def search_psks(self, identities: Sequence[str], keyring: int | None) -> KeyMaterial | None:
        usable = [i for i in identities if ipc.is_key_description(i)][: ipc.MAX_PSK_IDENTITIES]
        if not usable:
            return None
        reply = self._ask(
            ipc.KeyRequest("psk_search", identities=tuple(usable), keyring=keyring or None)
        )
        if reply.ok:
            return reply.material() if reply.serial else None
        if reply.errno == errno.ENOKEY:
            return None
        raise self._error(reply, "PSK search")

    def add_peer_certificate(self, der: bytes, description: str) -> int:
        if not der or len(der) > ipc.MAX_CERT_DER:
            return 0
        reply = self._ask(
            ipc.KeyRequest("add_cert", der=der, description=ipc.fit_key_description(description))
        )
        return reply.serial if reply.ok and reply.serial > 0 else 0

    @staticmethod
    def _error(reply: ipc.KeyReply, what: str) -> KeyServiceError:
        err = reply.errno or errno.ENOKEY
        return KeyServiceError(f"{what}: {errno.errorcode.get(err, err)}", err)

    def _ask(self, request: ipc.KeyRequest) -> ipc.KeyReply:
        request_id = self._next_id
        self._next_id += 1
        request = dataclasses.replace(request, id=request_id)
        ipc.send_message(self._channel, request.to_message(self._req_id))
        while True:
            message = self._receive_reply()
            if message.get("id") == request_id:
                try:
                    return ipc.KeyReply.from_message(message)
                except ipc.IpcError as err:
                    raise KeyServiceError(f"bad key reply: {err}", errno.EIO) from None

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
        threaded: bool = False,
    ) -> None:
        self.channel = channel
        self.threaded = threaded  # in a worker host: the title is the host's
        self.req_id = int(message["req"])
        self.params = HandshakeParams.from_wire(message["params"])
        self.deadline = time.monotonic() + float(message["deadline_s"])
        self.waited_s = float(message.get("waited_s", 0.0))
        self.fd = fd
        self.generation = generation
        self.engine = engine
        self.install_ktls = install_ktls
        self.log: HandshakeLogAdapter = handshake_logger(self.req_id, None)
        self.peer = ""

    def run(self) -> HandshakeResult:
        priority.follow(self.waited_s)
        sock = socket.socket(fileno=self.fd)
        try:
            self.peer = peer_name(sock, self.params.peername)
            self.log = handshake_logger(self.req_id, self.peer)
            self.set_phase(role_name(self.params.message_type))
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
            # object: a fake or broken engine may return anything (checked below).
            result: object = self.engine(sock, self.params, ctx)
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
        if not self.threaded:
            set_title(f"tlshd: worker {self.peer} {phase}")
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
        group = result.group[: ipc.MAX_CIPHER_LEN] if result.group is not None else None
        detail = result.detail[: ipc.MAX_DETAIL_LEN]
        if (cipher, group, detail) != (result.cipher, result.group, result.detail):
            result = dataclasses.replace(result, cipher=cipher, group=group, detail=detail)
        ipc.send_message(
            self.channel, {"op": "result", "req": self.req_id, "result": result.to_wire()}
        )
