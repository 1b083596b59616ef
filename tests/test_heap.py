"""tlshd/heap.py: freed start-up memory goes back to the kernel, and the
daemon's processes take no transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import os
from tlshd.heap import trim_heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

# 40 MiB of 4 KiB blocks from glibc (not pymalloc, which takes <= 512 bytes),
# one in 64 kept, so glibc cannot simply shrink the top of its heap.
blocks = [bytearray(4096) for _ in range(10240)]
kept = blocks[::64]
del blocks
before = rss()
released = trim_heap()
after = rss()
print(released, before - after)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_trim_returns_free_heap_pages_to_the_kernel() -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    released, freed_bytes = proc.stdout.split()
    assert released == "True"
    assert int(freed_bytes) > 20 * 2**20, f"only {int(freed_bytes)} bytes released"


THP_CODE = """
import os
from tlshd.heap import refuse_huge_pages

def thp_enabled():
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("THP_enabled:"))

before = thp_enabled()
taken = refuse_huge_pages()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, thp_enabled().encode())
    os._exit(0)
os.waitpid(pid, 0)
print(before, taken, thp_enabled(), os.read(read, 8).decode())
"""


def _status_has_thp_field() -> bool:
    with open("/proc/self/status") as status:
        return any(line.startswith("THP_enabled:") for line in status)


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status") or not _status_has_thp_field(),
    reason="needs /proc/self/status with THP_enabled (Linux 5.0)",
)
def test_huge_pages_refused_for_the_process_and_the_children_it_forks() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", THP_CODE], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    before, taken, after, child = proc.stdout.split()
    assert before == "1"  # the control: a process may take huge pages until it refuses
    assert (taken, after, child) == ("True", "0", "0")
