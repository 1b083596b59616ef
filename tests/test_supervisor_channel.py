"""A worker that closes its channel but lives on is killed.

Without its channel the supervisor can no longer see what the worker does,
and it may still hold a consumer's socket: the request fails with EIO at once
and the process is SIGKILLed, not left running.
"""

from __future__ import annotations

import errno
import time

import psutil
import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import Peer, channel_closing_engine

pytestmark = pytest.mark.timeout(120)


def test_worker_that_closes_its_channel_is_killed(kernel: FakeKernel) -> None:
    with running_daemon(kernel, channel_closing_engine) as daemon:
        doc = daemon.wait_for(lambda d: len(d["workers"]) == 1, what="the one idle worker")
        (pid,) = {w["pid"] for w in doc["workers"]}
        peer = Peer(kernel)
        assert peer.request.wait_done(10) == (errno.EIO, ())
        end = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < end, "the worker lives on without its channel"
            time.sleep(0.05)
        peer.close()
