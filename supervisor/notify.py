"""sd_notify(3) for the supervisor: READY, RELOADING, STATUS, WATCHDOG, STOPPING.

The transport is the `sdnotify` package (`SystemdNotifier.notify`); this
module keeps only what it does not do: the watchdog schedule (every
$WATCHDOG_USEC / 2, only if $WATCHDOG_PID is ours), the STATUS rate limit,
MONOTONIC_USEC with RELOADING=1, and STOPPING=1 exactly once.

sdnotify swallows every error unless `debug=True`, and connects once, when it
is constructed.  So it is built with `debug=True` and every call goes through
`_deliver`, which logs the first failure of a run (and the recovery), and
drops a failed transport so that the next message reconnects: a daemon
started before systemd's socket is reachable is not silenced for good.  Its
socket is made non-blocking: a full notify queue in systemd must not stall
the main loop (the message is then lost and logged, as sd_notify(3) would).

$NOTIFY_SOCKET is read from the process environment, where sdnotify reads it;
without it every method is a no-op.  The notifier owns the transport's socket;
`close` releases it, and forked workers close it through `close`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify

from tlshd.log import log

STATUS_MIN_INTERVAL_S = 1.0
# What sdnotify may raise with debug=True: socket errors, a NOTIFY_SOCKET that
# is not a valid address (ValueError/TypeError), text not in Latin-1.
_TRANSPORT_ERRORS = (OSError, ValueError, TypeError, UnicodeError)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """`environ` (default: the process environment) supplies $WATCHDOG_USEC and
        $WATCHDOG_PID, and whether $NOTIFY_SOCKET is set at all; the address
        itself is the process's $NOTIFY_SOCKET, which sdnotify reads."""
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address is not None and self.address != os.environ.get("NOTIFY_SOCKET"):
            raise ValueError("sdnotify sends to the process's own $NOTIFY_SOCKET")
        self._transport: sdnotify.SystemdNotifier | None = None
        self._failed = False
        self._delivered_once = False
        self._stopping_sent = False
        self.watchdog_interval_s = self._watchdog_interval(env)
        self._next_watchdog = 0.0
        self._status_text = ""
        self._status_sent = ""
        self._status_sent_at = -STATUS_MIN_INTERVAL_S

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
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
        return self.address is not None

    def fileno(self) -> int:
        sock = self._transport.socket if self._transport is not None else None
        return sock.fileno() if sock is not None else -1

    def send(self, text: str) -> bool:
        """One notification through sdnotify; False (and logged) if it failed."""
        if self.address is None:
            return False
        try:
            if self._transport is None:
                self._transport = sdnotify.SystemdNotifier(debug=True)  # connects
                self._transport.socket.setblocking(False)
            self._transport.notify(text)
        except _TRANSPORT_ERRORS as err:
            if not self._failed:
                log.warning("sd_notify to %s failed: %s", self.address, err)
            self._failed = True
            self.close()  # reconnect on the next message
            return False
        if self._failed:
            log.info("sd_notify to %s works again", self.address)
        elif not self._delivered_once:
            # Says which transport carried the first message (the lab checks it).
            log.info(
                "sd_notify: %s sent to %s through sdnotify %s",
                text.split("\n", 1)[0],
                self.address,
                sdnotify.__version__,
            )
        self._failed = False
        self._delivered_once = True
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
        if self._transport is not None:
            if self._transport.socket is not None:
                self._transport.socket.close()
            self._transport = None
