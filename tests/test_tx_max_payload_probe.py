"""The TLS_TX_MAX_PAYLOAD_LEN capability probe (issue 12, item 3), its logic.

The probe against real kernels (ENOPROTOOPT on 6.12, 16384 on 7.3) runs in
the lab: tests/lab/test_kernel_probe.py::test_tls_tx_max_payload_len_from_6_19.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Iterator

import pytest
from tlshd.supervisor.tlsmodule import tx_max_payload_len_supported

from tlshd.uapi import SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN


class FakeTlsSocket:
    def __init__(self, answer: bytes | OSError) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.asked.append((level, option, buflen))
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


def opener(sock: FakeTlsSocket):  # type: ignore[no-untyped-def]
    @contextlib.contextmanager
    def open_tls_socket() -> Iterator[FakeTlsSocket]:
        yield sock

    return open_tls_socket


def test_supported_when_the_kernel_answers_the_option() -> None:
    sock = FakeTlsSocket(struct.pack("=H", 16384))
    assert tx_max_payload_len_supported(opener(sock)) is True
    assert sock.asked == [(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)]


@pytest.mark.parametrize("err", [errno.ENOPROTOOPT, errno.EINVAL, errno.EPERM])
def test_not_supported_when_the_option_is_refused(err: int) -> None:
    sock = FakeTlsSocket(OSError(err, "refused"))
    assert tx_max_payload_len_supported(opener(sock)) is False


def test_not_supported_without_ktls() -> None:
    @contextlib.contextmanager
    def no_ulp() -> Iterator[FakeTlsSocket]:
        raise OSError(errno.ENOENT, "No such file or directory")  # TCP_ULP "tls" unknown
        yield FakeTlsSocket(b"")  # pragma: no cover

    assert tx_max_payload_len_supported(no_ulp) is False
