"""`[pool] handshakes_per_worker` > 1: worker hosts, the alternative to one
process per handshake that issue 10 asks to be measured (workers/host.py).
Fake kernel, a real forked arbiter, zygote, hosts and threads, real
loopback TCP sockets.  (A loopback burst through hosts is
tests/test_supervisor_workers.py's, parametrized.)"""

from __future__ import annotations

import errno
import time
from collections import Counter

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import config_text, recv_exactly, running_daemon, short_tmpdir
from tests.helpers.engines import (
    Peer,
    RandomKeyService,
    memory_holds,
    pid_engine,
    read_residue_key,
    residue_engine,
)
from tlshd.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(180)

PER_HOST = 4


@pytest.fixture
def kernel():  # type: ignore[no-untyped-def]
    with FakeKernel() as fake:
        yield fake


def shared_config(directory, **kwargs) -> str:  # type: ignore[no-untyped-def]
    return config_text(directory / "status.sock", handshakes_per_worker=PER_HOST, **kwargs)


def test_handshakes_per_worker_is_read_and_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tlshd.conf"
    path.write_text("[pool]\nhandshakes_per_worker=8\n")
    assert load_config(str(path)).pool.handshakes_per_worker == 8
    path.write_text("")
    assert load_config(str(path)).pool.handshakes_per_worker == 1
    path.write_text("[pool]\nhandshakes_per_worker=0\n")
    with pytest.raises(ConfigError, match="handshakes_per_worker"):
        load_config(str(path))


def test_a_host_serves_several_handshakes_and_no_more_than_its_share(
    kernel: FakeKernel,
) -> None:
    directory = short_tmpdir()
    text = shared_config(directory, min_workers=2, max_workers=64, timeout_ms=30000)
    with running_daemon(kernel, pid_engine, config=text, directory=directory) as daemon:
        peers = [Peer(kernel) for _ in range(3 * PER_HOST)]
        for peer in peers:
            peer.client.sendall(b"g")
        served = [int(recv_exactly(peer.client, 8)) for peer in peers]
        assert [peer.request.wait_done(10)[0] for peer in peers] == [0] * len(peers)
        per_process = Counter(served)
        assert len(per_process) < len(peers)  # processes were shared
        assert max(per_process.values()) <= PER_HOST
        assert daemon.status()["failed"] == 0
        for peer in peers:
            peer.close()


def test_a_request_with_keyring_keys_gets_a_process_of_its_own(kernel: FakeKernel) -> None:
    """The isolation the issue asks of either design: no key read for one
    request in a process that serves another, hosts or not."""
    directory = short_tmpdir()
    text = shared_config(directory, min_workers=2, max_workers=64, timeout_ms=30000)
    with running_daemon(
        kernel, residue_engine, config=text, directory=directory, keyservice=RandomKeyService()
    ) as daemon:
        before = [Peer(kernel) for _ in range(2)]  # keyless: on a host, still running
        before_pids = {int(recv_exactly(p.client, 8)) for p in before}
        reader = Peer(kernel, cert=77)
        reader_pid, halves = read_residue_key(reader)
        assert memory_holds(reader_pid, *halves[0])  # the scan can fail
        assert reader_pid not in before_pids
        reader.client.sendall(b"g")
        assert reader.request.wait_done(10)[0] == 0
        after = [Peer(kernel) for _ in range(PER_HOST)]
        after_pids = {int(recv_exactly(p.client, 8)) for p in after}
        assert reader_pid not in after_pids
        for pid in before_pids | after_pids:
            assert not any(memory_holds(pid, head, tail) for head, tail in halves)
        for peer in before + after:
            peer.client.sendall(b"g")
            assert peer.request.wait_done(30)[0] == 0
        assert daemon.status()["failed"] == 0


def stubborn_engine(sock, params, ctx):  # type: ignore[no-untyped-def]
    """pid_engine, except that a request whose peername is "stuck" ignores
    its deadline (the supervisor must end it)."""
    if params.peername == "stuck":
        time.sleep(60)
    return pid_engine(sock, params, ctx)


def test_an_overrun_ends_its_host_and_fails_its_neighbours_at_once(kernel: FakeKernel) -> None:
    """The price of sharing: the deadline's SIGKILL ends the host, and a
    co-hosted request gets DONE(EIO) at once, not at its own deadline.  The
    daemon goes on serving."""
    directory = short_tmpdir()
    text = shared_config(directory, min_workers=2, max_workers=64, timeout_ms=30000)
    with running_daemon(kernel, stubborn_engine, config=text, directory=directory) as daemon:
        neighbour = Peer(kernel)  # a client half: the sunrpc client's 10 s
        stuck = Peer(kernel, peername="stuck", timeout_ms=1500)  # deadline about 1 s
        started = time.monotonic()
        assert stuck.request.wait_done(10)[0] == errno.ETIMEDOUT
        assert neighbour.request.wait_done(10)[0] == errno.EIO
        assert time.monotonic() - started < 3.0
        fresh = Peer(kernel)
        fresh.client.sendall(b"g")
        recv_exactly(fresh.client, 8)
        assert fresh.request.wait_done(10)[0] == 0
        assert daemon.status()["failed"] == 2
