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
import errno
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from tlshd.keys import KeyMaterial
from tlshd.params import HandshakeResult
from tlshd.uapi import KEY_DESC_MAX, KEY_SERIAL_MAX, MAX_ERRNO, MAX_REMOTE_AUTH

MAX_MESSAGE = 256 * 1024
MAX_FDS = 1

# Fields a worker may send, with bounds that keep a hostile worker from
# making the supervisor hold large strings.
MAX_PHASE_LEN = 32
MAX_PEER_LEN = 512
MAX_DETAIL_LEN = 2048
MAX_CIPHER_LEN = 64
U32_MAX = 0xFFFFFFFF
# The deepest legitimate message is {"result": {"remote_auth": [...]}}: 3 levels.
MAX_DEPTH = 4

# --- limits shared by the worker and the supervisor: one definition each ----
# A worker trims what it sends to these, the supervisor kills a worker that
# exceeds them; so an honest worker is never killed over data a peer chose.

# nfsd only tests REMOTE_AUTH for non-zero; upstream sends UINT_MAX per verified
# client certificate since 1.3.0 instead of adding it to a keyring.
X509_SERVER_PEER_ID = 0xFFFFFFFF
# The kernel's key limits (tlshd/uapi.py): a longer description (PSK
# identity, certificate description) or a larger serial names no key.
MAX_SERIAL = KEY_SERIAL_MAX
MAX_KEY_DESCRIPTION = KEY_DESC_MAX
# A peer certificate added to the keyring (DER).
MAX_CERT_DER = 64 * 1024
# PSK identities looked up for one request: a ClientHello may carry thousands
# (RFC 8446 §4.2.11 allows 2^16 bytes of them); each costs keyring searches in
# the supervisor.  NVMe/TCP hosts offer one, generated and retained PSKs at most
# a handful.
MAX_PSK_IDENTITIES = 16

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
    if _may_break_limits(data):
        _check_tree(message)
    op = message.get("op")
    if not isinstance(op, str) or op not in allowed_ops:  # a list is unhashable
        raise IpcError(f"unknown op {op!r}")
    return message


def _may_break_limits(data: bytes) -> bool:
    """False if no value in `data` can be too deep or a lone surrogate, so
    that the walk of `_check_tree` is needed only for odd messages (it was a
    tenth of the supervisor's CPU per request; honest peers send json.dumps
    output, which is ASCII).  Each level of nesting needs a "[" or "{" of its
    own, so no more of them than MAX_DEPTH bound the depth.  json.loads reads
    bytes as UTF-8, -16 or -32 with "surrogatepass", so only ASCII without
    NULs (read as UTF-8) rules out a surrogate other than a \\uD800-\\uDFFF
    escape, which is looked for as well."""
    if not data.isascii() or b"\0" in data:
        return True
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        return True
    return b"\\ud" in data or b"\\uD" in data


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


# --- the key protocol ---------------------------------------------------------


def is_key_description(value: object) -> bool:
    """Whether `value` can be a kernel key description: text of 1..4095 UTF-8
    bytes without NUL (decode has already refused lone surrogates)."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_KEY_DESCRIPTION
        and "\0" not in value
        and len(value.encode("utf-8", "surrogatepass")) <= MAX_KEY_DESCRIPTION
    )


def fit_key_description(text: str) -> str:
    """`text` made a valid key description: NULs dropped, cut to the byte limit
    at a character boundary (for descriptions the daemon builds from peer data)."""
    data = text.replace("\0", "").encode("utf-8", "replace")[:MAX_KEY_DESCRIPTION]
    return data.decode("utf-8", "ignore") or "?"


def _check_serial(message: dict[str, Any], key: str) -> int:
    return check_int(message, key, 1, MAX_SERIAL)


@dataclass(frozen=True)
class KeyRequest:
    """A worker's request for kernel keys; `op` says which fields matter.

    key_read:   `serial`, one the request's ACCEPT named
    psk_search: `identities`, the PSK identities the peer's ClientHello offered,
                in order (at most MAX_PSK_IDENTITIES); `keyring` from ACCEPT
    add_cert:   `der` and `description` of a verified peer certificate
    """

    op: str
    id: int = 0
    serial: int = 0
    identities: tuple[str, ...] = ()
    keyring: int | None = None
    der: bytes = b""
    description: str = ""

    def to_message(self, req: int) -> dict[str, Any]:
        message: dict[str, Any] = {"op": self.op, "req": req, "id": self.id}
        if self.op == "key_read":
            message["serial"] = self.serial
        elif self.op == "psk_search":
            message["identities"] = list(self.identities)
            message["keyring"] = self.keyring
        elif self.op == "add_cert":
            message["der_b64"] = b64encode(self.der)
            message["description"] = self.description
        return message

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> KeyRequest:
        """The one validator of key requests; IpcError on anything malformed."""
        op = message.get("op")
        request_id = check_int(message, "id", 0, 2**31 - 1)
        if op == "key_read":
            return cls(op, request_id, serial=_check_serial(message, "serial"))
        if op == "psk_search":
            identities = message.get("identities")
            if (
                not isinstance(identities, list)
                or not 0 < len(identities) <= MAX_PSK_IDENTITIES
                or not all(is_key_description(i) for i in identities)
            ):
                raise IpcError(
                    f"field 'identities' is not a list of 1..{MAX_PSK_IDENTITIES} "
                    f"key descriptions of at most {MAX_KEY_DESCRIPTION} bytes"
                )
            keyring = check_optional_int(message, "keyring", 0, MAX_SERIAL) or None
            return cls(op, request_id, identities=tuple(identities), keyring=keyring)
        if op == "add_cert":
            der = b64decode(message.get("der_b64"), MAX_CERT_DER)
            description = message.get("description")
            if not der or len(der) > MAX_CERT_DER or not is_key_description(description):
                raise IpcError("add_cert needs a DER certificate and a key description")
            assert isinstance(description, str)
            return cls(op, request_id, der=der, description=description)
        raise IpcError(f"{op!r} is not a key request")


@dataclass(frozen=True)
class KeyReply:
    """The supervisor's answer to one KeyRequest."""

    ok: bool = False
    errno: int = 0
    serial: int = 0
    description: str = ""
    payload: bytes = b""

    @classmethod
    def failure(cls, err: int, serial: int = 0) -> KeyReply:
        return cls(ok=False, errno=err, serial=serial)

    @classmethod
    def of(cls, material: KeyMaterial | None) -> KeyReply:
        """A found key, or ENOKEY for None."""
        if material is None:
            return cls.failure(errno.ENOKEY)
        return cls(True, 0, material.serial, material.description, material.payload)

    def material(self) -> KeyMaterial:
        return KeyMaterial(self.serial, self.description, self.payload)

    def to_message(self, request_id: int) -> dict[str, Any]:
        return {
            "op": "key_reply",
            "id": request_id,
            "ok": self.ok,
            "errno": self.errno,
            "serial": self.serial,
            "description": self.description,
            "payload_b64": b64encode(self.payload),
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> KeyReply:
        """Absent fields take their defaults; present ones must be well-formed."""
        fields = {"errno": 0, "serial": 0, "description": "", "payload_b64": "", **message}
        ok = fields.get("ok")
        if type(ok) is not bool:
            raise IpcError("field 'ok' is not a boolean")
        return cls(
            ok=ok,
            errno=check_int(fields, "errno", 0, MAX_ERRNO),
            serial=check_int(fields, "serial", 0, MAX_SERIAL),
            description=check_str(fields, "description", MAX_KEY_DESCRIPTION),
            payload=b64decode(fields["payload_b64"], MAX_MESSAGE),
        )


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
    unknown = set(wire) - _RESULT_FIELDS
    if unknown:
        raise IpcError(f"result has unknown fields {sorted(unknown)[:5]}")
    return HandshakeResult(
        status=status,
        remote_auth=tuple(remote_auth),
        cipher=check_optional_str(wire, "cipher", MAX_CIPHER_LEN),
        detail=check_optional_str(wire, "detail", MAX_DETAIL_LEN) or "",
        group=check_optional_str(wire, "group", MAX_CIPHER_LEN),
    )


_RESULT_FIELDS = frozenset({"status", "remote_auth", "cipher", "detail", "group"})
