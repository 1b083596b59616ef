"""Resource leaks in the supervisor over many handshakes.

The daemon runs forked (tests/helpers/daemon.py), so psutil measures the
supervisor process alone.  After a warm-up the supervisor's open fds (less
one per live child) and its RSS are recorded; after many more handshakes they must be
back near those baselines, and no worker may be left a zombie.

Two loads: 1,000 handshakes with the cheap gated engine (each in a
single-use worker, so forking and reaping are exercised 1,000 times), and 100 real
TLS 1.3 handshakes (engine in the server role, in-process pyOpenSSL client,
kTLS captured by accept_ktls).
"""

from __future__ import annotations

import contextlib
import errno
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from tlshd.workers.engine import perform_handshake

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import Daemon, config_text, running_daemon, short_tmpdir, tcp_pair
from tests.helpers.engines import Peer, accept_ktls, gated_engine, junk_engine
from tests.helpers.waiting import wait_until
from tests.peers import InProcessTlsPeer, Pki
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.params import HandshakeResult
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(600)

WARM_UP = 50
FD_SLACK = 3  # a status client being served, a worker booting
RSS_SLACK = 8 << 20


def settle(daemon: Daemon) -> None:
    """Nothing in flight or queued, and no worker booting or retiring."""
    daemon.wait_for(
        lambda d: (
            d["in_flight"] == 0
            and d["queued"] == 0
            and all(w["state"] == "idle" and w["pid"] for w in d["workers"])
        ),
        timeout=30,
        what="an idle daemon",
    )
    # No status connection is left open to count: fetch_status reads to EOF,
    # and the supervisor sends EOF by closing its end once the reply is out.


def measure(daemon: Daemon) -> tuple[int, int, list[tuple[int, str]]]:
    """(fds less worker channels, RSS, children and their states) of the supervisor."""
    settle(daemon)
    supervisor = psutil.Process(daemon.pid)
    children = [(c.pid, c.status()) for c in supervisor.children()]
    live = sum(status != psutil.STATUS_ZOMBIE for _pid, status in children)
    return supervisor.num_fds() - live, supervisor.memory_info().rss, children


def no_zombies(daemon: Daemon) -> None:
    """Workers that exited are reaped: no zombie child stays for long."""

    def reaped() -> bool:
        children = psutil.Process(daemon.pid).children()
        return not any(c.status() == psutil.STATUS_ZOMBIE for c in children)

    wait_until(reaped, what="no zombie workers")


def run_load(
    daemon: Daemon, one: Callable[[], None], count: int, label: str, per_call: int = 1
) -> None:
    """`count` handshakes after a warm-up of WARM_UP, `per_call` per call of `one`."""
    for _ in range(WARM_UP // per_call):
        one()
    fds0, rss0, children0 = measure(daemon)
    started = time.monotonic()
    for _ in range(count // per_call):
        one()
    elapsed = time.monotonic() - started
    fds1, rss1, children1 = measure(daemon)
    no_zombies(daemon)
    doc = daemon.status()
    print(
        f"{label}: {count} handshakes in {elapsed:.1f} s; supervisor fds {fds0} -> {fds1} "
        f"(+{len(children1)} worker channels), RSS {rss0 >> 10} -> {rss1 >> 10} KiB, "
        f"workers {[p for p, _ in children0]} -> {[p for p, _ in children1]}"
    )
    assert doc["counters"].get("0", 0) >= count, doc["counters"]
    assert fds1 <= fds0 + FD_SLACK, (fds0, fds1)
    assert rss1 <= rss0 + RSS_SLACK, (rss0, rss1)


@contextlib.contextmanager
def small_pool_daemon(
    kernel: FakeKernel, engine: Callable[..., HandshakeResult], **kwargs: Any
) -> Iterator[Daemon]:
    """Two to four workers: under load the pool grows, and workers recycle."""
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=4)
    with running_daemon(kernel, engine, config=text, directory=directory, **kwargs) as daemon:
        yield daemon


def test_thousand_cheap_handshakes(kernel: FakeKernel) -> None:
    with small_pool_daemon(kernel, gated_engine) as daemon:

        def batch() -> None:
            # Four at a time: the pool grows and requests overlap.
            peers = [Peer(kernel) for _ in range(4)]
            for peer in peers:
                peer.client.sendall(b"g")
            for peer in peers:
                assert peer.request.wait_done(20)[0] == 0
                peer.close()

        run_load(daemon, batch, 1000, "gated engine", per_call=4)
        assert kernel.dones >= 1000 + WARM_UP - 4
        assert all(r.done_count == 1 for r in kernel.requests)
        # Single-use workers: every handshake had a process of its own, so
        # forking and reaping were exercised once per request.
        served = re.findall(r"succeeded, .* \(worker (\d+)\)", daemon.log())
        assert len(served) == len(set(served)) >= 1000


def test_hundred_real_tls_handshakes(kernel: FakeKernel, pki: Pki) -> None:
    credentials = Credentials(
        server=RoleCredentials(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem)
    )
    with small_pool_daemon(
        kernel, perform_handshake, credentials=credentials, install_ktls=accept_ktls
    ) as daemon:

        def handshake() -> None:
            client, server = tcp_pair()
            with client, server:
                request = kernel.submit(server, MsgType.SERVERHELLO, AuthMode.X509)
                peer = InProcessTlsPeer(client, ca=pki.ca)
                assert request.wait_done(30) == (0, ())
                assert peer.wait(10), peer.error

        run_load(daemon, handshake, 100, "real TLS engine")


def test_hundred_killed_workers(kernel: FakeKernel) -> None:
    """Every request's worker sends junk and is killed: DONE(EIO), channel
    closed, worker reaped; nothing accumulates in the supervisor."""
    with small_pool_daemon(kernel, junk_engine) as daemon:

        def killed() -> None:
            peer = Peer(kernel, peername="not-json", timeout_ms=60000)
            try:
                assert peer.request.wait_done(20) == (errno.EIO, ())
            finally:
                peer.close()

        for _ in range(WARM_UP // 5):
            killed()
        fds0, rss0, _ = measure(daemon)
        for _ in range(100):
            killed()
        fds1, rss1, _ = measure(daemon)
        no_zombies(daemon)
        print(f"killed workers: fds {fds0} -> {fds1}, RSS {rss0 >> 10} -> {rss1 >> 10} KiB")
        assert fds1 <= fds0 + FD_SLACK, (fds0, fds1)
        assert rss1 <= rss0 + RSS_SLACK, (rss0, rss1)
        assert daemon.status()["counters"].get(str(errno.EIO), 0) >= 100
