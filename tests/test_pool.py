"""supervisor/pool.py: zygote and worker handles, their state transitions,
fork requests, reaping, and the boot-failure rule."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time

import pytest
from tlshd.supervisor.pool import (
    WORKER_BOOT_ERROR,
    WorkerHandle,
    WorkerPool,
    WorkerState,
    ZygoteHandle,
    describe_exit,
    is_boot_error,
)
from tlshd.workers.zygote import FORK_OPS

from tlshd import ipc


def test_describe_exit() -> None:
    assert describe_exit(WORKER_BOOT_ERROR << 8)[0] == "could not start (boot error)"
    assert describe_exit(0)[1] == logging.DEBUG
    assert describe_exit(signal.SIGKILL)[1] == logging.ERROR
    assert describe_exit(signal.SIGTERM)[1] == logging.INFO
    assert describe_exit(1 << 8) == ("exited with status 1", logging.WARNING)


def test_only_the_boot_error_exit_status_is_a_boot_error() -> None:
    assert is_boot_error(WORKER_BOOT_ERROR << 8)
    # Killed by a signal (anyone running as the worker user can send one):
    # not a failure of the code to start.
    for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV):
        assert not is_boot_error(signum)
    assert not is_boot_error(1 << 8) and not is_boot_error(0)


def handle(**kwargs: object) -> WorkerHandle:
    values: dict[str, object] = {
        "token": 1,
        "sock": None,
        "generation": 1,
        "zygote_pid": 10,
        "requested_at": 0.0,
    }
    values.update(kwargs)
    return WorkerHandle(**values)  # type: ignore[arg-type]


def test_worker_is_idle_once_ready_and_forked_in_either_order() -> None:
    first_ready = handle()
    first_ready.became_ready(123, 1, 1.0)
    assert first_ready.state is WorkerState.STARTING  # its pid is not known yet
    first_ready.forked(123, None)
    assert first_ready.state is WorkerState.IDLE
    first_forked = handle()
    first_forked.forked(123, None)
    first_forked.became_ready(123, 1, 1.0)
    assert first_forked.state is WorkerState.IDLE


def test_ready_is_accepted_once_and_must_match() -> None:
    worker = handle()
    worker.forked(123, None)
    worker.became_ready(123, 1, 1.0)
    with pytest.raises(ipc.IpcError):
        worker.became_ready(123, 1, 2.0)  # twice
    with pytest.raises(ipc.IpcError):
        handle(pid=123).became_ready(124, 1, 1.0)  # another pid
    with pytest.raises(ipc.IpcError):
        handle().became_ready(123, 2, 1.0)  # another generation
    claimed = handle()
    claimed.became_ready(555, 1, 1.0)
    with pytest.raises(ipc.IpcError):
        claimed.forked(123, None)  # the zygote's pid wins over the worker's claim
    assert claimed.killed


def test_request_lifecycle_on_the_handle() -> None:
    class FakeRequest:
        worker_pid: int | None = None

    left, right = socket.socketpair()
    with left, right:
        worker = handle(sock=left)
        assert worker.spare  # may take a request while still starting
        request = FakeRequest()
        worker.assign(request)  # type: ignore[arg-type]
        assert worker.state is WorkerState.BUSY and not worker.spare
        worker.forked(77, None)
        assert worker.release_request() is request
        assert request.worker_pid == 77
        assert worker.state is WorkerState.EXITING and not worker.spare


class FakeZygote:
    """Answers one fork request with its own pid, then exits 7."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel

    def init_process(self) -> None:
        self.channel.setblocking(True)
        message, fds = ipc.recv_message(self.channel, FORK_OPS)
        assert message is not None and len(fds) == 1
        ipc.send_message(
            self.channel, {"op": "forked", "token": message["token"], "pid": os.getpid()}
        )
        os._exit(7)


def test_spawn_zygote_request_worker_and_reap() -> None:
    pool = WorkerPool()
    zygote = pool.spawn_zygote(1, FakeZygote)
    assert pool.live_zygote(1) is zygote and pool.live_zygote(2) is None
    worker = pool.request_worker(zygote)
    assert worker is not None and worker.state is WorkerState.STARTING
    assert pool.spare(1) == [worker]
    assert zygote.sock is not None
    zygote.sock.setblocking(True)
    zygote.sock.settimeout(10)
    message, fds = ipc.recv_message(zygote.sock, frozenset({"forked"}))
    assert message == {"op": "forked", "token": worker.token, "pid": zygote.pid} and fds == []
    end = time.monotonic() + 10
    reaped: list[tuple[int, int]] = []
    while not reaped and time.monotonic() < end:
        # waitpid(-1): in the test process other tests' children may come too
        reaped = [r for r in pool.reap_children() if r[0] == zygote.pid]
        time.sleep(0.01)
    assert reaped == [(zygote.pid, 7 << 8)]
    zygote.close_channel()
    worker.reaped = True
    worker.close_channel()
    assert pool.forget_finished() == [worker] and len(pool) == 0


def test_request_worker_survives_descriptor_exhaustion(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = WorkerPool()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = ZygoteHandle(pid=1, sock=left, generation=1, spawned_at=0.0)

    def no_fds(*_args: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(socket, "socketpair", no_fds)
    assert pool.request_worker(zygote) is None  # logged, retried on a later pass
    assert len(pool) == 0
    left.close()
    right.close()


def test_census_agrees_with_counting_one_by_one() -> None:
    """One walk gives what the per-state counts and the spare list give."""
    pool = WorkerPool()
    sock = socket.socket()
    try:
        token = 0
        for generation in (1, 2):
            for state in WorkerState:
                for pid in (None, 100 + token):
                    for has_sock in (False, True):
                        token += 1
                        worker = handle(
                            token=token,
                            generation=generation,
                            sock=sock if has_sock else None,
                            pid=pid,
                            state=state,
                        )
                        pool.workers[token] = worker
        for generation in (1, 2):
            census = pool.census(generation)
            live = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)
            assert census.live == sum(1 for w in pool if w.state in live)
            assert census.spare == len(pool.spare(generation))
            assert census.idle == sum(
                1 for w in pool if w.state is WorkerState.IDLE and w.generation == generation
            )
            assert census.unforked == sum(1 for w in pool if w.pid is None and w.sock is not None)
            assert 0 < census.spare < census.live
    finally:
        sock.close()
