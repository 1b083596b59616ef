#!/usr/bin/env python3
"""What a single-use worker costs besides its handshake, on the host.

Forks N children of a warm, gc.freeze()d process that imported the engine
(as the zygote is) and reports the children's CPU and minor page faults per
child (RUSAGE_CHILDREN) for: fork + exit; fork + the seccomp filter compiled
by libseccomp in the child (each worker before this change); fork + the
program the parent compiled once, patched with the child's pid and loaded
with prctl (workers/seccomp.py `prepare_worker_filter`).  No kernel TLS, no
QEMU.

    python3 benchmarks/worker_overhead.py [-n 200]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tlshd.openssl_conf import ensure_openssl_conf

ensure_openssl_conf()

import tlshd.workers.engine  # noqa: E402, F401  (the zygote's imports)
from tlshd.workers import seccomp  # noqa: E402

from tests.helpers.forked import run_in_child  # noqa: E402


def per_child(action: Callable[[], None], n: int) -> tuple[float, float]:
    """(CPU ms, minor faults) per forked child that runs `action` and exits."""

    def job() -> bytes:
        action()
        return b""

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        run_in_child(job)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu * 1000 / n, (after.ru_minflt - before.ru_minflt) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200)
    n = ap.parse_args().n
    gc.freeze()
    rows = [("fork + exit", per_child(lambda: None, n))]
    rows.append(
        ("fork + seccomp compiled in the child", per_child(seccomp.install_worker_filter, n))
    )
    if not seccomp.prepare_worker_filter():
        raise SystemExit("the prepared program did not match libseccomp's")
    gc.freeze()
    rows.append(
        ("fork + seccomp prepared by the parent", per_child(seccomp.install_worker_filter, n))
    )
    for name, (cpu, faults) in rows:
        print(f"{name:40s} {cpu:6.2f} ms CPU {faults:7.0f} minor faults per child")
    return 0


if __name__ == "__main__":
    sys.exit(main())
