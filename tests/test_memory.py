"""supervisor/memory.py: the PSS of the daemon's process tree in `tlshd status`."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from tlshd.supervisor.memory import process_pss, tree_memory

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import gated_engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def kernel():  # type: ignore[no-untyped-def]
    with FakeKernel() as fake:
        yield fake


def test_tree_memory_lists_every_descendant_and_sums_their_pss() -> None:
    # a child and a grandchild, both blocked reading the pipe the test holds open
    code = (
        "import subprocess, sys\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'])\n"
        "print(grandchild.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        proc = psutil.Process(child.pid)
        grandchild = int(child.stdout.readline())  # type: ignore[union-attr]
        memory = tree_memory(os.getpid())
        by_pid = {p["pid"]: p["pss_bytes"] for p in memory["processes"]}
        ours = {os.getpid(), child.pid, grandchild}
        assert ours <= by_pid.keys()
        # (other descendants may be zombies left by earlier tests: PSS 0)
        assert all(isinstance(by_pid[pid], int) and by_pid[pid] > 0 for pid in ours), by_pid
        assert memory["complete"]
        assert memory["total_pss_bytes"] == sum(by_pid.values())
        # PSS splits shared pages: the child's PSS is below its RSS
        assert by_pid[child.pid] < proc.memory_info().rss
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(30)


def test_vanished_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    assert process_pss(child.pid) is None


def test_unknown_root_is_empty_not_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    memory = tree_memory(child.pid)
    assert memory == {"total_pss_bytes": None, "complete": False, "processes": []}


def test_status_document_carries_the_pss_of_supervisor_and_workers(kernel: FakeKernel) -> None:
    with running_daemon(kernel, gated_engine) as daemon:
        doc = daemon.status()
        memory = doc["memory"]
        pids = {p["pid"] for p in memory["processes"]}
        worker_pids = {w["pid"] for w in doc["workers"]}
        assert worker_pids and {doc["pid"], *worker_pids} <= pids
        assert memory["complete"], memory  # the test runs as the workers' owner or as root
        readable = [p["pss_bytes"] for p in memory["processes"]]
        assert memory["total_pss_bytes"] == sum(readable)
