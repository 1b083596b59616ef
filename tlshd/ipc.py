"""Supervisor-worker messages: one JSON object per SOCK_SEQPACKET datagram.

SOCK_SEQPACKET keeps message boundaries and reports a peer's exit as EOF, so
one datagram is one message and a dead worker is noticed without waiting for
SIGCHLD.  File descriptors travel as SCM_RIGHTS ancillary data.

Workers are untrusted: `decode` only proves a datagram is a JSON object with
a known `op`; the `check_*` functions below validate the fields the supervisor
relies on and raise `IpcError` on anything else.  Ownership: these functions
never close a socket they are given; `recv_message` hands every received fd
to its caller, who must close it (also on `IpcError`, see `recv_message`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from tlshd.params import HandshakeResult
from tlshd.uapi import MAX_ERRNO

MAX_MESSAGE = 256 * 1024
MAX_FDS = 1

# Fields a worker may send, with bounds that keep a hostile worker from
# making the supervisor hold large strings.
MAX_PHASE_LEN = 32
MAX_PEER_LEN = 512
MAX_IDENTITY_LEN = 1024
MAX_DESCRIPTION_LEN = 1024
MAX_DETAIL_LEN = 2048
MAX_CIPHER_LEN = 64
MAX_CERT_DER = 64 * 1024
MAX_REMOTE_AUTH = 5  # the kernel keeps at most five REMOTE_AUTH serials
U32_MAX = 0xFFFFFFFF
# The deepest legitimate message is {"result": {"remote_auth": [...]}}: 3 levels.
MAX_DEPTH = 4

WORKER_OPS = frozenset({"ready", "phase", "key_read", "psk_search", "add_cert", "result"})
KEY_OPS = frozenset({"key_read", "psk_search", "add_cert"})
SUPERVISOR_OPS = frozenset({"handshake", "key_reply"})


class IpcError(Exception):
    """A malformed or unexpected message; the sender is not to be trusted."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise IpcError(f"message {message.get('op')!r} is {len(data)} bytes, over {MAX_MESSAGE}")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(data: bytes, allowed_ops: frozenset[str]) -> dict[str, Any]:
    """The message in `data`, or IpcError: whatever the bytes, nothing else escapes.

    json.loads recurses once per nesting level, so ~2 KB of "[" from a worker
    raise RecursionError (not a ValueError); NaN/Infinity are not JSON; an
    integer of over 4300 digits raises ValueError (sys.int_info
    .str_digits_check_threshold).  After parsing, `_check_tree` bounds the
    nesting and refuses strings that are not valid Unicode (a lone surrogate
    cannot be encoded for the log or the status socket)."""
    try:
        message = json.loads(data, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise IpcError(f"not JSON: {str(err)[:200]}") from None
    if not isinstance(message, dict):
        raise IpcError("not a JSON object")
    _check_tree(message)
    op = message.get("op")
    if op not in allowed_ops:
        raise IpcError(f"unknown op {op!r}")
    return message


def _check_tree(message: dict[str, Any]) -> None:
    """Depth at most MAX_DEPTH, every string (key or value) valid UTF-8."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise IpcError(f"nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_unicode(key)
                stack.append((item, depth + 1))


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise IpcError("a string is not valid Unicode (lone surrogate)") from None


def send_message(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """Send one message (and fds).  On a non-blocking socket a full buffer
    raises BlockingIOError; a short send cannot happen on SOCK_SEQPACKET."""
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_message(
    sock: socket.socket, allowed_ops: frozenset[str]
) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message; (None, []) means the peer closed its end.

    Received fds are closed here if the message is rejected, so on IpcError
    the caller owns nothing; otherwise the caller owns the returned fds.
    """
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE + 1, MAX_FDS)
    try:
        if not data and not fds:
            return None, []
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
            raise IpcError("message or its ancillary data was truncated")
        return decode(data, allowed_ops), fds
    except IpcError:
        for fd in fds:
            os.close(fd)
        raise


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, limit: int) -> bytes:
    if not isinstance(text, str) or len(text) > (limit * 4) // 3 + 4:
        raise IpcError("bad base64 field")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise IpcError("bad base64 field") from None


# --- field checks -----------------------------------------------------------


def check_int(message: dict[str, Any], key: str, low: int = 0, high: int = U32_MAX) -> int:
    value = message.get(key)
    # bool is an int subclass; a worker saying `true` is junk.
    if type(value) is not int or not low <= value <= high:
        raise IpcError(f"field {key!r} is not an integer in [{low}, {high}]")
    return value


def check_optional_int(
    message: dict[str, Any], key: str, low: int = 0, high: int = U32_MAX
) -> int | None:
    if message.get(key) is None:
        return None
    return check_int(message, key, low, high)


def check_str(message: dict[str, Any], key: str, limit: int) -> str:
    value = message.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise IpcError(f"field {key!r} is not a string of at most {limit} characters")
    return value


def check_optional_str(message: dict[str, Any], key: str, limit: int) -> str | None:
    if message.get(key) is None:
        return None
    return check_str(message, key, limit)


def check_req(message: dict[str, Any], expected: int | None) -> int:
    """The `req` a worker names must be the request it was handed."""
    req = check_int(message, "req", 0, 2**63 - 1)
    if expected is None or req != expected:
        raise IpcError(f"message for request {req}, but the worker holds {expected}")
    return req


@dataclass(frozen=True)
class KeyRequest:
    """A worker's key request, validated; `args` go to SupervisorKeyService."""

    op: str
    id: int
    args: dict[str, Any]


def check_key_request(message: dict[str, Any]) -> KeyRequest:
    op = message["op"]
    request_id = check_int(message, "id", 0, 2**31 - 1)
    if op == "key_read":
        args: dict[str, Any] = {"serial": check_int(message, "serial", 1, 2**31 - 1)}
    elif op == "psk_search":
        args = {
            "identity": check_str(message, "identity", MAX_IDENTITY_LEN),
            "keyring": check_optional_int(message, "keyring", 0, 2**31 - 1),
        }
    elif op == "add_cert":
        b64decode(message.get("der_b64"), MAX_CERT_DER)  # well-formed, bounded
        args = {
            "der_b64": message["der_b64"],
            "description": check_str(message, "description", MAX_DESCRIPTION_LEN),
        }
    else:
        raise IpcError(f"{op!r} is not a key request")
    return KeyRequest(op=op, id=request_id, args=args)


def check_result(message: dict[str, Any]) -> HandshakeResult:
    """Validate the `result` field: status within MAX_ERRNO (the kernel
    rejects DONE above it), at most five u32 REMOTE_AUTH serials."""
    wire = message.get("result")
    if not isinstance(wire, dict):
        raise IpcError("field 'result' is not an object")
    status = check_int(wire, "status", 0, MAX_ERRNO)
    remote_auth = wire.get("remote_auth", [])
    if (
        not isinstance(remote_auth, list)
        or len(remote_auth) > MAX_REMOTE_AUTH
        or any(type(s) is not int or not 0 <= s <= U32_MAX for s in remote_auth)
    ):
        raise IpcError("field 'remote_auth' is not a list of at most five u32 serials")
    extra = wire.get("extra", {})
    if not isinstance(extra, dict):
        raise IpcError("field 'extra' is not an object")
    return HandshakeResult(
        status=status,
        remote_auth=tuple(remote_auth),
        cipher=check_optional_str(wire, "cipher", MAX_CIPHER_LEN),
        detail=check_optional_str(wire, "detail", MAX_DETAIL_LEN) or "",
        extra=extra,
    )
