"""Reaping: the one loop both the supervisor and the zygote use."""

from __future__ import annotations

import os
from collections.abc import Iterator


def reap_exited() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, without blocking:
    waitpid(-1, WNOHANG) until no exited child is left (or there are none)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status
