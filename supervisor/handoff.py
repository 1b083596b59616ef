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
from collections.abc import Callable
from typing import Any

from tlshd import ipc
from tlshd.log import handshake_logger, log, peer_name
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import SOL_TCP, SOL_TLS, TCP_ULP, TLS_RX, TLS_TX, MsgType

from .queue import Request
from .stats import CompletionStats

# The worker is told to stop this much before the supervisor's deadline, so an
# engine that honours its deadline reports ETIMEDOUT itself before the kill.
WORKER_DEADLINE_MARGIN_S = 0.25
TCP_ULP_NAME_MAX = 16  # include/net/tcp.h
TLS_CRYPTO_INFO_SIZE = 4  # struct tls_crypto_info: u16 version, u16 cipher_type


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
    peer = peer_name(sock, params.peername)
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


def ktls_state(sock: socket.socket) -> tuple[str, bool, bool]:
    """(TCP_ULP name, TLS_TX installed, TLS_RX installed), read on our own copy.

    TCP_ULP reads back the ULP's name, empty without one (tcp_getsockopt).
    SOL_TLS TLS_TX/TLS_RX fail with EBUSY until that direction's crypto_info
    is set (tls_getsockopt_conf); with a 4-byte buffer the kernel copies only
    struct tls_crypto_info (version, cipher), never the key."""
    try:
        ulp = sock.getsockopt(SOL_TCP, TCP_ULP, TCP_ULP_NAME_MAX).split(b"\0", 1)[0]
    except OSError:
        return "", False, False
    return ulp.decode("ascii", "replace"), _tls_set(sock, TLS_TX), _tls_set(sock, TLS_RX)


def _tls_set(sock: socket.socket, direction: int) -> bool:
    try:
        sock.getsockopt(SOL_TLS, direction, TLS_CRYPTO_INFO_SIZE)
    except OSError:
        return False
    return True


def checked_result(
    request: Request,
    result: HandshakeResult,
    state: Callable[[socket.socket], tuple[str, bool, bool]] = ktls_state,
) -> HandshakeResult:
    """`result`, unless it claims success on a socket without kTLS: then EIO.

    A worker may be compromised and report success without programming kTLS;
    the consumer would then send plaintext on a socket it believes encrypted."""
    if result.status != 0:
        return result
    ulp, tx, rx = state(request.sock)
    if ulp == "tls" and tx and rx:
        return result
    request.log.error(
        "worker reported success, but the socket has ULP %r, TLS_TX %s, TLS_RX %s",
        ulp,
        "set" if tx else "unset",
        "set" if rx else "unset",
    )
    return HandshakeResult(status=errno.EIO, detail="kTLS is not installed on the socket")


def handshake_message(request: Request, now: float) -> dict[str, object]:
    """`waited_s`: since ACCEPT, from which the worker sets its CPU priority
    (workers/priority.py: oldest first)."""
    seconds_left = max(0.0, request.deadline - now - WORKER_DEADLINE_MARGIN_S)
    return {
        "op": "handshake",
        "req": request.req_id,
        "params": request.params.to_wire(),
        "deadline_s": round(seconds_left, 3),
        "waited_s": round(max(0.0, now - request.accepted_at), 3),
    }


def hand_off(worker_sock: socket.socket, worker_name: str, request: Request, now: float) -> None:
    """Send the request and a copy of its fd; raises OSError if the worker's
    socket is full or gone (non-blocking: the supervisor never waits)."""
    ipc.send_message(worker_sock, handshake_message(request, now), (request.sock.fileno(),))
    request.log.debug("handed fd %d to worker %s", request.sock.fileno(), worker_name)


def complete(
    netlink: Any, request: Request, result: HandshakeResult, stats: CompletionStats
) -> None:
    """DONE with the supervisor's fd, close it, count it, log one line."""
    if request.completed:
        return
    request.completed = True
    fd = request.sock.fileno()
    try:
        netlink.done(fd, result.status, result.remote_auth)
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
            "%s handshake succeeded, cipher %s, group %s, %.1f ms (%s)",
            request.role,
            result.cipher or "?",
            result.group or "?",
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
