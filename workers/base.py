"""The worker process: built before fork, initialised after it, one handshake at a time.

`Worker.__init__` runs in the supervisor before the fork and changes nothing
in the process.  `init_process` runs in the child and, in order:
  1. resets the supervisor's signal handling (its wake-up fd is not ours);
  2. closes every inherited descriptor except its own channel, stdio and the
     log socket: the supervisor's netlink sockets, status socket, selector,
     other workers' channels and, above all, the accepted sockets of other
     requests that happened to be open at fork time;
  3. installs its own handlers (SIGTERM only sets a flag; INT/HUP/USR1 are
     the supervisor's business and are ignored);
  4. sets the process title and drops privileges (workers/privileges.py);
  5. sends `ready` and serves `handshake` messages until told to stop.

Exit: EOF on the channel (the supervisor is gone or retired us), a changed
parent pid, or SIGTERM while idle (a handshake in progress is finished
first).  A worker that cannot drop privileges exits with WORKER_BOOT_ERROR
so the supervisor stops instead of respawning it forever.
"""

from __future__ import annotations

import contextlib
import gc
import logging.handlers
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from tlshd import ipc
from tlshd.log import log
from tlshd.params import Engine
from tlshd.proctitle import set_title

from .handshake import HandshakeJob
from .privileges import PrivilegeError, drop_privileges
from .seccomp import install_worker_filter

WORKER_BOOT_ERROR = 3  # same value as tlshd.supervisor.pool.WORKER_BOOT_ERROR
PARENT_CHECK_INTERVAL_MS = 1000
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class Worker:
    def __init__(
        self,
        channel: socket.socket,
        generation: Any,
        engine: Engine,
        close_inherited: Callable[[], None] = lambda: None,
        install_ktls: Callable[[socket.socket, bytes, bytes], None] | None = None,
    ) -> None:
        """Runs before fork: only records what the child will need."""
        self.channel = channel
        self.generation = generation
        self.engine = engine
        self.close_inherited = close_inherited
        self.install_ktls = install_ktls
        self.ppid = os.getpid()  # the supervisor, seen from the child
        self.booted = False
        self.stop_requested = False
        self.handshakes = 0
        self._wake_r = self._wake_w = -1

    # --- after fork ---------------------------------------------------------

    def init_process(self) -> None:
        """Runs in the child; ends the process (sys.exit) and never returns."""
        self.reset_signals()
        self.close_inherited_fds()
        self.init_signals()
        set_title("tlshd: worker idle")
        # Back to normal priority from the supervisor's (raising the nice
        # value needs no privilege).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, max(0, os.getpriority(os.PRIO_PROCESS, 0)))
        config = self.generation.config
        try:
            drop_privileges(config.worker.user, config.worker.drop_privileges)
            install_worker_filter()  # before any peer data: workers/seccomp.py
        except (PrivilegeError, OSError) as err:
            log.error("worker %d cannot drop privileges: %s", os.getpid(), err)
            sys.exit(WORKER_BOOT_ERROR)
        self.booted = True
        ipc.send_message(
            self.channel,
            {"op": "ready", "pid": os.getpid(), "generation": self.generation.number},
        )
        self.run()
        sys.exit(0)

    def reset_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGCHLD, *IGNORED_SIGNALS):
            signal.signal(signum, signal.SIG_DFL)

    def close_inherited_fds(self) -> None:
        # Move every inherited object out of the collector's reach: garbage
        # from before the fork is never finalized here, so it cannot close a
        # reused fd number later; and no collection walks (and so copies, page
        # by page) the supervisor's heap.  A gc.collect() here cost 30x the
        # boot time and ~9 MiB of private memory per worker.
        gc.freeze()
        self.close_inherited()
        keep = {0, 1, 2, self.channel.fileno(), *_log_fds()}
        for fd in _open_fds():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def init_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._handle_term)
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def _handle_term(self, _signum: int, _frame: FrameType | None) -> None:
        """Signal context: set the flag only; the loop acts on it."""
        self.stop_requested = True

    # --- the loop -----------------------------------------------------------

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.channel, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self.stop_requested:
            if os.getppid() != self.ppid:
                log.info("worker %d: supervisor is gone; exiting", os.getpid())
                return
            events = poller.poll(PARENT_CHECK_INTERVAL_MS)
            self._drain_wakeups()
            if any(fd == self.channel.fileno() for fd, _ in events) and not self.serve_one():
                return

    def serve_one(self) -> bool:
        """Handle one message from the supervisor; False means exit."""
        try:
            message, fds = ipc.recv_message(self.channel, ipc.SUPERVISOR_OPS)
        except (ipc.IpcError, OSError) as err:
            log.error("worker %d: bad message from the supervisor: %s", os.getpid(), err)
            return False
        if message is None:
            return False  # EOF: the supervisor closed our channel
        if message["op"] != "handshake" or len(fds) != 1:
            log.error("worker %d: unexpected %r with %d fds", os.getpid(), message["op"], len(fds))
            for fd in fds:
                os.close(fd)
            return False
        job = HandshakeJob(
            self.channel, message, fds[0], self.generation, self.engine, self.install_ktls
        )
        job.run()
        self.handshakes += 1
        set_title("tlshd: worker idle")
        return True

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, os.sysconf("SC_OPEN_MAX")))


def _log_fds() -> list[int]:
    """Descriptors the `tlshd` logger writes to (syslog socket, stderr)."""
    fds = []
    for handler in logging.getLogger("tlshd").handlers:
        target: Any = None
        if isinstance(handler, logging.handlers.SysLogHandler):
            target = handler.socket
        elif isinstance(handler, logging.StreamHandler):
            target = handler.stream
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fds.append(target.fileno())
    return fds
