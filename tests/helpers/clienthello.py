"""A raw TLS 1.3 ClientHello offering chosen external PSK identities.

No TLS library lets a client offer thousands of PSK identities, or one of
2,000 characters, so the hostile-peer tests write the ClientHello by hand
(RFC 8446 §4.1.2, §4.2.11).  The binders are zeros: a server looks at the
binder of an identity only once it has found that identity's key.
"""

from __future__ import annotations

import os
import socket
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

TLS_AES_128_GCM_SHA256 = 0x1301
MAX_RECORD = 16384


def _vec(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


def _ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!H", ext_type) + _vec(data, 2)


def client_hello(identities: list[bytes]) -> bytes:
    """The ClientHello handshake message (pre_shared_key last, as required)."""
    public = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    offered = b"".join(_vec(identity, 2) + b"\0\0\0\0" for identity in identities)
    binders = b"".join(_vec(bytes(32), 1) for _ in identities)
    extensions = b"".join(
        (
            _ext(43, _vec(b"\x03\x04", 1)),  # supported_versions: TLS 1.3
            _ext(10, _vec(b"\x00\x1d", 2)),  # supported_groups: x25519
            _ext(13, _vec(b"\x04\x03\x08\x04", 2)),  # signature_algorithms
            _ext(51, _vec(b"\x00\x1d" + _vec(public, 2), 2)),  # key_share
            _ext(45, _vec(b"\x01", 1)),  # psk_key_exchange_modes: psk_dhe_ke
            _ext(41, _vec(offered, 2) + _vec(binders, 2)),  # pre_shared_key
        )
    )
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + _vec(os.urandom(32), 1)
        + _vec(struct.pack("!H", TLS_AES_128_GCM_SHA256), 2)
        + _vec(b"\x00", 1)
        + _vec(extensions, 2)
    )
    return b"\x01" + _vec(body, 3)


def send_client_hello(sock: socket.socket, identities: list[bytes]) -> None:
    """Write the ClientHello as handshake records of at most 2^14 bytes each."""
    message = client_hello(identities)
    for start in range(0, len(message), MAX_RECORD):
        chunk = message[start : start + MAX_RECORD]
        sock.sendall(b"\x16\x03\x01" + _vec(chunk, 2))


def read_alert(sock: socket.socket, timeout: float = 20.0) -> int | None:
    """The description of the first alert record the server sends, or None at EOF."""
    sock.settimeout(timeout)
    try:
        while True:
            header = _recv_exactly(sock, 5)
            if header is None:
                return None
            body = _recv_exactly(sock, int.from_bytes(header[3:5], "big"))
            if body is None:
                return None
            if header[0] == 21 and len(body) >= 2:
                return body[1]
    finally:
        sock.settimeout(None)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
