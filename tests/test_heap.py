"""tlshd/heap.py: freed start-up memory goes back to the kernel."""

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
