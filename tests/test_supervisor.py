"""The supervisor end to end: fake kernel, a real forked arbiter, real forked
workers, real loopback TCP sockets.  The handshake engine is a small fake
(tests/test_supervisor_engine.py runs the real one)."""

from __future__ import annotations

import errno
import os
import signal
import time

import psutil
import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import config_text, recv_exactly, running_daemon, short_tmpdir
from tests.helpers.engines import Peer, gated_engine, pid_engine

pytestmark = pytest.mark.timeout(120)


def busy(doc: dict) -> list[dict]:  # type: ignore[type-arg]
    """Workers that started their handshake (holding the socket, pid known)."""
    return [
        w
        for w in doc["workers"]
        if w["state"] == "busy" and w["pid"] and w["phase"] not in (None, "handoff")
    ]


def test_accept_handoff_done_with_supervisor_fd(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        peer = Peer(kernel, peername="nfs.example")
        peer.request.wait_accepted(10)
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10) == (0, ())
        assert peer.request.done_count == 1
        assert kernel.done_errors == 0  # DONE named an fd open in the supervisor
        daemon.wait_for_log("succeeded, cipher FAKE-CIPHER")
        assert "peer=nfs.example (127.0.0.1:" in daemon.log()
        doc = daemon.wait_for(lambda d: d["done"] == 1, what="done counted")
        assert doc["counters"] == {"0": 1}
        assert doc["latency_ms"]["count"] == 1
        peer.close()


def test_one_request_per_idle_worker(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=2)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        peers = [Peer(kernel) for _ in range(2)]
        doc = daemon.wait_for(lambda d: len(busy(d)) == 2, what="two busy workers")
        assert {w["req"] for w in busy(doc)} == {1, 2}
        assert len({w["pid"] for w in busy(doc)}) == 2
        for peer in peers:
            assert peer.release() == b"4000\n"
            assert peer.request.wait_done(10)[0] == 0


def test_pool_grows_to_max_and_serves_queue_in_deadline_order(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=1, max_workers=2, timeout_ms=30000)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        holders = [Peer(kernel) for _ in range(2)]
        daemon.wait_for(lambda d: len(busy(d)) == 2, what="pool grown to max")
        # Queued with different deadlines (TIMEOUT from ACCEPT): the latest
        # submitted has the earliest deadline and must be served first.
        queued = {timeout: Peer(kernel, timeout_ms=timeout) for timeout in (25000, 15000, 20000)}
        doc = daemon.wait_for(lambda d: d["queued"] == 3, what="three queued")
        assert len(doc["workers"]) == 2  # never beyond max_workers
        # One worker frees up; the other stays held, so the queue drains
        # through one worker, one request at a time.  The peers answer at once;
        # the order is the fake kernel's order of DONEs (threads waking up in
        # the test could report it in any order).
        for peer in queued.values():
            peer.client.sendall(b"g")
        holders[0].release()
        for peer in queued.values():
            peer.request.wait_done(30)
        by_request = {id(peer.request): timeout for timeout, peer in queued.items()}
        order = [by_request[id(r)] for r in kernel.completion_order if id(r) in by_request]
        assert order == [15000, 20000, 25000]
        holders[1].release()
        for peer in [*holders, *queued.values()]:
            assert peer.request.wait_done(30)[0] == 0
        assert kernel.dones == 5


def test_worker_killed_mid_handshake_gets_eio_at_once(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        peer = Peer(kernel, timeout_ms=60000)
        # Started (its phase reported): one killed before that is handed on.
        doc = daemon.wait_for(
            lambda d: [w["phase"] for w in busy(d)] == ["clienthello"], what="busy worker"
        )
        victim = busy(doc)[0]["pid"]
        started = time.monotonic()
        psutil.Process(victim).kill()
        assert peer.request.wait_done(10) == (errno.EIO, ())
        assert time.monotonic() - started < 10  # the deadline was ~59 s away
        daemon.wait_for(
            lambda d: any(
                w["state"] == "idle" and w["pid"] and w["pid"] != victim for w in d["workers"]
            ),
            what="replacement worker",
        )
        assert "died during the handshake" in daemon.log()
        # The daemon still serves.
        again = Peer(kernel)
        assert again.release() == b"4000\n"
        assert again.request.wait_done(10)[0] == 0


def test_stopped_worker_times_out_and_is_replaced(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        peer = Peer(kernel, timeout_ms=1500)
        doc = daemon.wait_for(lambda d: len(busy(d)) == 1, what="busy worker")
        victim = busy(doc)[0]["pid"]
        psutil.Process(victim).suspend()
        assert peer.request.wait_done(20) == (errno.ETIMEDOUT, ())
        daemon.wait_for(
            lambda d: (
                victim not in {w["pid"] for w in d["workers"]}
                and any(w["state"] == "idle" and w["pid"] for w in d["workers"])
            ),
            what="stopped worker replaced",
        )
        assert "overran the handshake deadline" in daemon.log()
        assert not psutil.pid_exists(victim) or psutil.Process(victim).ppid() != daemon.pid


def test_lost_ready_is_recovered_by_the_accept_sweep(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine):
        peer = Peer(kernel, notify=False)
        peer.request.wait_accepted(15)
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10)[0] == 0


def test_enobufs_triggers_accept(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        peers = [Peer(kernel, notify=False) for _ in range(3)]
        kernel.inject_overrun()
        for peer in peers:
            peer.request.wait_accepted(15)
            peer.release()
            assert peer.request.wait_done(10)[0] == 0
        daemon.wait_for_log("ENOBUFS")


def test_sigterm_with_requests_in_flight(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=2, timeout_ms=30000)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        peers = [Peer(kernel) for _ in range(3)]
        doc = daemon.wait_for(
            lambda d: len(busy(d)) == 2 and d["queued"] == 1, what="two in flight, one queued"
        )
        workers = {w["pid"] for w in doc["workers"]}
        daemon.signal(signal.SIGTERM)
        results = [peer.request.wait_done(15) for peer in peers]
        assert all(status == errno.EIO for status, _ in results), results
        assert daemon.wait() == 0
        assert all(peer.request.done_count == 1 for peer in peers)
        daemon.assert_reaped(workers)
        assert "tlshd stopped" in daemon.log()


def test_sigterm_lets_in_flight_handshake_finish(kernel: FakeKernel) -> None:
    """The handshake is released only after the supervisor has begun to stop, so
    it can succeed only if the stopping daemon left its worker running."""
    with running_daemon(kernel, gated_engine) as daemon:
        peer = Peer(kernel, timeout_ms=30000)
        daemon.wait_for(lambda d: len(busy(d)) == 1, what="busy worker")
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("stopping: 1 in flight, 0 queued")
        assert peer.release() == b"4000\n"  # inside the grace period
        assert peer.request.wait_done(10) == (0, ())
        assert daemon.wait() == 0
        assert "did not exit; killing it" not in daemon.log()


def test_family_missing_exits_1_with_message() -> None:
    from tlshd.supervisor.arbiter import Arbiter

    from tests.helpers.daemon import NullKeyService
    from tlshd.config import load_config
    from tlshd.credentials import Credentials

    directory = short_tmpdir()
    path = directory / "tlshd.conf"
    path.write_text(config_text(directory / "status.sock"))
    with FakeKernel(has_family=False) as kernel:
        arbiter = Arbiter(
            str(path),
            load_config(str(path)),
            netlink=kernel.make_netlink(),
            credentials=Credentials(),
            keyservice=NullKeyService(),
            engine=gated_engine,
        )
        import logging

        from tlshd.log import log

        records: list[str] = []

        class Grab(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        handler = Grab()
        log.addHandler(handler)
        try:
            assert arbiter.run() == 1
        finally:
            log.removeHandler(handler)
    assert any("handshake" in r and "Linux >= 6.5" in r for r in records), records
    assert len(arbiter.pool) == 0


def test_run_daemon_on_a_kernel_without_the_family(caplog: pytest.LogCaptureFixture) -> None:
    from tlshd.supervisor.arbiter import run_daemon
    from tlshd.supervisor.firstzygote import fork_first_zygote

    from tlshd.netlink import HandshakeFamilyMissing, HandshakeNetlink

    probe = HandshakeNetlink()
    try:
        probe.open()
    except HandshakeFamilyMissing:
        pass
    else:
        pytest.skip("this kernel has the handshake family")
    finally:
        probe.close()
    from tlshd.config import load_config
    from tlshd.log import log

    directory = short_tmpdir()
    path = directory / "tlshd.conf"
    path.write_text(config_text(directory / "status.sock"))
    config = load_config(str(path))
    first_zygote = fork_first_zygote(config)
    propagate, log.propagate = log.propagate, True
    try:
        with caplog.at_level("INFO", logger="tlshd"):
            assert run_daemon(str(path), config, first_zygote) == 1
    finally:
        log.propagate = propagate
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("Linux >= 6.5" in message for message in errors), errors
    assert not (directory / "status.sock").exists()
    with pytest.raises(ChildProcessError):  # the zygote forked first was reaped
        os.waitpid(first_zygote.zygote.pid, os.WNOHANG)


def test_sigint_fails_in_flight_at_once(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        peer = Peer(kernel, timeout_ms=30000)
        daemon.wait_for(lambda d: d["in_flight"] == 1, what="in flight")
        daemon.signal(signal.SIGINT)
        assert peer.request.wait_done(10) == (errno.EIO, ())
        assert daemon.wait() == 0
        assert "abandoning the handshake" in daemon.log()


def test_no_process_serves_two_requests(kernel: FakeKernel) -> None:
    """Single-use workers: every request is served by a process of its own,
    and that process is gone after its DONE."""
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=1, max_workers=2)
    with running_daemon(kernel, pid_engine, config=text, directory=directory) as daemon:
        served: list[int] = []
        for _ in range(6):
            peer = Peer(kernel)
            peer.client.sendall(b"g")
            served.append(int(recv_exactly(peer.client, 8)))
            assert peer.request.wait_done(10)[0] == 0
            peer.close()
        assert len(set(served)) == len(served), served
        daemon.wait_for(
            lambda d: not {w["pid"] for w in d["workers"]} & set(served),
            what="served workers gone",
        )
        for pid in served:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
