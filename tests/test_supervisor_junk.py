"""Workers are untrusted: junk on the channel kills the worker and fails its
request with EIO at once; the supervisor carries on."""

from __future__ import annotations

import errno
import time

import psutil
import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import Peer, junk_engine

pytestmark = pytest.mark.timeout(120)

JUNK_KINDS = [
    "not-json",
    "unknown-op",
    "wrong-req",
    "status-out-of-range",
    "bool-status",
    "foreign-remote-auth",
    "sends-fd",
    "ready-again",
    "phase-not-string",
    "deep-nesting",
    "deep-nesting-in-object",
    "lone-surrogate",
    "huge-int",
]


def wait_gone(pid: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while psutil.pid_exists(pid):
        assert time.monotonic() < end, f"worker {pid} still exists"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def daemon(module_kernel: FakeKernel):  # type: ignore[no-untyped-def]
    with running_daemon(module_kernel, junk_engine) as running:
        yield running


@pytest.mark.parametrize("kind", JUNK_KINDS)
def test_junk_kills_worker_and_fails_request(module_kernel: FakeKernel, daemon, kind: str) -> None:  # type: ignore[no-untyped-def]
    peer = Peer(module_kernel, peername=kind, timeout_ms=60000)
    peer.request.wait_accepted(10)
    doc = daemon.wait_for(
        lambda d: any(w["peer"] and w["pid"] for w in d["workers"]) or d["done"],
        what="request handed out",
    )
    pids = {w["pid"] for w in doc["workers"] if w["peer"] and w["pid"]}
    started = time.monotonic()
    assert peer.request.wait_done(15) == (errno.EIO, ())
    assert time.monotonic() - started < 15  # not the 60 s deadline
    assert "sent an invalid message" in daemon.log()
    for pid in pids:
        wait_gone(pid)  # killed, then reaped by the daemon
    # The supervisor is unaffected and still serves.
    good = Peer(module_kernel)
    assert good.release() == b"4000\n"
    assert good.request.wait_done(10) == (0, ())
    peer.close()
    good.close()


def test_every_junk_request_got_exactly_one_done(module_kernel: FakeKernel, daemon) -> None:  # type: ignore[no-untyped-def]
    assert all(r.done_count == 1 for r in module_kernel.requests if r.completed.is_set())
    assert module_kernel.done_errors == 0
