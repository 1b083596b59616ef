"""Giving the start-up's freed heap back to the kernel, and keeping huge
pages out of the heap.

Start-up allocates and frees a lot that a long-running process never needs
again: import machinery, config parsing, and in the zygote the PEM parsing
and the warm-up handshake.  glibc keeps freed blocks in its heap, so those
pages stay resident: private to the supervisor, and in the zygote shared
copy-on-write with every worker forked from it.  malloc_trim(0) returns every
whole free page of the heap to the kernel (not just the top: glibc >= 2.8
madvises free pages in the middle too).  In the lab guest that took the idle
daemon's tree from 39.9-42.5 to 38.7-41.3 MiB PSS (benchmarks/README.md).

Transparent huge pages work the other way: with THP "always" (Debian's
kernels), a fault anywhere in a 2 MiB-aligned stretch of the heap can map a
whole huge page, resident and private however little of it is used.  In the
7.3 lab guest that left the idle supervisor 4-6 MiB of AnonHugePages in six
starts of eight, and the daemon 2-4 MiB more PSS than in the other two
(benchmarks/README.md).  None of our processes has a heap that a TLB would
notice, so the daemon opts out for itself and every process it forks.
"""

from __future__ import annotations

import ctypes

# <linux/prctl.h>; Linux 3.15.  Inherited by fork(2) children, kept across execve(2).
PR_SET_THP_DISABLE = 41


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


def refuse_huge_pages() -> bool:
    """prctl(PR_SET_THP_DISABLE) for this process and its future children;
    True if the kernel took it.  Pages already mapped huge stay huge, so
    call it before the heap grows."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (AttributeError, OSError):
        return False
    prctl.restype = ctypes.c_int
    # prctl(2) is variadic and the kernel reads full longs: arguments 3-5
    # must be 0 in all 64 bits, which a C int passed to `...` does not promise.
    zero = ctypes.c_ulong(0)
    return bool(prctl(PR_SET_THP_DISABLE, ctypes.c_ulong(1), zero, zero, zero) == 0)
