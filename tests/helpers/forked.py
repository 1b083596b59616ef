"""Run a piece of a test in a forked child (seccomp filters, prepared contexts:
state a test must not leave in its own process)."""

from __future__ import annotations

import os
from collections.abc import Callable


def run_in_child(job: Callable[[], bytes]) -> bytes:
    """What `job` returned in a forked child; the child must exit 0.

    Nested calls work: a child may run a job in a grandchild."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, job())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child failed ({status:#x}): {data!r}"
    return data
