"""tlshd/proctitle.py: `ps` shows our titles, `pidof tlshd` and `pgrep -x tlshd` still find us."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import gated_engine

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)

TITLED = """
import sys
from {module} import {function}
{function}("tlshd: worker idle")
print("titled", flush=True)
sys.stdin.read()
"""


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def found_by(*command: str) -> set[int]:
    """PIDs printed by pgrep/pidof (exit 1 = none found)."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert proc.returncode in (0, 1), proc.stderr
    return {int(p) for p in proc.stdout.split()}


FINDERS = [("pgrep", "-x", "tlshd"), ("pidof", "tlshd")]


@pytest.fixture
def titled() -> Iterator[Callable[[str, str], int]]:
    procs: list[subprocess.Popen[str]] = []

    def start(module: str, function: str) -> int:
        proc = subprocess.Popen(
            [sys.executable, "-c", TITLED.format(module=module, function=function)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "titled\n"
        return proc.pid

    yield start
    for proc in procs:
        proc.communicate(timeout=30)


@pytest.mark.parametrize("finder", FINDERS, ids=lambda f: f[0])
def test_set_title_keeps_the_name_pidof_and_pgrep_match(
    titled: Callable[[str, str], int], finder: tuple[str, ...]
) -> None:
    if not shutil.which(finder[0]):
        pytest.skip(f"{finder[0]} not installed")
    ours = titled("tlshd.proctitle", "set_title")
    plain = titled("setproctitle", "setproctitle")  # the library alone, as before
    assert title(ours) == title(plain) == "tlshd: worker idle"
    assert comm(ours) == "tlshd"
    assert comm(plain) == "tlshd: worker i"  # what the library writes to comm
    found = found_by(*finder)
    assert ours in found and plain not in found


def test_the_daemon_is_found_by_name(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        workers = [w["pid"] for w in daemon.status()["workers"]]
        assert workers
        assert title(daemon.pid) == "tlshd: supervisor"
        for pid in (daemon.pid, *workers):
            assert comm(pid) == "tlshd", pid
        assert {daemon.pid, *workers} <= found_by("pgrep", "-x", "tlshd")
        if shutil.which("pidof"):
            assert daemon.pid in found_by("pidof", "tlshd")


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    with FakeKernel() as fake:
        yield fake
