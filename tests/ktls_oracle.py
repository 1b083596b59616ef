"""A stand-in for the kernel's kTLS record layer, for tests on kernels without kTLS.

It reads a `tls12_crypto_info_*` struct back (layout from <linux/tls.h>, written
here independently of workers/ktls.py) and protects/unprotects TLS 1.3 records
with cryptography's AEADs exactly as the kernel would with those bytes.  If the
engine handed the kernel a wrong key, IV or sequence number, the real peer on
the other end of the socket would reject our records or we would fail to open
theirs.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

# cipher_type -> (key_len, iv field len, salt len, AEAD factory)
_LAYOUTS = {
    51: (16, 8, 4, AESGCM),
    52: (32, 8, 4, AESGCM),
    53: (16, 8, 4, lambda key: AESCCM(key, tag_length=16)),
    54: (32, 12, 0, ChaCha20Poly1305),
}

CT_ALERT, CT_HANDSHAKE, CT_APPLICATION_DATA = 21, 22, 23


@dataclass(frozen=True)
class CryptoInfo:
    version: int
    cipher_type: int
    key: bytes
    iv: bytes  # the full 12-byte TLS 1.3 write IV (salt + iv field)
    seq: int


def unpack_crypto_info(data: bytes) -> CryptoInfo:
    version, cipher_type = struct.unpack_from("=HH", data)
    key_len, iv_len, salt_len, _aead = _LAYOUTS[cipher_type]
    expected = 4 + iv_len + key_len + salt_len + 8
    if len(data) != expected:
        raise ValueError(
            f"crypto_info for cipher {cipher_type} is {len(data)} bytes, expected {expected}"
        )
    pos = 4
    iv_field = data[pos : pos + iv_len]
    pos += iv_len
    key = data[pos : pos + key_len]
    pos += key_len
    salt = data[pos : pos + salt_len]
    pos += salt_len
    seq = int.from_bytes(data[pos : pos + 8], "big")
    return CryptoInfo(version, cipher_type, key, salt + iv_field, seq)


class RecordLayer:
    """One direction of TLS 1.3 record protection, seq advancing per record."""

    def __init__(self, info: bytes | CryptoInfo) -> None:
        self.info = info if isinstance(info, CryptoInfo) else unpack_crypto_info(info)
        if self.info.version != 0x0304:
            raise ValueError(f"not TLS 1.3: {self.info.version:#x}")
        self.aead = _LAYOUTS[self.info.cipher_type][3](self.info.key)
        self.seq = self.info.seq

    def _nonce(self) -> bytes:
        return bytes(a ^ b for a, b in zip(self.info.iv, self.seq.to_bytes(12, "big"), strict=True))

    def seal(self, payload: bytes, content_type: int = CT_APPLICATION_DATA) -> bytes:
        inner = payload + bytes([content_type])
        header = struct.pack("!BHH", CT_APPLICATION_DATA, 0x0303, len(inner) + 16)
        record = header + self.aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return record

    def open(self, record: bytes) -> tuple[int, bytes]:
        """(inner content type, plaintext); raises cryptography's InvalidTag on a bad key."""
        header, body = record[:5], record[5:]
        if header[0] != CT_APPLICATION_DATA:
            raise ValueError(f"unprotected record of type {header[0]}: {record[:16].hex()}")
        inner = self.aead.decrypt(self._nonce(), body, header)
        self.seq += 1
        stripped = inner.rstrip(b"\x00")
        return stripped[-1], stripped[:-1]


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {len(data)} of {n} bytes")
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if not poller.poll(int(remaining * 1000) + 1):
            continue
        chunk = sock.recv(n - len(data), socket.MSG_DONTWAIT)
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_record(sock: socket.socket, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    header = recv_exact(sock, 5, deadline)
    (length,) = struct.unpack("!H", header[3:5])
    return header + recv_exact(sock, length, deadline)


def read_application_data(
    sock: socket.socket, rx: RecordLayer, want: bytes, timeout: float = 10.0
) -> tuple[bytes, list[int]]:
    """Open records until the plaintext collected contains `want`.

    Returns (data, inner types seen); NewSessionTickets from a peer server are
    skipped as the kernel consumer would receive and discard them.
    """
    deadline = time.monotonic() + timeout
    data, types = b"", []
    while want not in data:
        record = read_record(sock, max(deadline - time.monotonic(), 0.01))
        content_type, plaintext = rx.open(record)
        types.append(content_type)
        if content_type == CT_APPLICATION_DATA:
            data += plaintext
        elif content_type == CT_ALERT:
            raise ConnectionError(f"peer sent alert {plaintext.hex()}")
    return data, types
