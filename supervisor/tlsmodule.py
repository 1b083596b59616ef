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
import os
import shutil
import socket
import subprocess

from tlshd.log import log
from tlshd.uapi import SOL_TCP, TCP_ULP

TLS_MODULE_MARKERS = ("/sys/module/tls", "/proc/net/tls_stat")
MODPROBE_TIMEOUT_S = 10


def tls_module_present(markers: tuple[str, ...] = TLS_MODULE_MARKERS) -> bool:
    return any(os.path.exists(path) for path in markers)


def attach_tls_ulp_once() -> bool:
    """True if TCP_ULP "tls" could be set on a loopback connection."""
    try:
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = stack.enter_context(socket.create_connection(listener.getsockname(), 2))
            server, _ = listener.accept()
            stack.enter_context(server)
            client.setsockopt(SOL_TCP, TCP_ULP, b"tls")
            return True
    except OSError as err:
        log.debug("TCP_ULP tls on a loopback socket: %s", err)
        return False


def run_modprobe() -> bool:
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
    """Load tls.ko if needed; log an ERROR (once) if kTLS is unavailable."""
    if tls_module_present() or attach_tls_ulp_once():
        return True
    if run_modprobe() and (tls_module_present() or attach_tls_ulp_once()):
        return True
    log.error(
        "kernel TLS is not available (CONFIG_TLS / tls.ko missing): "
        "every handshake will fail with EIO until it is"
    )
    return False
