"""Unit tests of the supervisor's parts: queue, budgets, stats, pool, notify, signals."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import stat
import time

import pytest
from tlshd.supervisor.arbiter import handshake_budget_s
from tlshd.supervisor.notify import Notifier
from tlshd.supervisor.pool import WORKER_BOOT_ERROR, WorkerPool, WorkerState, describe_exit
from tlshd.supervisor.queue import DeadlineQueue, Request
from tlshd.supervisor.signals import SignalQueue
from tlshd.supervisor.stats import CompletionStats
from tlshd.supervisor.status import StatusServer
from tlshd.supervisor.tlsmodule import tls_module_present

from tests.helpers.daemon import short_tmpdir
from tlshd.config import Config, WorkerConfig
from tlshd.log import handshake_logger
from tlshd.params import HandshakeParams


def make_request(req_id: int, deadline: float) -> Request:
    sock = socket.socket()
    params = HandshakeParams(sockfd=sock.fileno(), peer_identities=(5,), cert_serial=6)
    return Request(req_id, params, sock, "peer", 0.0, deadline, handshake_logger(req_id, "peer"))


def test_deadline_queue_orders_and_expires() -> None:
    queue = DeadlineQueue()
    requests = [make_request(i, deadline) for i, deadline in enumerate((5.0, 1.0, 3.0, 1.0))]
    for request in requests:
        queue.push(request)
    assert queue.next_deadline() == 1.0
    assert [r.req_id for r in queue.pop_expired(2.0)] == [1, 3]  # ties: accept order
    assert queue.pop().req_id == 2
    assert [r.req_id for r in queue.drain()] == [0]
    assert len(queue) == 0 and queue.next_deadline() is None
    assert requests[0].known_serials == {5, 6}
    for request in requests:
        request.sock.close()


def test_budget_from_accept_timeout_or_config() -> None:
    config = Config(worker=WorkerConfig(handshake_timeout_ms=4000))
    assert handshake_budget_s(HandshakeParams(sockfd=3), config) == 4.0
    # nvme's 10 s TIMEOUT: finish half a second inside the consumer's own timer.
    assert handshake_budget_s(HandshakeParams(sockfd=3, timeout_ms=10000), config) == 9.5
    assert handshake_budget_s(HandshakeParams(sockfd=3, timeout_ms=1000), config) == 0.9
    assert handshake_budget_s(HandshakeParams(sockfd=3, timeout_ms=1), config) == 0.1


def test_stats_buckets_and_percentiles() -> None:
    stats = CompletionStats()
    for ms in (3, 3, 3, 40, 900):
        stats.record(0, ms / 1000)
    stats.record(13, 20.0)
    assert (stats.done, stats.failed) == (6, 1)
    assert stats.counters() == {"0": 5, "13": 1}
    latency = stats.latency()
    assert latency["count"] == 6
    assert latency["p50"] == 5.0  # bucket upper bound
    assert latency["p99"] == latency["max"] == 20000.0
    assert latency["buckets"][-1] == [None, 1]  # the overflow bucket
    assert sum(count for _, count in latency["buckets"]) == 6


def test_describe_exit() -> None:
    assert describe_exit(WORKER_BOOT_ERROR << 8)[0] == "could not start (boot error)"
    assert describe_exit(0)[1] == logging.DEBUG
    assert describe_exit(signal.SIGKILL)[1] == logging.ERROR
    assert describe_exit(signal.SIGTERM)[1] == logging.INFO
    assert describe_exit(1 << 8) == ("exited with status 1", logging.WARNING)


class ExitWorker:
    def __init__(self, channel: socket.socket, code: int) -> None:
        self.channel, self.code = channel, code

    def init_process(self) -> None:
        self.channel.send(b"hi")
        os._exit(self.code)


def test_pool_spawn_and_reap() -> None:
    pool = WorkerPool()
    handle = pool.spawn(1, lambda channel: ExitWorker(channel, 7))
    assert handle.state is WorkerState.BOOTING and pool.count() == 1
    handle.sock.setblocking(True)
    handle.sock.settimeout(10)
    assert handle.sock.recv(10) == b"hi"
    assert handle.sock.recv(10) == b""  # EOF once the child is gone
    end = time.monotonic() + 10
    reaped = []
    while not reaped and time.monotonic() < end:
        reaped = pool.reap()
        time.sleep(0.01)
    assert reaped == [handle] and os.WEXITSTATUS(handle.exit_status) == 7
    assert len(pool) == 0
    handle.close_channel()
    pool.signal(handle, signal.SIGKILL)  # gone: no error


def test_signal_queue_records_and_wakes() -> None:
    queue = SignalQueue()
    queue.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR1)
        with selectors.DefaultSelector() as selector:
            selector.register(queue.fileno(), selectors.EVENT_READ)
            assert selector.select(5)
        assert queue.drain() == [signal.SIGUSR1, signal.SIGHUP]
        assert queue.drain() == []
    finally:
        queue.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_status_socket_is_private_and_replaces_stale_file() -> None:
    directory = short_tmpdir() / "sub"
    path = directory / "status.sock"
    directory.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    with selectors.DefaultSelector() as selector:
        server = StatusServer(str(path), selector, lambda: {"ok": 1})
        assert server.open()
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        server.close()
        assert not path.exists()


def test_status_socket_creates_private_directory_and_survives_failure() -> None:
    base = short_tmpdir()
    path = base / "run" / "status.sock"
    with selectors.DefaultSelector() as selector:
        server = StatusServer(str(path), selector, dict)
        assert server.open()
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        server.close()
        (base / "file").write_text("x")
        assert not StatusServer(str(base / "file" / "s.sock"), selector, dict).open()


def test_tls_module_markers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert not tls_module_present((str(tmp_path / "missing"),))
    assert tls_module_present((str(tmp_path),))


def make_arbiter():  # type: ignore[no-untyped-def]
    from tlshd.supervisor.arbiter import Arbiter

    from tests.helpers.daemon import NullKeyService
    from tests.helpers.engines import gated_engine
    from tlshd.credentials import Credentials

    return Arbiter(
        "/nonexistent",
        Config(),
        netlink=object(),
        credentials=Credentials(),  # type: ignore[arg-type]
        keyservice=NullKeyService(),
        engine=gated_engine,
        notifier=Notifier({}),
    )


def test_ready_is_accepted_once_from_booting_or_retiring_workers() -> None:
    from tlshd.supervisor.pool import WorkerHandle

    from tlshd import ipc

    arbiter = make_arbiter()
    message = {"op": "ready", "pid": 123, "generation": 1}
    booting = WorkerHandle(pid=123, sock=None, generation=1, spawned_at=0.0)
    arbiter.on_ready(booting, message)
    assert booting.state is WorkerState.IDLE
    with pytest.raises(ipc.IpcError):
        arbiter.on_ready(booting, message)  # twice
    retiring = WorkerHandle(
        pid=123, sock=None, generation=1, spawned_at=0.0, state=WorkerState.RETIRING
    )
    arbiter.on_ready(retiring, message)
    assert retiring.state is WorkerState.RETIRING  # stays on its way out
    for bad in (
        {"op": "ready", "pid": 124, "generation": 1},
        {"op": "ready", "pid": 123, "generation": 2},
    ):
        with pytest.raises(ipc.IpcError):
            arbiter.on_ready(WorkerHandle(pid=123, sock=None, generation=1, spawned_at=0.0), bad)
    arbiter.selector.close()
