"""sd_notify(3) for the supervisor: READY, RELOADING, STATUS, WATCHDOG, STOPPING.

An in-house sender rather than the `sdnotify` package: that package connects
once at construction and hides every error behind a bare `except`, so a
daemon started before systemd's socket exists would stay silent forever.
Here each message is one sendto() on an unconnected AF_UNIX SOCK_DGRAM
socket; a failure is logged once and never stops the daemon.  An address
starting with '@' is an abstract socket (a leading NUL byte).

Without $NOTIFY_SOCKET every method is a no-op.  The notifier owns its socket;
`close` releases it, and forked workers close it through `fileno()`.
"""

from __future__ import annotations

import os
import socket
import time

from tlshd.log import log

STATUS_MIN_INTERVAL_S = 1.0


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        self._failed = False
        self._stopping_sent = False
        self.watchdog_interval_s = self._watchdog_interval(env)
        self._next_watchdog = 0.0
        self._status_text = ""
        self._status_sent = ""
        self._status_sent_at = -STATUS_MIN_INTERVAL_S

    @staticmethod
    def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
        """Half of $WATCHDOG_USEC, if the watchdog is meant for this process."""
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        watchdog_pid = env.get("WATCHDOG_PID")
        if usec <= 0 or (watchdog_pid and watchdog_pid != str(os.getpid())):
            return None
        return usec / 2_000_000

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def send(self, text: str) -> bool:
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self._address)
        except OSError as err:
            if not self._failed:
                log.warning("sd_notify to %s failed: %s", self._address, err)
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        self.send(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self) -> None:
        """Sent once, whichever way the daemon ends."""
        if not self._stopping_sent:
            self._stopping_sent = self.send("STOPPING=1") or not self.enabled

    def set_status(self, text: str) -> None:
        """Remember a new STATUS= line; `tick` sends it, rate-limited."""
        self._status_text = text

    def tick(self, now: float) -> None:
        """Called from the main loop: pending STATUS and the watchdog."""
        if not self.enabled:
            return
        if (
            self._status_text != self._status_sent
            and now - self._status_sent_at >= STATUS_MIN_INTERVAL_S
        ):
            self.send(f"STATUS={self._status_text}")
            self._status_sent = self._status_text
            self._status_sent_at = now
        if self.watchdog_interval_s is not None and now >= self._next_watchdog:
            self.send("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog_interval_s

    def next_wakeup(self, now: float) -> float:
        """Seconds until `tick` has something to do (for the selector timeout)."""
        waits = [60.0]
        if self.enabled and self._status_text != self._status_sent:
            waits.append(self._status_sent_at + STATUS_MIN_INTERVAL_S - now)
        if self.enabled and self.watchdog_interval_s is not None:
            waits.append(self._next_watchdog - now)
        return max(0.0, min(waits))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
