"""supervisor/arbiter.py, without a loop: the boot-failure rule."""

from __future__ import annotations

import signal

import pytest
from tlshd.supervisor.arbiter import Arbiter, HaltServer
from tlshd.supervisor.notify import Notifier
from tlshd.supervisor.pool import WORKER_BOOT_ERROR, WorkerHandle

from tests.helpers.daemon import NullKeyService
from tests.helpers.engines import gated_engine
from tlshd.config import Config
from tlshd.credentials import Credentials


def make_arbiter() -> Arbiter:
    return Arbiter(
        "/nonexistent",
        Config(),
        netlink=object(),  # type: ignore[arg-type]
        credentials=Credentials(),
        keyservice=NullKeyService(),
        engine=gated_engine,
        notifier=Notifier({}),
    )


def starting_worker(arbiter: Arbiter, pid: int) -> WorkerHandle:
    worker = WorkerHandle(token=pid, sock=None, generation=1, zygote_pid=1, requested_at=0.0)
    worker.forked(pid, None)
    arbiter.pool.workers[worker.token] = worker
    return worker


def test_only_a_boot_error_exit_of_an_unready_worker_halts() -> None:
    arbiter = make_arbiter()
    try:
        # Killed by signals before `ready`, however many: not a boot failure.
        for pid in range(100, 120):
            starting_worker(arbiter, pid)
            arbiter.worker_exited(pid, signal.SIGKILL)
        # The boot-error status from a worker that did get ready: not one either.
        ready = starting_worker(arbiter, 200)
        ready.became_ready(200, 1, 1.0)
        arbiter.worker_exited(200, WORKER_BOOT_ERROR << 8)
        starting_worker(arbiter, 300)
        with pytest.raises(HaltServer):
            arbiter.worker_exited(300, WORKER_BOOT_ERROR << 8)
    finally:
        arbiter.selector.close()
