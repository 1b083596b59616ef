"""The worker table: spawn, signal, reap.  Policy lives in the arbiter.

Each worker is a forked child with one end of an AF_UNIX SOCK_SEQPACKET
socketpair.  The supervisor's end is non-blocking and owned by the
`WorkerHandle` until the worker is found dead (EOF on the channel, or
reaped); the child's end is closed in the parent right after fork.

A `Generation` is one loaded (config, credentials) pair; a worker serves only
the generation it was forked from, because it got the credentials through
fork's memory copy and cannot read the root-only key files itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from tlshd.config import Config
from tlshd.credentials import Credentials
from tlshd.log import log

from .queue import Request

# Reserved worker exit status: the worker could not start (e.g. the
# unprivileged user does not exist).  Respawning would only loop.
WORKER_BOOT_ERROR = 3


@dataclass(frozen=True)
class Generation:
    number: int
    config: Config
    credentials: Credentials
    keyservice: Any  # tlshd.supervisor.keyservice.SupervisorKeyService


class WorkerState(StrEnum):
    BOOTING = "booting"  # forked, has not said `ready`
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # told to exit (SIGTERM); gets no more work
    DEAD = "dead"  # channel closed or killed; waiting to be reaped


class ChildWorker(Protocol):
    def init_process(self) -> None:
        """Runs in the child after fork; never returns."""
        ...


@dataclass(eq=False)
class WorkerHandle:
    pid: int
    sock: socket.socket | None
    generation: int
    spawned_at: float
    state: WorkerState = WorkerState.BOOTING
    request: Request | None = None
    handshakes: int = 0
    phase: str = ""
    idle_since: float = 0.0
    ready_at: float | None = None  # when it said `ready`; None: never booted
    retire_sent_at: float | None = None
    killed: bool = False
    rss_bytes: int = 0
    exit_status: int | None = None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def close_channel(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class WorkerPool:
    def __init__(self) -> None:
        self.workers: dict[int, WorkerHandle] = {}

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self.workers.values()))

    def __len__(self) -> int:
        return len(self.workers)

    def spawn(
        self,
        generation: int,
        build_worker: Callable[[socket.socket], ChildWorker],
        before_fork: Callable[[], None] = lambda: None,
    ) -> WorkerHandle:
        """Fork one worker.  `build_worker` runs in the parent before the fork
        and must not change the process; its `init_process` runs in the child."""
        parent_end, child_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            worker = build_worker(child_end)
            before_fork()
            pid = os.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child
            _run_child(worker, parent_end)
        child_end.close()
        parent_end.setblocking(False)
        handle = WorkerHandle(
            pid=pid, sock=parent_end, generation=generation, spawned_at=time.monotonic()
        )
        self.workers[pid] = handle
        log.debug("spawned worker %d (generation %d)", pid, generation)
        return handle

    def count(self, *states: WorkerState, generation: int | None = None) -> int:
        return sum(
            1
            for w in self.workers.values()
            if (not states or w.state in states)
            and (generation is None or w.generation == generation)
        )

    def in_state(self, *states: WorkerState) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state in states]

    def signal(self, handle: WorkerHandle, signum: int) -> None:
        """Send a signal; a worker that is already gone is not an error."""
        if handle.exit_status is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signum)
        if signum == signal.SIGKILL:
            handle.killed = True

    def reap(self) -> list[WorkerHandle]:
        """waitpid(WNOHANG) each known worker; the reaped ones leave the table
        (their channel, if still open, is the caller's to unregister and close).

        Only our own pids are waited for, so a library's child processes are
        left to whoever started them."""
        reaped = []
        for handle in list(self.workers.values()):
            try:
                pid, status = os.waitpid(handle.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = handle.pid, 0
            if pid == 0:
                continue
            handle.exit_status = status
            del self.workers[handle.pid]
            reaped.append(handle)
        return reaped

    def close_channels_in_child(self) -> None:
        for handle in self.workers.values():
            handle.close_channel()


def _run_child(worker: ChildWorker, parent_end: socket.socket) -> None:  # pragma: no cover
    """The child's whole life: never returns into the parent's loop."""
    code = WORKER_BOOT_ERROR
    try:
        parent_end.close()
        worker.init_process()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("worker %d crashed", os.getpid())
        code = 1
    finally:
        os._exit(code)


def describe_exit(status: int) -> tuple[str, int]:
    """A sentence for a wait status, and the log level it deserves."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = (
            signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else signum
        )
        if signum == signal.SIGKILL:
            return f"was killed by {name} (perhaps by the OOM killer)", logging.ERROR
        if signum == signal.SIGTERM:
            return f"was terminated by {name}", logging.INFO
        return f"was killed by signal {name}", logging.WARNING
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code == 0:
        return "exited", logging.DEBUG
    if code == WORKER_BOOT_ERROR:
        return "could not start (boot error)", logging.ERROR
    return f"exited with status {code}", logging.WARNING


__all__ = [
    "WORKER_BOOT_ERROR",
    "Generation",
    "WorkerHandle",
    "WorkerPool",
    "WorkerState",
    "describe_exit",
]
