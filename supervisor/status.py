"""The root-only status socket behind `tlshd status`.

An AF_UNIX SOCK_STREAM listener (mode 0600 in a 0700 directory): a client
connects, writes one line (`status`), and gets one JSON document, then EOF.
Everything is non-blocking and every client has a short time limit, so a slow
or stuck client never stalls the supervisor's loop.

Ownership: `StatusServer` owns the listener, the socket file and every client
socket; it registers them in the supervisor's selector itself (the selector
key's data is a callable to run when the fd is ready) and unregisters them
before closing.  Forked workers drop their copies with `close_in_child`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from tlshd.log import log

from .memory import tree_memory

MAX_CLIENTS = 8
CLIENT_TIME_LIMIT_S = 2.0
MAX_REQUEST_LINE = 256
ACCEPT_PAUSE_S = 1.0


class _Client:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.started = now
        self.request = b""
        self.reply = b""
        self.replying = False


class StatusServer:
    def __init__(
        self,
        path: str,
        selector: selectors.BaseSelector,
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        self.path = path
        self._selector = selector
        self._snapshot = snapshot
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._paused_until: float | None = None  # accept paused (no descriptors)

    def open(self) -> bool:
        """Create the listener; a failure is a warning, never fatal."""
        try:
            self._listener = _bind_private_socket(self.path)
        except OSError as err:
            log.warning("status socket %s not available: %s", self.path, err)
            return False
        self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)
        return True

    def _on_accept(self, _events: int) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("status socket accept: %s", err)
                if err.errno in (errno.EMFILE, errno.ENFILE):
                    # The connection stays queued and the listener readable:
                    # stop watching it for a while rather than spin.
                    self._selector.unregister(self._listener)
                    self._paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            if len(self._clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, time.monotonic())
            self._clients[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ, lambda ev, c=client: self._on_io(c))

    def _on_io(self, client: _Client) -> None:
        try:
            if client.replying:
                self._write(client)
            else:
                self._read(client)
        except OSError:
            self._drop(client)

    def _read(self, client: _Client) -> None:
        chunk = client.sock.recv(MAX_REQUEST_LINE)
        client.request += chunk
        if chunk and b"\n" not in client.request and len(client.request) < MAX_REQUEST_LINE:
            return
        # Any request line (or EOF) gets the status document; there is one command.
        document = self._snapshot()
        client.reply = (json.dumps(document) + "\n").encode()
        client.replying = True
        self._selector.modify(
            client.sock, selectors.EVENT_WRITE, lambda ev, c=client: self._on_io(c)
        )
        self._write(client)

    def _write(self, client: _Client) -> None:
        sent = client.sock.send(client.reply)
        client.reply = client.reply[sent:]
        if not client.reply:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        if self._clients.pop(client.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()

    def expire_clients(self, now: float) -> None:
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            if self._listener is not None:
                self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)
        for client in list(self._clients.values()):
            if now - client.started > CLIENT_TIME_LIMIT_S:
                self._drop(client)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def close_in_child(self) -> None:
        """A forked worker drops its copies without touching the socket file."""
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def _bind_private_socket(path: str) -> socket.socket:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # The umask makes the socket 0600 from the moment it exists: there is no
    # window in which another user could connect before a chmod.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a previous run blocks bind(); anything that is
    not a socket is left alone (bind then fails with a clear error)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(mode):
        os.unlink(path)


# --- the document ---------------------------------------------------------------------


def build_status(arbiter: Any) -> dict[str, Any]:
    """The status document of a supervisor (supervisor/arbiter.py's Arbiter)."""
    now = time.monotonic()
    broker = arbiter.broker
    return {
        "pid": os.getpid(),
        "uptime_s": round(now - arbiter.started_at, 3),
        "generation": arbiter.generation.number,
        "zygotes": [_describe_zygote(z, now) for z in arbiter.pool.zygotes.values()],
        "workers": [_describe_worker(w, now) for w in arbiter.pool],
        "in_flight": broker.in_flight(),
        "queued": len(broker.queue),
        "accepting": arbiter.accepting and broker.can_accept(),
        "limits": {
            "max_queued": broker.max_queued,
            "max_running": broker.max_running,
            "fd_limit": broker.fd_limit,
            "fds_held": broker.held_fds(),
        },
        "done": arbiter.stats.done,
        "failed": arbiter.stats.failed,
        "counters": arbiter.stats.counters(),
        "latency_ms": arbiter.stats.latency(),
        "memory": tree_memory(os.getpid()),
    }


def _describe_zygote(zygote: Any, now: float) -> dict[str, Any]:
    return {
        "pid": zygote.pid,
        "generation": zygote.generation,
        "state": "retiring" if zygote.retiring else "ready" if zygote.ready_at else "starting",
        "age_s": round(now - zygote.spawned_at, 3),
    }


def _describe_worker(worker: Any, now: float) -> dict[str, Any]:
    request = worker.request
    return {
        "pid": worker.pid,
        "state": worker.state.value,
        "peer": request.peer if request else None,
        "req": request.req_id if request else None,
        "phase": worker.phase or None,
        "age_s": round(now - worker.requested_at, 3),
        "generation": worker.generation,
    }
