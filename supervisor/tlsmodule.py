"""Make sure the kernel's `tls` module is loaded before workers start.

setsockopt(TCP_ULP, "tls") autoloads tls.ko (module alias tcp-ulp-tls) only
when the caller has CAP_NET_ADMIN, and workers have no capabilities at all.
So the supervisor, still privileged, triggers the load once at start: with the
same setsockopt on a throw-away ESTABLISHED loopback connection (the ULP can
only be attached to a connected socket), and with `modprobe tls` as a second
try.  Failure is logged, not fatal: the daemon still answers every request,
with DONE(EIO) from the kTLS step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator

from tlshd.workers import kernelcaps

from tlshd.log import log
from tlshd.uapi import (
    SOL_TCP,
    SOL_TLS,
    TCP_ULP,
    TLS_1_3_VERSION,
    TLS_TX,
    TLS_TX_MAX_PAYLOAD_LEN,
    TlsCipher,
)

TLS_MODULE_MARKERS = ("/sys/module/tls", "/proc/net/tls_stat")
MODPROBE_TIMEOUT_S = 10


def tls_module_present(markers: tuple[str, ...] = TLS_MODULE_MARKERS) -> bool:
    return any(os.path.exists(path) for path in markers)


def attach_tls_ulp_once() -> bool:
    """True if TCP_ULP "tls" could be set on a loopback connection."""
    try:
        with _loopback_tls_socket():
            return True
    except OSError as err:
        log.debug("TCP_ULP tls on a loopback socket: %s", err)
        return False


def run_modprobe() -> bool:
    # Imported here: the fallback is rare, and both cost start-up time.
    import shutil
    import subprocess

    modprobe = shutil.which("modprobe") or next(
        (p for p in ("/usr/sbin/modprobe", "/sbin/modprobe") if os.path.exists(p)), None
    )
    if modprobe is None:
        return False
    try:
        completed = subprocess.run(
            [modprobe, "tls"], capture_output=True, timeout=MODPROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("modprobe tls: %s", err)
        return False
    if completed.returncode != 0:
        log.debug("modprobe tls: %s", completed.stderr.decode(errors="replace").strip())
    return completed.returncode == 0


def ensure_tls_module() -> bool:
    """Load tls.ko if needed; log an ERROR (once) if kTLS is unavailable.

    Then tell the engine (tlshd.workers.kernelcaps) whether this kernel can cap TX
    records (RFC 8449), before any worker is forked: workers inherit the
    answer, and a worker forked from a process that never asked assumes no."""
    loaded = _load_tls_module()
    kernelcaps.record_caps_tx_records(loaded and tx_max_payload_len_supported())
    if loaded:
        load_ktls_cipher()
    return loaded


def probe_kernel_caps() -> None:
    """What ensure_tls_module records, for the first zygote, which is forked
    before the supervisor runs it (supervisor/firstzygote.py) and probes as
    root.  Setting the tls ULP loads tls.ko for a caller with CAP_NET_ADMIN
    (net/ipv4/tcp_ulp.c: __tcp_ulp_find_autoload); if only `modprobe` could
    load it, the answer is "no", the safe one, for this generation only."""
    kernelcaps.record_caps_tx_records(tx_max_payload_len_supported())


def _load_tls_module() -> bool:
    if tls_module_present() or attach_tls_ulp_once():
        return True
    if run_modprobe() and (tls_module_present() or attach_tls_ulp_once()):
        return True
    log.error(
        "kernel TLS is not available (CONFIG_TLS / tls.ko missing): "
        "every handshake will fail with EIO until it is"
    )
    return False


@contextlib.contextmanager
def _loopback_tls_socket() -> Iterator[socket.socket]:
    """A connected loopback TCP socket with the tls ULP attached (no keys yet)."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = stack.enter_context(socket.create_connection(listener.getsockname(), 2))
        server, _ = listener.accept()
        stack.enter_context(server)
        client.setsockopt(SOL_TCP, TCP_ULP, b"tls")
        yield client


def tx_max_payload_len_supported(
    tls_socket: Callable[[], contextlib.AbstractContextManager[socket.socket]] = (
        _loopback_tls_socket
    ),
) -> bool:
    """True if this kernel can cap the plaintext of each kTLS TX record.

    RFC 8449's record_size_limit obliges the sender to keep its records within
    the peer's limit, and with kTLS the kernel builds the records: the limit is
    only enforceable through TLS_TX_MAX_PAYLOAD_LEN (Linux 6.19), so the
    extension must not be negotiated where this is False.  Kernels before 6.19
    answer ENOPROTOOPT; upstream tlshd 1.4.0 treats that answer as fatal and fails
    every handshake with EIO there (Debian 13's 6.12, tests/lab/test_upstream_rsl.py).
    The option is read on a loopback socket with the tls ULP, which the kernel
    answers before any key is installed (16384 by default).  Needs tls.ko loaded
    (see ensure_tls_module); any failure means "not supported".
    """
    try:
        with tls_socket() as sock:
            value = sock.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)
    except OSError as err:
        if err.errno != errno.ENOPROTOOPT:
            log.debug("TLS_TX_MAX_PAYLOAD_LEN probe: %s", err)
        return False
    log.debug(
        "kernel TLS caps TX records (TLS_TX_MAX_PAYLOAD_LEN = %d)", *struct.unpack("=H", value)
    )
    return True


# struct tls12_crypto_info_aes_gcm_256 (<linux/tls.h>): version and cipher
# (host-endian u16 each), iv[8], key[32], salt[4], rec_seq[8].
AES_GCM_256_INFO = struct.pack("=HH", TLS_1_3_VERSION, int(TlsCipher.AES_GCM_256)) + bytes(52)


def load_ktls_cipher(
    tls_socket: Callable[[], contextlib.AbstractContextManager[socket.socket]] = (
        _loopback_tls_socket
    ),
) -> bool:
    """Have the kernel load the AES-GCM code kTLS uses now, not in the first handshakes.

    The first TLS_TX of a boot makes the crypto API look "gcm(aes)" up, and
    until some module provides it every lookup runs modprobe and waits for it
    (crypto/api.c: crypto_larval_lookup requests "crypto-gcm(aes)" and
    "crypto-gcm(aes)-all", then the gcm template's ghash, ctr, aes, cryptd ...).
    In the lab's first burst after boot a worker's TLS_TX waited behind those
    modprobes and the mounts' own (26 of rpc-auth-gss), past nfsd's 5 s: every
    server half of the first wave failed (benchmarks/README.md).  Installing a
    zero key on a throw-away loopback socket loads it all once, while the
    zygote imports OpenSSL on the other CPU; the instance stays registered when
    the socket is closed.  Both AES-GCM suites use the same "gcm(aes)"."""
    try:
        with tls_socket() as sock:
            sock.setsockopt(SOL_TLS, TLS_TX, AES_GCM_256_INFO)
    except OSError as err:
        log.debug("loading kTLS's AES-GCM on a loopback socket: %s", err)
        return False
    return True
