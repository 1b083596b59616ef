"""kTLS hand-off: traffic keys from TLS 1.3 secrets, crypto_info structs, setsockopts.

OpenSSL in the cryptography wheel is built without kTLS, so the daemon programs
the kernel itself: it takes CLIENT/SERVER_TRAFFIC_SECRET_0 from the keylog
callback, derives key and IV with HKDF-Expand-Label (RFC 8446 §7.1, §7.3) and
packs them into the `struct tls12_crypto_info_*` layouts of <linux/tls.h>.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

# At module level, not in _aead: workers cannot import after dropping privileges.
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from tlshd.workers import kernelcaps

from tlshd.uapi import (
    SOL_TCP,
    SOL_TLS,
    TCP_ULP,
    TLS_1_3_VERSION,
    TLS_RX,
    TLS_TX,
    TLS_TX_MAX_PAYLOAD_LEN,
    TlsCipher,
)

IV_LEN = 12  # TLS 1.3 per-record nonce length for every AEAD suite in use
SEQ_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class SuiteInfo:
    """How one TLS 1.3 cipher suite maps onto kTLS."""

    name: str  # OpenSSL/IANA name, as SSL_CIPHER_get_name reports it
    cipher_type: TlsCipher
    key_len: int
    salt_len: int  # leading bytes of the 12-byte IV the kernel keeps as "salt"
    hash_name: str  # "sha256" or "sha384": the suite's HKDF hash

    @property
    def iv_field_len(self) -> int:
        return IV_LEN - self.salt_len

    @property
    def info_len(self) -> int:
        return 4 + self.iv_field_len + self.key_len + self.salt_len + 8

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()


# The only suites kTLS accepts that OpenSSL also offers (upstream ktls.c keeps the
# same four).  GCM/CCM keep iv[0:4] as salt; ChaCha20 has no salt and a 12-byte iv.
SUITES: dict[str, SuiteInfo] = {
    s.name: s
    for s in (
        SuiteInfo("TLS_AES_128_GCM_SHA256", TlsCipher.AES_GCM_128, 16, 4, "sha256"),
        SuiteInfo("TLS_AES_256_GCM_SHA384", TlsCipher.AES_GCM_256, 32, 4, "sha384"),
        SuiteInfo("TLS_CHACHA20_POLY1305_SHA256", TlsCipher.CHACHA20_POLY1305, 32, 0, "sha256"),
        SuiteInfo("TLS_AES_128_CCM_SHA256", TlsCipher.AES_CCM_128, 16, 4, "sha256"),
    )
}


class KtlsError(Exception):
    """A kTLS step failed; the message says which and why, in plain words."""

    def __init__(self, message: str, errno_value: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_value


def suite_info(name: str) -> SuiteInfo:
    """The table entry for `name`; KtlsError if kTLS cannot take that suite."""
    try:
        return SUITES[name]
    except KeyError:
        raise KtlsError(f"cipher {name} is not supported by kTLS") from None


def hkdf_expand_label(
    secret: bytes, label: str, length: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    """HKDF-Expand-Label(secret, label, "", length) of RFC 8446 §7.1."""
    full_label = b"tls13 " + label.encode("ascii")
    info = struct.pack("!HB", length, len(full_label)) + full_label + b"\x00"
    return HKDFExpand(algorithm=algorithm, length=length, info=info).derive(secret)


def derive_traffic_keys(secret: bytes, suite: SuiteInfo) -> tuple[bytes, bytes]:
    """(key, iv) for one direction from its application traffic secret (RFC 8446 §7.3)."""
    algorithm = suite.hash_algorithm()
    if len(secret) != algorithm.digest_size:
        raise KtlsError(
            f"traffic secret has {len(secret)} bytes, {suite.name} needs {algorithm.digest_size}"
        )
    key = hkdf_expand_label(secret, "key", suite.key_len, algorithm)
    iv = hkdf_expand_label(secret, "iv", IV_LEN, algorithm)
    return key, iv


def pack_crypto_info(suite: SuiteInfo, key: bytes, iv: bytes, seq: int) -> bytes:
    """The `tls12_crypto_info_*` struct for TLS_TX/TLS_RX (kernel-protocol.md §3.2).

    version and cipher_type are host-endian u16; rec_seq is big-endian because the
    kernel copies it straight into the record nonce computation.
    """
    if len(key) != suite.key_len or len(iv) != IV_LEN:
        raise KtlsError(f"bad key/iv length for {suite.name}")
    if not 0 <= seq <= SEQ_MAX:
        raise KtlsError(f"record sequence number {seq} out of range")
    salt, iv_field = iv[: suite.salt_len], iv[suite.salt_len :]
    return (
        struct.pack("=HH", TLS_1_3_VERSION, int(suite.cipher_type))
        + iv_field
        + key
        + salt
        + seq.to_bytes(8, "big")
    )


def crypto_info_from_secret(secret: bytes, suite: SuiteInfo, seq: int) -> bytes:
    """derive_traffic_keys + pack_crypto_info in one step."""
    key, iv = derive_traffic_keys(secret, suite)
    return pack_crypto_info(suite, key, iv, seq)


def _describe_setsockopt_error(step: str, err: OSError) -> str:
    code = err.errno
    if code in (errno.EBADF, errno.ENOTSOCK):
        why = "socket fd no longer valid"
    elif code in (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL):
        why = "kernel does not support kTLS or the requested cipher (is the tls module loaded?)"
    elif code == errno.EEXIST:
        why = "a ULP is already attached to the socket"
    elif code == errno.ENOTCONN:
        why = "socket is not connected any more"
    else:
        why = err.strerror or str(err)
    return f"{step}: {why} (errno {code})"


def install_ktls(sock: socket.socket, tx_info: bytes, rx_info: bytes) -> None:
    """Attach the "tls" ULP, then program TLS_TX and TLS_RX, in that order (as upstream).

    Raises KtlsError with a readable message; the ULP may stay attached on
    failure, which is fine because the kernel consumer closes the socket on EIO.
    """
    steps = (
        ("setsockopt(TCP_ULP, tls)", SOL_TCP, TCP_ULP, b"tls"),
        ("setsockopt(SOL_TLS, TLS_TX)", SOL_TLS, TLS_TX, tx_info),
        ("setsockopt(SOL_TLS, TLS_RX)", SOL_TLS, TLS_RX, rx_info),
    )
    for step, level, option, value in steps:
        try:
            sock.setsockopt(level, option, value)
        except OSError as err:
            raise KtlsError(_describe_setsockopt_error(step, err), _status_for(err)) from err


# The tls ULP attaches only to an ESTABLISHED socket (net/tls/tls_main.c,
# tls_init: ENOTCONN otherwise).  A peer that closed between its last
# handshake record and our setsockopt (nfsd cancels a server handshake after
# 5 s and closes the connection) leaves the client half here.  That is a
# premature close, which upstream reports as ETIMEDOUT so that the consumer
# retries (the sunrpc client reconnects on ETIMEDOUT, but fails the mount on
# EIO); anything else stays EIO.
_PEER_GONE = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE})


def _status_for(err: OSError) -> int:
    return errno.ETIMEDOUT if err.errno in _PEER_GONE else errno.EIO


# ------------------------------------------------------- record size (RFC 8449)
# record_size_limit (RFC 8449 §4) counts, in TLS 1.3, the inner plaintext:
# the data plus the one-byte ContentType.  TLS_TX_MAX_PAYLOAD_LEN takes the
# data alone (the kernel adds the ContentType: include/net/tls.h,
# tx_record_size_limit "excludes the ContentType"), from 63 to 2^14.
RECORD_SIZE_LIMIT_MIN = 64  # RFC 8449 §4: smaller values are illegal_parameter
RECORD_SIZE_LIMIT_TLS13_MAX = (1 << 14) + 1  # 2^14 of data + ContentType


def tx_max_payload_for(record_size_limit: int) -> int | None:
    """TLS_TX_MAX_PAYLOAD_LEN for a TLS 1.3 peer's record_size_limit, or None
    when the limit asks for nothing smaller than full records.  KtlsError for a
    limit below RFC 8449's minimum (the peer's ClientHello is then malformed)."""
    if record_size_limit < RECORD_SIZE_LIMIT_MIN:
        raise KtlsError(f"peer's record_size_limit {record_size_limit} is below 64 (RFC 8449)")
    if record_size_limit >= RECORD_SIZE_LIMIT_TLS13_MAX:
        return None
    return record_size_limit - 1


def tx_record_capper() -> Callable[[socket.socket, int], None] | None:
    """cap_tx_records where this kernel has the option, else None."""
    return cap_tx_records if kernelcaps.caps_tx_records() else None


def cap_tx_records(sock: socket.socket, max_payload: int) -> None:
    """setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN): no kTLS TX record carries
    more than `max_payload` bytes of data.  Call after TLS_TX; KtlsError."""
    try:
        sock.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", max_payload))
    except OSError as err:
        raise KtlsError(
            _describe_setsockopt_error(
                f"setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN={max_payload})", err
            )
        ) from err


# ---------------------------------------------------------------- alert records
# The engine sometimes has to end a handshake with an alert OpenSSL cannot be
# made to send (access_denied after a completed handshake); it seals that one
# record itself with the keys it would otherwise give the kernel.

CT_ALERT = 21
CT_APPLICATION_DATA = 23
ALERT_LEVEL_FATAL = 2
LEGACY_RECORD_VERSION = b"\x03\x03"  # RFC 8446 §5.1
TAG_LEN = 16


def plaintext_alert(description: int) -> bytes:
    """A TLSPlaintext fatal alert record, for use before any keys exist."""
    return (
        bytes([CT_ALERT])
        + LEGACY_RECORD_VERSION
        + b"\x00\x02"
        + bytes([ALERT_LEVEL_FATAL, description])
    )


def _aead(suite: SuiteInfo, key: bytes) -> AESCCM | AESGCM | ChaCha20Poly1305:
    if suite.cipher_type == TlsCipher.CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    if suite.cipher_type == TlsCipher.AES_CCM_128:
        return AESCCM(key, tag_length=TAG_LEN)
    return AESGCM(key)


def seal_record(
    suite: SuiteInfo, key: bytes, iv: bytes, seq: int, content_type: int, payload: bytes
) -> bytes:
    """One TLSCiphertext record (RFC 8446 §5.2): nonce = iv XOR seq, AAD = header."""
    inner = payload + bytes([content_type])
    header = (
        bytes([CT_APPLICATION_DATA])
        + LEGACY_RECORD_VERSION
        + struct.pack("!H", len(inner) + TAG_LEN)
    )
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(IV_LEN, "big")
    return header + _aead(suite, key).encrypt(nonce, inner, header)


def seal_alert(suite: SuiteInfo, secret: bytes, seq: int, description: int) -> bytes:
    """A fatal alert sealed under the traffic key derived from `secret`."""
    key, iv = derive_traffic_keys(secret, suite)
    return seal_record(suite, key, iv, seq, CT_ALERT, bytes([ALERT_LEVEL_FATAL, description]))
