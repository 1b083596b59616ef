"""Giving the start-up's freed heap back to the kernel.

Start-up allocates and frees a lot that a long-running process never needs
again: import machinery, config parsing, and in the zygote the PEM parsing
and the warm-up handshake.  glibc keeps freed blocks in its heap, so those
pages stay resident: private to the supervisor, and in the zygote shared
copy-on-write with every worker forked from it.  malloc_trim(0) returns every
whole free page of the heap to the kernel (not just the top: glibc >= 2.8
madvises free pages in the middle too).  In the lab guest that took the idle
daemon's tree from 39.9-42.5 to 38.7-41.3 MiB PSS (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes


def trim_heap() -> bool:
    """malloc_trim(0) where the C library has it (glibc; not musl); True if
    memory was released."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
