"""Signals as events in the supervisor's selector.

Handlers only record the signal number; `signal.set_wakeup_fd` makes the C
level handler write a byte to a non-blocking pipe that sits in the same
selector as the netlink socket, so a signal wakes the loop even while it
waits on netlink.  All work happens in the loop (`SignalQueue.drain`).

Ownership: `SignalQueue` owns both pipe ends; `close` restores the previous
handlers and the previous wake-up fd.  Forked workers call `close_in_child`,
which only closes the pipe (they install their own handlers).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

# What signal.signal() takes and returns (typeshed calls it signal._HANDLER).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# Keyed by int: the numbers come back from the wake-up pipe as plain ints.
SIGNAL_NAMES: dict[int, str] = {
    signal.SIGHUP: "hup",
    signal.SIGUSR1: "usr1",
    signal.SIGINT: "int",
    signal.SIGTERM: "term",
    signal.SIGCHLD: "chld",
}
HANDLED_SIGNALS = tuple(SIGNAL_NAMES)


class SignalQueue:
    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup_fd: int | None = None
        self._old_handlers: dict[int, SignalHandler] = {}

    def install(self) -> None:
        """Install recording handlers; must run in the main thread."""
        self._old_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        """Runs in signal context: record only, no logging, no I/O."""
        self._pending.append(signum)

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> list[int]:
        """Empty the wake-up pipe and return the recorded signals, in order,
        without repeats of the same signal in one batch."""
        while True:
            try:
                if not os.read(self._read_fd, 4096):
                    break
            except BlockingIOError:
                break
        signals: list[int] = []
        while self._pending:
            signum = self._pending.popleft()
            if signum not in signals:
                signals.append(signum)
        return signals

    def close(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        self.close_in_child()

    def close_in_child(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1
