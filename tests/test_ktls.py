"""workers/ktls.py: HKDF-Expand-Label, crypto_info layouts, setsockopt sequence."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from tlshd.workers import ktls

from tests.ktls_oracle import unpack_crypto_info

# RFC 8448 §3 (simple 1-RTT): server application_traffic_secret_0 and its
# "derive write traffic keys for application data" output.
RFC8448_SERVER_AP_SECRET = bytes.fromhex(
    "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"
)
RFC8448_SERVER_AP_KEY = bytes.fromhex("9f02283b6c9c07efc26bb9f2ac92e356")
RFC8448_SERVER_AP_IV = bytes.fromhex("cf782b88dd83549aadf1e984")


def test_hkdf_expand_label_matches_rfc8448() -> None:
    suite = ktls.SUITES["TLS_AES_128_GCM_SHA256"]
    key, iv = ktls.derive_traffic_keys(RFC8448_SERVER_AP_SECRET, suite)
    assert key == RFC8448_SERVER_AP_KEY
    assert iv == RFC8448_SERVER_AP_IV


def test_secret_length_must_match_suite_hash() -> None:
    with pytest.raises(ktls.KtlsError):
        ktls.derive_traffic_keys(RFC8448_SERVER_AP_SECRET, ktls.SUITES["TLS_AES_256_GCM_SHA384"])


@pytest.mark.parametrize(
    ("name", "cipher_type", "size", "key_off", "salt_off"),
    [
        ("TLS_AES_128_GCM_SHA256", 51, 40, 12, 28),
        ("TLS_AES_256_GCM_SHA384", 52, 56, 12, 44),
        ("TLS_AES_128_CCM_SHA256", 53, 40, 12, 28),
        ("TLS_CHACHA20_POLY1305_SHA256", 54, 56, 16, None),
    ],
)
def test_layouts_match_kernel_offsets(
    name: str, cipher_type: int, size: int, key_off: int, salt_off: int | None
) -> None:
    suite = ktls.SUITES[name]
    key = bytes(range(1, suite.key_len + 1))
    iv = bytes(range(0xA0, 0xAC))
    info = ktls.pack_crypto_info(suite, key, iv, 0x0102030405060708)
    assert len(info) == size == suite.info_len
    assert struct.unpack("=HH", info[:4]) == (0x0304, cipher_type)
    assert info[key_off : key_off + suite.key_len] == key
    if salt_off is None:  # ChaCha20: the whole 12-byte IV, no salt
        assert info[4:16] == iv
    else:
        assert info[4:12] == iv[4:]
        assert info[salt_off : salt_off + 4] == iv[:4]
    assert info[-8:] == bytes.fromhex("0102030405060708")  # big-endian rec_seq
    back = unpack_crypto_info(info)
    assert (back.key, back.iv, back.seq) == (key, iv, 0x0102030405060708)


def test_unknown_suite_rejected() -> None:
    with pytest.raises(ktls.KtlsError, match="not supported"):
        ktls.suite_info("TLS_SM4_GCM_SM3")


def test_seq_out_of_range() -> None:
    suite = ktls.SUITES["TLS_AES_128_GCM_SHA256"]
    with pytest.raises(ktls.KtlsError):
        ktls.pack_crypto_info(suite, b"k" * 16, b"i" * 12, 1 << 64)


class _RecordingSocket:
    def __init__(self, fail_at: int | None = None, err: int = errno.ENOENT) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.fail_at, self.err = fail_at, err

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        if self.fail_at == len(self.calls):
            raise OSError(self.err, "boom")
        self.calls.append((level, option, value))


def test_install_order_ulp_tx_rx() -> None:
    sock = _RecordingSocket()
    ktls.install_ktls(sock, b"TX", b"RX")  # type: ignore[arg-type]
    assert sock.calls == [(6, 31, b"tls"), (282, 1, b"TX"), (282, 2, b"RX")]


@pytest.mark.parametrize(
    ("err", "fragment"),
    [
        (errno.EBADF, "socket fd no longer valid"),
        (errno.ENOTSOCK, "socket fd no longer valid"),
        (errno.ENOENT, "kernel does not support"),
        (errno.ENOPROTOOPT, "kernel does not support"),
        (errno.EINVAL, "kernel does not support"),
    ],
)
def test_install_errors_are_readable(err: int, fragment: str) -> None:
    sock = _RecordingSocket(fail_at=1, err=err)
    with pytest.raises(ktls.KtlsError, match=fragment) as info:
        ktls.install_ktls(sock, b"TX", b"RX")  # type: ignore[arg-type]
    assert "TLS_TX" in str(info.value)
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize("err", [errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE])
def test_a_peer_gone_before_ktls_is_a_premature_close(err: int) -> None:
    """The ULP needs an ESTABLISHED socket; a peer that closed first (nfsd's
    5 s cancel) is ETIMEDOUT, which the NFS client retries, not EIO."""
    sock = _RecordingSocket(fail_at=0, err=err)
    with pytest.raises(ktls.KtlsError) as info:
        ktls.install_ktls(sock, b"TX", b"RX")  # type: ignore[arg-type]
    assert info.value.errno == errno.ETIMEDOUT


def test_install_on_real_socket_reports_missing_ktls_or_succeeds() -> None:
    """On a kernel without the tls module the ULP step fails with a clear message;
    on one with it, a connected loopback socket accepts the structs."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        suite = ktls.SUITES["TLS_AES_128_GCM_SHA256"]
        info = ktls.crypto_info_from_secret(RFC8448_SERVER_AP_SECRET, suite, 0)
        try:
            ktls.install_ktls(client, info, info)
        except ktls.KtlsError as err:
            assert "TCP_ULP" in str(err) or "TLS_" in str(err)
    finally:
        for s in (client, server, listener):
            s.close()


def test_plaintext_alert_bytes() -> None:
    assert ktls.plaintext_alert(49) == bytes.fromhex("15030300020231")
