"""The worker process: privileges, inherited descriptors, titles, boot failure."""

from __future__ import annotations

import os
import pwd
import socket
import time

import psutil
import pytest
from tlshd.workers.privileges import read_status_fields

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import config_text, running_daemon, short_tmpdir, start_daemon
from tests.helpers.engines import Peer, gated_engine
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")


def idle_worker(daemon) -> int:  # type: ignore[no-untyped-def]
    doc = daemon.wait_for(
        lambda d: any(w["state"] == "idle" and w["pid"] for w in d["workers"]), what="idle worker"
    )
    return next(w["pid"] for w in doc["workers"] if w["state"] == "idle" and w["pid"])


def process_title(pid: int) -> str:
    """The title setproctitle wrote: /proc/PID/cmdline up to the NUL padding.
    (psutil's cmdline() guesses separators and may split the title at spaces.)"""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0", 1)[0].decode()


def wait_for_title(pid: int, prefix: str, suffix: str = "", timeout: float = 10) -> str:
    """A worker retitles itself after the supervisor has counted it busy or idle."""
    end = time.monotonic() + timeout
    while True:
        title = process_title(pid)
        if (title.startswith(prefix) and title.endswith(suffix)) or time.monotonic() > end:
            return title
        time.sleep(0.02)


def socket_fds(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:
            continue
    return [link for link in links if link.startswith("socket:")]


@needs_root
def test_worker_runs_as_its_own_account_without_capabilities(kernel: FakeKernel) -> None:
    """With [worker] user unset, workers run as `tlshd`: an account no other
    process shares, so no other service can kill or trace them (issue 11 #2)."""
    try:
        account = pwd.getpwnam("tlshd")
    except KeyError:
        pytest.skip("no 'tlshd' account here (scripts/setup.sh creates it)")
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", user="")
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        pid = idle_worker(daemon)
        status = read_status_fields(f"/proc/{pid}/status")
        assert status["Uid"].split() == [str(account.pw_uid)] * 4
        assert status["Gid"].split() == [str(account.pw_gid)] * 4
        assert account.pw_uid != pwd.getpwnam("nobody").pw_uid
        assert status["Groups"] == ""
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[key], 16) == 0, (key, status[key])
        assert status["NoNewPrivs"] == "1"
        # The supervisor keeps its privileges.
        supervisor = read_status_fields(f"/proc/{daemon.pid}/status")
        assert supervisor["Uid"].split()[0] == "0"
        assert int(supervisor["CapEff"], 16) != 0
        assert "falls back" not in daemon.log() and "does not exist" not in daemon.log()


def test_drop_privileges_false_keeps_user_but_sets_no_new_privs(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", drop_privileges=False)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        status = read_status_fields(f"/proc/{idle_worker(daemon)}/status")
        assert status["Uid"].split()[0] == str(os.getuid())
        assert status["NoNewPrivs"] == "1"


def test_worker_keeps_only_its_channel_and_titles(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, timeout_ms=30000)
    with running_daemon(kernel, gated_engine, config=text, directory=directory) as daemon:
        assert process_title(daemon.pid).startswith("tlshd: supervisor")
        # Two requests in flight: each worker holds exactly its channel and its own socket.
        peers = [Peer(kernel), Peer(kernel)]
        # Busy from the hand-off on; the phase shows the worker holds its socket.
        doc = daemon.wait_for(
            lambda d: (
                [w["phase"] for w in d["workers"] if w["state"] == "busy"] == ["clienthello"] * 2
            ),
            what="two in flight",
        )
        daemon.wait_for(lambda d: d["queued"] == 0, what="queue empty")
        for worker in doc["workers"]:
            if worker["state"] != "busy":
                continue
            assert len(socket_fds(worker["pid"])) == 2, socket_fds(worker["pid"])
            title = wait_for_title(worker["pid"], "tlshd: worker 127.0.0.1:", "clienthello")
            assert title.startswith("tlshd: worker 127.0.0.1:"), title
            assert title.endswith("clienthello"), title
        # A worker forked while two accepted sockets are open inherits neither.
        doc = daemon.wait_for(
            lambda d: any(w["state"] == "idle" and w["pid"] for w in d["workers"]),
            what="spare worker",
        )
        spare = next(w["pid"] for w in doc["workers"] if w["state"] == "idle" and w["pid"])
        assert len(socket_fds(spare)) == 1, socket_fds(spare)
        assert wait_for_title(spare, "tlshd: worker idle").startswith("tlshd: worker idle")
        for peer in peers:
            peer.release()
            assert peer.request.wait_done(10)[0] == 0


def test_worker_exits_when_supervisor_dies(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        pid = idle_worker(daemon)
        daemon.signal(9)
        daemon.wait()
        wait_until(lambda: exited(pid), what="the orphaned worker's exit")


def exited(pid: int) -> bool:
    """The process is gone, or a zombie that has finished running."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_unknown_worker_user_stops_the_daemon(kernel: FakeKernel) -> None:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", user="no-such-user-tlshd")
    if os.geteuid() != 0:
        pytest.skip("the worker user is only looked up when running as root")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(directory / "notify.sock")}
    daemon = start_daemon(
        kernel, gated_engine, config=text, directory=directory, wait_ready=False, environ=env
    )
    try:
        assert daemon.wait() == 1
        notify.settimeout(5)
        lines: list[str] = []
        while "STOPPING=1" not in lines:
            lines += notify.recv(4096).decode().splitlines()
        assert "READY=1" not in lines  # systemd sees a failed start, not a ready daemon
        log = daemon.log()
        assert "'no-such-user-tlshd' does not exist" in log
        assert "workers cannot start" in log
        assert log.count("spawned worker") <= 2  # no respawn loop
    finally:
        daemon.stop()
