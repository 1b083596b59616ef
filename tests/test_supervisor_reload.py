"""Reload (SIGHUP/SIGUSR1), sd_notify as systemd sees it, and the status socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import config_text, running_daemon, short_tmpdir
from tests.helpers.engines import Peer, gated_engine

pytestmark = pytest.mark.timeout(120)


class NotifyListener:
    """What systemd would receive on $NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.lines: list[str] = []

    def count(self, line: str) -> int:
        return self.lines.count(line)

    def wait_until(self, predicate, timeout: float = 20, what: str = "") -> None:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while not predicate():
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} not received; got {self.lines}")
            self.sock.settimeout(min(remaining, 0.5))
            try:
                self.lines += self.sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue

    def wait_for(self, line: str, count: int = 1) -> None:
        self.wait_until(lambda: self.count(line) >= count, what=line)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_reload_new_generation_in_flight_finishes_on_old(kernel: FakeKernel, signum: int) -> None:
    directory = short_tmpdir()
    status = directory / "status.sock"
    text = config_text(status, min_workers=1, max_workers=4, timeout_ms=30000)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        old = Peer(kernel)
        doc = daemon.wait_for(lambda d: d["in_flight"] == 1, what="one in flight")
        # the busy one: the pool may already have forked an idle spare beside it
        (old_worker,) = (w["pid"] for w in doc["workers"] if w["state"] == "busy")
        daemon.config_path.write_text(config_text(status, timeout_ms=31000))
        daemon.signal(signum)
        daemon.wait_for(lambda d: d["generation"] == 2, what="generation 2")
        new = Peer(kernel)
        assert new.release() == b"31000"[:5]  # new workers run the new config
        assert new.request.wait_done(10)[0] == 0
        # The busy old worker kept its request and its config.
        assert old.release() == b"30000"[:5]
        assert old.request.wait_done(10)[0] == 0
        # ...and is retired afterwards.
        daemon.wait_for(
            lambda d: old_worker not in {w["pid"] for w in d["workers"]}, what="old worker retired"
        )
        # An idle spare of generation 1 was told to retire at the reload; it is
        # listed until it has exited and been reaped.
        doc = daemon.wait_for(
            lambda d: all(w["generation"] == 2 for w in d["workers"]), what="only generation 2"
        )
        assert doc["workers"]
        assert "configuration reloaded" in daemon.log()


def test_reload_with_broken_config_keeps_the_old_one(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        daemon.config_path.write_text("[pool]\nmin_workers = many\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reload failed; keeping the current configuration")
        peer = Peer(kernel)
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10)[0] == 0
        assert daemon.status()["generation"] == 1


def test_sd_notify_ready_reloading_stopping(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    listener = NotifyListener(str(directory / "notify.sock"))
    text = config_text(directory / "status.sock", min_workers=2)
    env = {"NOTIFY_SOCKET": str(directory / "notify.sock")}
    with running_daemon(
        kernel, gated_engine, config=text, directory=directory, environ=env, wait_ready=False
    ) as daemon:
        listener.wait_for("READY=1")
        # READY only once the netlink group is joined, the zygote is ready and
        # a worker is.
        assert kernel.listeners == 1
        doc = daemon.status()
        assert [z["state"] for z in doc["zygotes"]] == ["ready"]
        assert sum(w["state"] == "idle" and bool(w["pid"]) for w in doc["workers"]) >= 1
        daemon.signal(signal.SIGHUP)
        listener.wait_for("RELOADING=1")
        usec = next(int(x.split("=")[1]) for x in listener.lines if x.startswith("MONOTONIC_USEC="))
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 60
        listener.wait_for("READY=1", count=2)
        assert listener.lines.index("RELOADING=1") < len(listener.lines) - 1 - listener.lines[
            ::-1
        ].index("READY=1")
        peer = Peer(kernel)
        peer.release()
        peer.request.wait_done(10)
        listener.wait_until(
            lambda: any(
                x.startswith("STATUS=") and "1 done, 0 failed" in x for x in listener.lines
            ),
            what="STATUS with one done",
        )
        daemon.signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1")
        assert daemon.wait() == 0


def test_status_socket_document(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        mode = os.stat(daemon.status_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        peer = Peer(kernel)
        doc = daemon.wait_for(lambda d: d["in_flight"] == 1, what="in flight")
        assert doc["pid"] == daemon.pid
        assert doc["generation"] == 1
        assert doc["uptime_s"] > 0
        busy = next(w for w in doc["workers"] if w["state"] == "busy")
        assert busy["req"] == 1 and busy["peer"].startswith("127.0.0.1:")
        assert busy["age_s"] >= 0 and busy["generation"] == 1
        assert [z["state"] for z in doc["zygotes"]] == ["ready"]
        peer.release()
        peer.request.wait_done(10)
        doc = daemon.wait_for(lambda d: d["done"] == 1, what="done")
        assert doc["failed"] == 0 and doc["queued"] == 0 and doc["in_flight"] == 0
        assert doc["counters"] == {"0": 1}
        latency = doc["latency_ms"]
        assert latency["count"] == 1 and latency["p50"] is not None
        assert sum(count for _, count in latency["buckets"]) == 1
        daemon.wait_for(  # single use: the worker that served it is gone
            lambda d: busy["pid"] not in {w["pid"] for w in d["workers"]}, what="worker gone"
        )


def test_status_socket_survives_a_silent_client(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(daemon.status_path))  # never writes
        peer = Peer(kernel)
        assert peer.release() == b"4000\n"  # the loop is not stalled
        assert peer.request.wait_done(10)[0] == 0
        silent.settimeout(10)
        assert silent.recv(10) == b""  # dropped after the client time limit
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(daemon.status_path))
            client.sendall(b"status\n")
            data = b""
            client.settimeout(10)
            while chunk := client.recv(65536):
                data += chunk
        assert json.loads(data)["done"] == 1
