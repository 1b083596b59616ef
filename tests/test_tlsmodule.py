"""supervisor/tlsmodule.py: is tls.ko there."""

from __future__ import annotations

from tlshd.supervisor.tlsmodule import load_ktls_cipher, tls_module_present


def test_tls_module_markers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert not tls_module_present((str(tmp_path / "missing"),))
    assert tls_module_present((str(tmp_path),))


class RecordingSocket:
    def __init__(self, error: OSError | None = None) -> None:
        self.options: list[tuple[int, int, bytes]] = []
        self.error = error

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.options.append((level, option, value))


def test_load_ktls_cipher_installs_an_aes_gcm_256_tx_key() -> None:
    """The struct is the one the workers install (workers/ktls.py), with a zero key."""
    import contextlib

    from tlshd.workers.ktls import IV_LEN, pack_crypto_info, suite_info

    from tlshd.uapi import SOL_TLS, TLS_TX

    sock = RecordingSocket()
    assert load_ktls_cipher(lambda: contextlib.nullcontext(sock))  # type: ignore[arg-type,return-value]
    suite = suite_info("TLS_AES_256_GCM_SHA384")
    expected = pack_crypto_info(suite, bytes(suite.key_len), bytes(IV_LEN), 0)
    assert sock.options == [(SOL_TLS, TLS_TX, expected)]
    assert len(expected) == 56  # sizeof(struct tls12_crypto_info_aes_gcm_256)


def test_load_ktls_cipher_failure_is_not_fatal() -> None:
    import contextlib
    import errno

    sock = RecordingSocket(OSError(errno.ENOPROTOOPT, "no kTLS"))
    assert not load_ktls_cipher(lambda: contextlib.nullcontext(sock))  # type: ignore[arg-type,return-value]
