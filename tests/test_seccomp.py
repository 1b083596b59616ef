"""The worker's seccomp filter (issue 11 #5): a compromised worker cannot fork
(and so keep the consumer's socket past DONE), exec, open sockets, reach the
kernel's netlink, read keys or signal other processes; honest work goes on.

`escape_engine` plays a worker whose engine a peer has taken over: it tries
each escape and reports what happened to the peer, one line per attempt.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from tlshd.workers import seccomp

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import recv_exactly, running_daemon
from tests.helpers.engines import Peer, fake_ktls, gated_engine
from tests.helpers.forked import run_in_child
from tlshd.params import HandshakeParams, HandshakeResult

pytestmark = pytest.mark.timeout(120)


def _attempts(sock: socket.socket) -> dict[str, Any]:
    """Each escape as a thunk; a thunk returning means the call succeeded."""

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def exec_() -> None:
        os.execv("/bin/true", ["true"])

    def netlink() -> None:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16).close()  # NETLINK_GENERIC

    def inet() -> None:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()

    def nonblock() -> None:
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, os.O_NONBLOCK)

    def dup() -> None:
        os.close(os.dup(sock.fileno()))

    def shutdown() -> None:
        sock.shutdown(socket.SHUT_RDWR)

    def kill_parent() -> None:
        os.kill(os.getppid(), 0)

    def renice_other() -> None:
        os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)

    def renice_group() -> None:
        os.setpriority(os.PRIO_PGRP, 0, 19)

    def keyctl() -> None:
        from tlshd import keyring

        keyring.get_keyring_id(keyring.KEY_SPEC_SESSION_KEYRING)

    return {
        "fork": fork,
        "exec": exec_,
        "netlink": netlink,
        "inet": inet,
        "nonblock": nonblock,
        "dup": dup,
        "shutdown": shutdown,
        "kill-parent": kill_parent,
        "renice-other": renice_other,
        "renice-group": renice_group,
        "keyctl": keyctl,
    }


ESCAPES = list(_attempts(socket.socket()).keys())


def escape_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    lines = []
    for name, attempt in _attempts(sock).items():
        try:
            attempt()
            outcome = "ALLOWED"
        except OSError as err:
            outcome = errno.errorcode.get(err.errno or 0, str(err.errno))
        except Exception as err:  # keyring errors wrap their errno
            outcome = errno.errorcode.get(getattr(err, "errno", 0) or 0, type(err).__name__)
        lines.append(f"{name} {outcome}")
    os.kill(os.getpid(), 0)  # signalling itself stays allowed
    # and its own nice value (workers/priority.py)
    os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + 1)
    time.sleep(0.001)
    sock.sendall(("\n".join(lines) + "\n.\n").encode())
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE")


def read_report(sock: socket.socket) -> dict[str, str]:
    data = b""
    while not data.endswith(b"\n.\n"):
        data += recv_exactly(sock, 1)
    return dict(line.split(" ", 1) for line in data.decode().splitlines()[:-1])


def test_a_taken_over_worker_cannot_escape() -> None:
    with FakeKernel() as kernel, running_daemon(kernel, escape_engine) as daemon:
        peer = Peer(kernel)
        report = read_report(peer.client)
        assert peer.request.wait_done(10) == (0, ())
        assert report == dict.fromkeys(ESCAPES, "EPERM"), report
        assert "seccomp" not in daemon.log()
        peer.close()


def test_honest_workers_serve_under_the_filter() -> None:
    with FakeKernel() as kernel, running_daemon(kernel, gated_engine) as daemon:
        for _ in range(3):
            peer = Peer(kernel)
            assert peer.release() == b"4000\n"
            assert peer.request.wait_done(10) == (0, ())
            peer.close()
        # A spare has said `ready`, which a worker does only after its filter is in.
        status = daemon.wait_for(
            lambda d: any(w["state"] == "idle" and w["pid"] for w in d["workers"]),
            what="an idle worker",
        )
        worker = next(w for w in status["workers"] if w["state"] == "idle" and w["pid"])
        with open(f"/proc/{worker['pid']}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        assert fields["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER


def test_filter_in_a_forked_child() -> None:
    """Directly, without a daemon: the child installs the filter and reports."""

    def confined() -> bytes:
        seccomp.install_worker_filter()
        try:
            os.fork()
        except PermissionError:
            return b"fork EPERM"
        return b"fork allowed"

    assert run_in_child(confined) == b"fork EPERM"


# --- the program compiled once by the zygote ---------------------------------------


@pytest.mark.parametrize("pid", [1, 4242, 4_194_303])  # 2^22 - 1: PID_MAX_LIMIT's last pid
def test_the_prepared_program_is_what_libseccomp_compiles_for_that_pid(pid: int) -> None:
    prepared = seccomp.compiled_program(seccomp.PID_SENTINEL)
    assert seccomp.program_for(prepared, pid) == seccomp.compiled_program(pid)
    assert seccomp.program_for(prepared, pid) != prepared  # the pid is in the program


def test_a_worker_confined_by_the_prepared_program() -> None:
    """A child of a process that prepared the program (as workers of the zygote):
    other processes may not be signalled, itself may; fork and socket fail."""

    def worker() -> bytes:
        seccomp.install_worker_filter()
        outcomes = []
        for name, attempt in (
            ("kill-parent", lambda: os.kill(os.getppid(), 0)),
            ("kill-self", lambda: os.kill(os.getpid(), 0)),
            ("socket", lambda: socket.socket().close()),
            ("fork", os.fork),
        ):
            try:
                attempt()
                outcomes.append(f"{name}:ok")
            except PermissionError:
                outcomes.append(f"{name}:EPERM")
        return " ".join(outcomes).encode()

    def zygote() -> bytes:
        assert seccomp.prepare_worker_filter()
        return run_in_child(worker)

    answer = run_in_child(zygote).decode()
    assert answer == "kill-parent:EPERM kill-self:ok socket:EPERM fork:EPERM"


def _run_snippet(code: str) -> None:
    """Run `code` in a fresh interpreter, where nothing has imported pyseccomp yet."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_pyseccomp_loads_without_running_ldconfig() -> None:
    # ctypes.util.find_library runs `ldconfig -p` per name: ~0.1 s of the
    # zygote's start-up under emulation (workers/seccomp.py, _import_pyseccomp).
    code = (
        "import ctypes.util, subprocess\n"
        "real = ctypes.util.find_library\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError(f'ran {a[0]!r}')\n"
        "subprocess.Popen = refuse\n"
        "from tlshd.workers import seccomp\n"
        "assert seccomp.load_error() is None, seccomp.load_error()\n"
        "assert ctypes.util.find_library is real\n"
    )
    _run_snippet(code)


def test_pyseccomp_loads_without_importing_ctypes_util() -> None:
    # ctypes.util imports shutil, subprocess and tempfile: start-up time, and
    # pages in every worker's copy-on-write heap (workers/seccomp.py).
    code = (
        "import sys\n"
        "from tlshd.workers import seccomp\n"
        "assert seccomp.load_error() is None, seccomp.load_error()\n"
        "import ctypes\n"
        "names = ('ctypes.util', 'subprocess', 'shutil', 'tempfile')\n"
        "left = [m for m in names if m in sys.modules]\n"
        "assert not left and not hasattr(ctypes, 'util'), left\n"
        "import ctypes.util\n"
        "assert ctypes.util.find_library('c')\n"
    )
    _run_snippet(code)


def test_a_soname_the_loader_cannot_load_falls_back_to_the_real_lookup() -> None:
    code = (
        "import sys\n"
        "from tlshd.workers import seccomp\n"
        "sys.modules.pop('pyseccomp')\n"
        "seccomp._SONAMES['seccomp'] = 'libseccomp.so.999'\n"
        "module = seccomp._import_pyseccomp()\n"
        "assert module.SyscallFilter\n"
        "import ctypes\n"
        "assert 'ctypes.util' not in sys.modules and not hasattr(ctypes, 'util')\n"
    )
    _run_snippet(code)
