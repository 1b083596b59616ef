"""The process model end to end: zygote, single-use workers, reserve,
deadlines per consumer, bursts, bounded admission, descriptor exhaustion,
signal-killed workers, and key residue.  Fake kernel, a real forked
arbiter, real zygote and workers, real loopback TCP sockets."""

from __future__ import annotations

import errno
import resource
import signal
import threading
import time

import psutil
import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import (
    config_text,
    recv_exactly,
    running_daemon,
    short_tmpdir,
    tcp_pair,
)
from tests.helpers.engines import (
    Peer,
    RandomKeyService,
    deadline_engine,
    gated_engine,
    memory_holds,
    pair_engine,
    pid_engine,
    read_residue_key,
    residue_engine,
)
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def kernel():  # type: ignore[no-untyped-def]
    with FakeKernel() as fake:
        yield fake


def spare_pids(doc: dict) -> set[int]:  # type: ignore[type-arg]
    return {w["pid"] for w in doc["workers"] if w["state"] == "idle" and w["pid"]}


def ready_zygote(doc: dict) -> int | None:  # type: ignore[type-arg]
    return next((z["pid"] for z in doc["zygotes"] if z["state"] == "ready"), None)


def test_zygote_death_fails_its_requests_and_it_is_replaced(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        doc = daemon.status()
        zygote = ready_zygote(doc)
        assert zygote is not None
        assert [c.pid for c in psutil.Process(daemon.pid).children()] == [zygote]
        peer = Peer(kernel, timeout_ms=60000)
        daemon.wait_for(lambda d: d["in_flight"] == 1, what="in flight")
        started = time.monotonic()
        psutil.Process(zygote).kill()
        assert peer.request.wait_done(10) == (errno.EIO, ())
        assert time.monotonic() - started < 10  # the deadline was ~60 s away
        doc = daemon.wait_for(
            lambda d: ready_zygote(d) not in (None, zygote) and spare_pids(d),
            what="a new zygote with spare workers",
        )
        assert f"zygote {zygote} is gone" in daemon.log()
        again = Peer(kernel)
        assert again.release() == b"4000\n"
        assert again.request.wait_done(10)[0] == 0


def test_reserve_is_forked_before_requests_and_refilled_after(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=3, max_workers=8)
    with running_daemon(kernel, pid_engine, config=text, directory=directory) as daemon:
        before = spare_pids(daemon.wait_for(lambda d: len(spare_pids(d)) == 3, what="reserve"))
        peer = Peer(kernel)
        peer.client.sendall(b"g")
        served = int(recv_exactly(peer.client, 8))
        assert peer.request.wait_done(10)[0] == 0
        # The hand-off went to a worker forked before the request existed.
        assert served in before
        after = spare_pids(
            daemon.wait_for(
                lambda d: len(spare_pids(d)) == 3 and served not in spare_pids(d),
                what="reserve refilled",
            )
        )
        assert len(after - before) == 1
        # The supervisor forked none of them: its only child is the zygote.
        children = psutil.Process(daemon.pid).children()
        assert [c.pid for c in children] == [ready_zygote(daemon.status())]
        assert all(psutil.Process(pid).ppid() == children[0].pid for pid in after)


def test_deadline_follows_the_consumer(kernel: FakeKernel) -> None:
    with running_daemon(kernel, deadline_engine) as daemon:
        # (ACCEPT attributes, the consumer's timer, the deadline we owe it)
        cases = {
            "sunrpc client": ({"message_type": MsgType.CLIENTHELLO}, 10.0, 10.0),
            "nfsd": ({"message_type": MsgType.SERVERHELLO, "auth_mode": AuthMode.X509}, 5.0, 5.0),
            "nvme": ({"auth_mode": AuthMode.PSK, "timeout_ms": 20000}, 20.0, 19.5),
            # no TIMEOUT, no known timer: [worker] handshake_timeout_ms (4000 here)
            "unknown": ({"message_type": MsgType.SERVERHELLO, "auth_mode": AuthMode.PSK}, 0, 4.0),
        }
        for name, (args, timer, deadline) in cases.items():
            peer = Peer(kernel, **args)
            left = float(recv_exactly(peer.client, 6))
            assert deadline - 1.0 < left <= deadline, (name, left)
            assert not timer or left <= timer  # never beyond the consumer's timer
            assert peer.request.wait_done(10)[0] == 0
        assert daemon.status()["failed"] == 0


@pytest.mark.parametrize("handshakes_per_worker", [1, 4])  # 4: worker hosts, workers/host.py
def test_burst_of_loopback_pairs_beyond_the_reserve(
    kernel: FakeKernel, handshakes_per_worker: int
) -> None:
    """Both halves of each connection are ours, as in a loopback NFS mount:
    neither can finish unless both get a worker.  Many more than the reserve."""
    directory = short_tmpdir()
    text = config_text(
        directory / "status.sock",
        min_workers=2,
        max_workers=192,
        timeout_ms=30000,
        handshakes_per_worker=handshakes_per_worker,
    )
    pairs = 40
    with running_daemon(kernel, pair_engine, config=text, directory=directory) as daemon:
        sockets = [tcp_pair() for _ in range(pairs)]
        requests = []
        for client, server in sockets:
            requests.append(kernel.submit(client, MsgType.CLIENTHELLO, AuthMode.UNAUTH))
            requests.append(kernel.submit(server, MsgType.SERVERHELLO, AuthMode.X509))
        statuses = [r.wait_done(60)[0] for r in requests]
        assert statuses == [0] * 2 * pairs
        doc = daemon.status()
        assert doc["done"] == 2 * pairs and doc["failed"] == 0
        for client, server in sockets:
            client.close()
            server.close()


def limit_running_to_four() -> None:
    """In the daemon, before the Arbiter is built: 4 handshakes at once."""
    from tlshd.supervisor import broker

    broker.running_limit = lambda: 4


def test_loopback_burst_under_the_running_limit_with_nfsd_threads_out_of_order(
    kernel: FakeKernel,
) -> None:
    """All client halves first, as mounts connect; then the server halves
    from three "nfsd threads", each blocked until its request is DONE (as
    svc_tcp_handshake waits), last connection first.  With 4 handshakes
    allowed at once, client halves alone must not take the room the server
    halves need, or both wait until nfsd's 5 s timer fails them."""
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=192, timeout_ms=30000)
    pairs = 12
    with running_daemon(
        kernel, pair_engine, config=text, directory=directory, in_child=limit_running_to_four
    ) as daemon:
        assert daemon.status()["limits"]["max_running"] == 4
        sockets = [tcp_pair() for _ in range(pairs)]
        clients = [kernel.submit(c, MsgType.CLIENTHELLO, AuthMode.UNAUTH) for c, _ in sockets]
        # nfsd accepts the connections only once the daemon has taken what it will.
        daemon.wait_for(lambda d: d["in_flight"] >= 2 and d["queued"] <= 10, what="clients started")
        time.sleep(0.2)
        servers_left = [server for _, server in sockets]  # popped from the end: last first
        servers = []
        lock = threading.Lock()

        def nfsd_thread() -> None:
            while True:
                with lock:
                    if not servers_left:
                        return
                    request = kernel.submit(servers_left.pop(), MsgType.SERVERHELLO, AuthMode.X509)
                    servers.append(request)
                request.wait_done(30)

        threads = [threading.Thread(target=nfsd_thread, daemon=True) for _ in range(3)]
        for thread in threads:
            thread.start()
        most_running = 0
        while any(thread.is_alive() for thread in threads):
            most_running = max(most_running, daemon.status()["in_flight"])
            time.sleep(0.01)
        statuses = [r.wait_done(30)[0] for r in clients + servers]
        assert statuses == [0] * 2 * pairs
        # 4, plus the other halves of running loopback connections (two of them lone)
        assert most_running <= 6
        assert daemon.status()["failed"] == 0
        for client, server in sockets:
            client.close()
            server.close()


def test_queue_is_bounded_and_the_rest_waits_in_the_kernel(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=1, max_workers=1)
    text = text.replace("[worker]", "max_queued=2\n[worker]")
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        peers = [Peer(kernel, timeout_ms=60000) for _ in range(6)]
        doc = daemon.wait_for(lambda d: d["in_flight"] == 1 and d["queued"] == 2, what="queue full")
        assert not doc["accepting"]
        assert kernel.pending == 3  # never accepted: still the kernel's
        for peer in peers:
            peer.client.sendall(b"g")
        for peer in peers:
            assert peer.request.wait_done(30)[0] == 0
        assert kernel.pending == 0 and daemon.status()["failed"] == 0


def tight_fd_limit() -> None:
    """In the daemon: a descriptor limit only a few requests above what it holds."""
    from tlshd.supervisor.broker import FD_HEADROOM, open_fd_count

    limit = open_fd_count() + FD_HEADROOM + 16
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_descriptor_exhaustion_is_survived(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=1, max_workers=64)
    with running_daemon(
        kernel, gated_engine, config=text, directory=directory, in_child=tight_fd_limit
    ) as daemon:
        peers = [Peer(kernel, timeout_ms=60000) for _ in range(30)]
        doc = daemon.wait_for(
            lambda d: d["in_flight"] >= 1 and not d["accepting"], what="admission closed"
        )
        assert doc["limits"]["fds_held"] <= doc["limits"]["fd_limit"]
        assert kernel.pending > 0  # the rest stays in the kernel
        for peer in peers:
            peer.client.sendall(b"g")
        for peer in peers:
            assert peer.request.wait_done(60)[0] == 0
        assert daemon.exit_code is None and daemon.status()["failed"] == 0


def test_workers_killed_by_signals_do_not_stop_the_daemon(kernel: FakeKernel) -> None:
    """Anyone running as the worker user can kill workers; that is not a
    failure of the code to start, however often it happens."""
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        killed: set[int] = set()
        while len(killed) < 12:
            zygote = psutil.Process(ready_zygote(daemon.status()))
            for child in zygote.children():
                if child.pid not in killed:
                    child.send_signal(signal.SIGKILL)
                    killed.add(child.pid)
        # The kills are noticed (EOF) and the reserve is refilled.
        daemon.wait_for(
            lambda d: len(spare_pids(d)) >= 2 and not killed & {w["pid"] for w in d["workers"]},
            what="kills noticed, reserve refilled",
        )
        peer = Peer(kernel)
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10)[0] == 0
        assert daemon.exit_code is None and "cannot start" not in daemon.log()


def test_key_material_never_reaches_a_process_serving_another_request(
    kernel: FakeKernel,
) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2)
    with running_daemon(
        kernel, residue_engine, config=text, directory=directory, keyservice=RandomKeyService()
    ) as daemon:
        reader = Peer(kernel, cert=77)
        reader_pid, halves = read_residue_key(reader)
        # The scan finds the key in the process that read it (so it can fail).
        assert memory_holds(reader_pid, *halves[0])
        reader.client.sendall(b"g")
        assert reader.request.wait_done(10)[0] == 0
        # Every later worker, including spares forked before the key was read.
        for _ in range(4):
            scanner = Peer(kernel)
            pid = int(recv_exactly(scanner.client, 8))
            assert pid != reader_pid
            assert not any(memory_holds(pid, head, tail) for head, tail in halves)
            scanner.client.sendall(b"g")
            assert scanner.request.wait_done(60)[0] == 0
        assert daemon.status()["failed"] == 0
