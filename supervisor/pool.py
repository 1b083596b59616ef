"""Zygotes and single-use workers, as the supervisor sees them.  Policy
(when to fork, whom to kill) lives in the arbiter and the broker.

Process tree::

    supervisor (root, child subreaper)
      └─ zygote, one per live generation (unprivileged, warm TLS engine)
           └─ single-use workers: one request each, then exit

The supervisor forks only zygotes (at start, on reload, to replace a dead
one).  A worker is asked of the zygote with `fork` plus one end of a fresh
socketpair (workers/zygote.py); the supervisor keeps the other end, so it
talks to each worker directly and the zygote never sees a request.

Knowing that a worker died.  The supervisor cannot waitpid() a grandchild, so:
  * EOF on the worker's channel is the death signal that matters (the
    worker holds the only other end): its request gets DONE(EIO) at once;
  * the pidfd the zygote sends with `forked` names exactly that process (it
    was opened before the zygote could reap it), so signals never hit a
    reused pid, and polling it tells whether the process is gone;
  * the zygote's `exited` report gives the wait status, for the log and
    for the boot-failure rule;
  * if the zygote dies, its workers are reparented to the supervisor (a
    child subreaper) and reaped there with waitpid(-1).

A `Generation` is one loaded (config, credentials) pair; a worker serves only
the generation of the zygote it was forked from.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from tlshd.workers import WORKER_BOOT_ERROR
from tlshd.workers.zygote import ZYGOTE_OPS

from tlshd import ipc
from tlshd.children import reap_exited
from tlshd.config import Config
from tlshd.log import log
from tlshd.pemfiles import CredentialFiles

from .queue import Request

if TYPE_CHECKING:  # cryptography: never imported by the supervisor at start
    from tlshd.credentials import Credentials

PR_SET_CHILD_SUBREAPER = 36
FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


@dataclass(frozen=True)
class Generation:
    number: int
    config: Config
    # Parsed on reload by the supervisor; None at start, where the zygote
    # parses `files` (tlshd/pemfiles.py says why) and keeps the result.
    credentials: Credentials | None
    keyservice: Any  # tlshd.supervisor.keyservice.SupervisorKeyService
    files: CredentialFiles | None = None


class WorkerState(StrEnum):
    STARTING = "starting"  # asked of the zygote; has not said `ready`
    IDLE = "idle"  # ready and its pid known, waiting for its one request: the reserve
    BUSY = "busy"  # has its request
    EXITING = "exiting"  # result reported, or let go: exits by itself
    DEAD = "dead"  # channel closed


LIVE_STATES = frozenset({WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY})
SPARE_STATES = frozenset({WorkerState.STARTING, WorkerState.IDLE})


@dataclass(frozen=True)
class Census:
    """Workers counted in one walk (`WorkerPool.census`)."""

    live: int  # starting, idle or busy, of any generation
    spare: int  # of the generation asked about: may be handed a request
    spare_own: int  # of those, with a process of their own (not a host's thread)
    idle: int  # of that generation: ready, waiting for their one request
    unforked: int  # asked of a zygote, no pid reported yet


class ChildProcess(Protocol):
    def init_process(self) -> None:
        """Runs in the child after fork; never returns."""
        ...


@dataclass(eq=False)
class ZygoteHandle:
    pid: int
    sock: socket.socket | None
    generation: int
    spawned_at: float
    ready_at: float | None = None
    retiring: bool = False  # channel closed on purpose: it exits once idle
    exit_status: int | None = None

    def close_channel(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass(eq=False)
class WorkerHandle:
    """One single-use worker; its state changes only through these methods."""

    token: int
    sock: socket.socket | None
    generation: int
    zygote_pid: int
    requested_at: float
    pid: int | None = None
    pidfd: int | None = None
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    request: Request | None = None
    phase: str = ""
    killed: bool = False
    claimed_pid: int | None = None  # the pid its `ready` named, before `forked` came
    exit_status: int | None = None
    reaped: bool = False  # exit status known, or the process is gone for sure
    # A thread of a worker host ([pool] handshakes_per_worker > 1,
    # workers/host.py): its pid is the host's, which outlives it.
    shared: bool = False

    @property
    def spare(self) -> bool:
        """Alive, of no request yet: may be handed one."""
        return self.state in SPARE_STATES and self.sock is not None

    def forked(self, pid: int, pidfd: int | None, zygote_pid: int | None = None) -> None:
        """The zygote reported the pid (and a pidfd) of this worker: its own,
        or its worker host's if `shared`."""
        if pidfd is None and zygote_pid is not None:
            pidfd = _pidfd_of_child(pid, zygote_pid)
        self.pid, self.pidfd = pid, pidfd
        if self.claimed_pid is not None and self.claimed_pid != pid:
            self.kill()
            raise ipc.IpcError(f"'ready' named pid {self.claimed_pid}, the zygote forked {pid}")
        if self.killed:
            self.kill()  # killed before its pid was known
        elif self.ready_at is not None and self.state is WorkerState.STARTING:
            self.state = WorkerState.IDLE

    def became_ready(self, pid: int, generation: int, now: float) -> None:
        if self.ready_at is not None or self.state not in (
            WorkerState.STARTING,
            WorkerState.BUSY,  # handed its request before `ready` arrived
        ):
            raise ipc.IpcError(f"'ready' from a worker in state {self.state.value}")
        if generation != self.generation:
            raise ipc.IpcError("'ready' names another generation")
        if self.pid is not None and pid != self.pid:
            raise ipc.IpcError("'ready' names another pid")
        self.claimed_pid = pid
        self.ready_at = now
        if self.state is WorkerState.STARTING and self.pid is not None:
            self.state = WorkerState.IDLE  # idle: ready, and its pid known from the zygote

    def assign(self, request: Request) -> None:
        assert self.spare and self.request is None
        self.request = request
        self.state = WorkerState.BUSY
        self.phase = "handoff"

    def release_request(self) -> Request | None:
        """Detach the request (its result came, or it is being failed)."""
        request, self.request = self.request, None
        if request is not None:
            # For its completion line; before `forked` arrives, the pid the
            # worker's own `ready` named (only ever logged).
            request.worker_pid = self.pid or self.claimed_pid
        self.phase = ""
        if self.state is WorkerState.BUSY:
            self.state = WorkerState.EXITING
        return request

    def kill(self) -> None:
        """SIGKILL through the pidfd (never a reused pid).  Without a pidfd
        yet, the kill happens when `forked` arrives."""
        self.killed = True
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def let_go(self) -> None:
        """Close the channel of a spare worker: it reads EOF and exits 0."""
        self.close_channel()
        self.state = WorkerState.EXITING

    def close_channel(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.state is not WorkerState.EXITING:
            self.state = WorkerState.DEAD

    def process_gone(self) -> bool:
        """True once the process has exited (pidfd readable) or is reaped."""
        if self.reaped:
            return True
        if self.pidfd is None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def forget(self) -> None:
        self.close_channel()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class WorkerPool:
    """The tables of zygotes and workers, and the system calls on them."""

    def __init__(self) -> None:
        self.zygotes: dict[int, ZygoteHandle] = {}
        self.workers: dict[int, WorkerHandle] = {}  # by token
        self._tokens = itertools.count(1)

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self.workers.values()))

    def __len__(self) -> int:
        return len(self.workers)

    # --- zygotes ------------------------------------------------------------------

    def spawn_zygote(
        self, generation: int, build: Callable[[socket.socket], ChildProcess]
    ) -> ZygoteHandle:
        """Fork a zygote.  `build` runs in the parent before the fork and must
        not change the process; its `init_process` runs in the child.
        OSError (EMFILE, EAGAIN) goes to the caller, who retries later."""
        parent_end, child_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            child = build(child_end)
            pid = os.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child
            _run_child(child, parent_end)
        child_end.close()
        parent_end.setblocking(False)
        zygote = ZygoteHandle(pid, parent_end, generation, time.monotonic())
        self.zygotes[pid] = zygote
        log.debug("spawned zygote %d (generation %d)", pid, generation)
        return zygote

    def live_zygote(self, generation: int) -> ZygoteHandle | None:
        for zygote in self.zygotes.values():
            if zygote.generation == generation and zygote.sock is not None:
                return zygote
        return None

    # --- workers ------------------------------------------------------------------

    def request_worker(self, zygote: ZygoteHandle, shared: bool = False) -> WorkerHandle | None:
        """Ask `zygote` for one worker; None if no fd is left or its channel
        is full (both retried on a later pass).  `shared`: a thread of a
        worker host (workers/host.py) instead of a process of its own."""
        assert zygote.sock is not None
        try:
            ours, theirs = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
            )
        except OSError as err:
            log.warning("no socketpair for a new worker's channel: %s", err.strerror)
            return None
        token = next(self._tokens)
        try:
            message: dict[str, Any] = {"op": "fork", "token": token}
            if shared:
                message["shared"] = True
            ipc.send_message(zygote.sock, message, (theirs.fileno(),))
        except OSError:  # full (retried later) or broken (EOF comes next)
            ours.close()
            return None
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = WorkerHandle(
            token, ours, zygote.generation, zygote.pid, time.monotonic(), shared=shared
        )
        self.workers[token] = worker
        return worker

    @staticmethod
    def receive_report(zygote: ZygoteHandle) -> tuple[dict[str, Any] | None, list[int]]:
        """One message from a zygote; (None, []) at EOF.  Like ipc.recv_message,
        except that a pidfd lost to descriptor exhaustion (MSG_CTRUNC) is not
        junk: the message counts, without its pidfd."""
        assert zygote.sock is not None
        data, fds, flags, _addr = socket.recv_fds(zygote.sock, 4096, 1)
        if not data and not fds:
            return None, []
        if flags & socket.MSG_TRUNC:
            for fd in fds:
                os.close(fd)
            raise ipc.IpcError("a zygote's message was truncated")
        if flags & socket.MSG_CTRUNC:
            log.warning("zygote %d: a pidfd was lost (no descriptor free)", zygote.pid)
        try:
            return ipc.decode(data, ZYGOTE_OPS), fds
        except ipc.IpcError:
            for fd in fds:
                os.close(fd)
            raise

    def by_pid(self, pid: int) -> list[WorkerHandle]:
        """The worker with `pid`, or every thread of the worker host with it."""
        return [w for w in self.workers.values() if w.pid == pid]

    def of_zygote(self, zygote: ZygoteHandle) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.zygote_pid == zygote.pid]

    def spare(self, generation: int) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.spare and w.generation == generation]

    def census(self, generation: int) -> Census:
        """The counts the loop needs on every pass, in one walk over the
        workers instead of one per count (a burst holds over a hundred)."""
        live = spare = spare_own = idle = unforked = 0
        for w in self.workers.values():
            state = w.state
            if state in LIVE_STATES:
                live += 1
            if w.sock is not None and w.pid is None:
                unforked += 1
            if w.generation == generation and w.spare:
                spare += 1
                spare_own += not w.shared
            if state is WorkerState.IDLE and w.generation == generation:
                idle += 1
        return Census(live=live, spare=spare, spare_own=spare_own, idle=idle, unforked=unforked)

    def busy(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.request is not None]

    def forget_finished(self) -> list[WorkerHandle]:
        """Drop workers whose channel is closed and whose process is gone.

        A live zygote reports every exit (`reaped`); only the workers of a
        retired or dead zygote need their pidfd polled (a system call each,
        costly under emulation, so not for every worker on every pass)."""
        gone = [
            w
            for w in self.workers.values()
            if w.sock is None
            and (w.reaped or w.shared or (not self._zygote_live(w) and w.process_gone()))
        ]
        for worker in gone:
            worker.forget()
            del self.workers[worker.token]
        return gone

    def _zygote_live(self, worker: WorkerHandle) -> bool:
        zygote = self.zygotes.get(worker.zygote_pid)
        return zygote is not None and zygote.sock is not None

    # --- reaping ------------------------------------------------------------------

    def reap_children(self) -> list[tuple[int, int]]:
        """waitpid(-1, WNOHANG) until none is left: zygotes, and workers
        orphaned by a dead zygote.  The supervisor starts no other children
        while the loop runs (tls.ko's modprobe runs before it)."""
        return list(reap_exited())


def _pidfd_of_child(pid: int, parent: int) -> int | None:
    """A pidfd for `pid` if it is (still) a child of `parent`: the zygote
    could not send one.  Checked after opening, so a reused pid is refused."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != parent:
        os.close(pidfd)
        return None
    return pidfd


def become_subreaper() -> bool:
    """Make orphaned workers (their zygote died) children of the supervisor."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except OSError:
        return False


def _run_child(child: ChildProcess, parent_end: socket.socket) -> None:  # pragma: no cover
    """The child's whole life: never returns into the parent's loop."""
    code = WORKER_BOOT_ERROR
    try:
        parent_end.close()
        child.init_process()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("zygote %d crashed", os.getpid())
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


def is_boot_error(status: int) -> bool:
    """Only this exit status of a process that never got ready halts the
    daemon: a death by signal (anyone running as the worker user can send
    one) says nothing about whether the code can start."""
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR


__all__ = [
    "WORKER_BOOT_ERROR",
    "Generation",
    "WorkerHandle",
    "WorkerPool",
    "WorkerState",
    "ZygoteHandle",
    "become_subreaper",
    "describe_exit",
    "is_boot_error",
]
