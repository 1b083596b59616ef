"""Passing an accepted socket to a worker, and finishing it with DONE.

Ownership, in order:
  1. ACCEPT installs an fd in the supervisor; `open_request` wraps it in a
     socket object (flags untouched) that the `Request` owns.
  2. `hand_off` sends a *copy* by SCM_RIGHTS; the supervisor keeps its own,
     because the kernel looks DONE's SOCKFD up in the sender's fd table.
  3. `complete` sends DONE with the supervisor's fd number, then closes the
     supervisor's copy.  It runs exactly once per request, on every path.
The accepted socket is never shut down and its O_NONBLOCK flag never changed:
it is the kernel consumer's socket too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time

from tlshd import ipc
from tlshd.log import handshake_logger, log
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import MsgType

from .queue import Request
from .stats import CompletionStats

# The worker is told to stop this much before the supervisor's deadline, so an
# engine that honours its deadline reports ETIMEDOUT itself before the kill.
WORKER_DEADLINE_MARGIN_S = 0.25


def peer_name(sock: socket.socket, params: HandshakeParams) -> str:
    """The consumer's peer name if it gave one, else the peer address."""
    try:
        address = sock.getpeername()
    except OSError:
        address = None
    text = _format_address(address)
    if params.peername:
        return f"{params.peername} ({text})" if text else params.peername
    return text or "unknown peer"


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, str) and address:
        return address
    return ""


def open_request(
    params: HandshakeParams, req_id: int, now: float, budget_s: float
) -> Request | None:
    """Wrap an accepted fd.  None if it is no socket: the kernel could not
    look it up for DONE either, so the fd is only closed."""
    try:
        sock = socket.socket(fileno=params.sockfd)
    except OSError as err:
        log.error("req=%d: accepted fd %d is not a socket: %s", req_id, params.sockfd, err)
        with contextlib.suppress(OSError):
            os.close(params.sockfd)
        return None
    peer = peer_name(sock, params)
    return Request(
        req_id=req_id,
        params=params,
        sock=sock,
        peer=peer,
        accepted_at=now,
        deadline=now + budget_s,
        log=handshake_logger(req_id, peer),
        pair_key=pair_key(sock, params),
    )


def pair_key(sock: socket.socket, params: HandshakeParams) -> tuple[object, object] | None:
    """(client address, server address) of the connection; None if unknown.

    Both ends of a connection to this host itself (loopback mounts) get the
    same key, so the arbiter can give them workers together."""
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    if params.message_type == MsgType.SERVERHELLO:
        return (remote, local)
    return (local, remote)


def handshake_message(request: Request, now: float) -> dict[str, object]:
    seconds_left = max(0.0, request.deadline - now - WORKER_DEADLINE_MARGIN_S)
    return {
        "op": "handshake",
        "req": request.req_id,
        "params": request.params.to_wire(),
        "deadline_s": round(seconds_left, 3),
    }


def hand_off(worker_sock: socket.socket, worker_name: str, request: Request, now: float) -> None:
    """Send the request and a copy of its fd; raises OSError if the worker's
    socket is full or gone (non-blocking: the supervisor never waits)."""
    ipc.send_message(worker_sock, handshake_message(request, now), (request.sock.fileno(),))
    request.log.debug("handed fd %d to worker %s", request.sock.fileno(), worker_name)


def complete(
    netlink: object, request: Request, result: HandshakeResult, stats: CompletionStats
) -> None:
    """DONE with the supervisor's fd, close it, count it, log one line."""
    if request.completed:
        return
    request.completed = True
    fd = request.sock.fileno()
    try:
        netlink.done(fd, result.status, result.remote_auth)  # type: ignore[attr-defined]
    except OSError as err:
        request.log.error("DONE(%s) for fd %d failed: %s", errno_name(result.status), fd, err)
    finally:
        request.sock.close()
    latency = time.monotonic() - request.accepted_at
    stats.record(result.status, latency)
    _log_completion(request, result, latency)


def _log_completion(request: Request, result: HandshakeResult, latency_s: float) -> None:
    worker = f"worker {request.worker_pid}" if request.worker_pid else "no worker"
    detail = f": {result.detail}" if result.detail else ""
    if result.status == 0:
        request.log.info(
            "%s handshake succeeded, cipher %s, %.1f ms (%s)",
            request.role,
            result.cipher or "?",
            latency_s * 1000,
            worker,
        )
    else:
        request.log.error(
            "%s handshake failed with %s, %.1f ms (%s)%s",
            request.role,
            errno_name(result.status),
            latency_s * 1000,
            worker,
            detail,
        )


def errno_name(status: int) -> str:
    if status == 0:
        return "success"
    name = errno.errorcode.get(status, str(status))
    return f"{name} ({os.strerror(status)})"
