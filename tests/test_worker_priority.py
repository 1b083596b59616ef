"""workers/priority.py: the handshakes whose timers have run longest get the
CPU first.  A worker's nice value goes from 0 at ACCEPT down one level per
0.125 s of its request's age, to -20; the zygote runs at -20.
"""

from __future__ import annotations

import json
import os
import resource
import time

import pytest
from tlshd.workers import priority
from tlshd.workers.priority import AGING_STEP_S, FLOOR_NICE, AgingPriority, nice_for

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import recv_exactly, running_daemon
from tests.helpers.engines import Peer, nice_engine
from tests.helpers.forked import run_in_child

pytestmark = pytest.mark.timeout(120)


def can_raise_nice_limit() -> bool:
    """Whether this process may set RLIMIT_NICE to 40: root with
    CAP_SYS_RESOURCE, or a hard limit already there (tried in a child)."""

    def attempt() -> bytes:
        try:
            resource.setrlimit(resource.RLIMIT_NICE, (40, 40))
        except (OSError, ValueError):
            return b"no"
        return b"yes"

    return run_in_child(attempt) == b"yes"


needs_nice_limit = pytest.mark.skipif(
    not can_raise_nice_limit(), reason="RLIMIT_NICE cannot reach 40 here (no CAP_SYS_RESOURCE)"
)


def test_a_fresh_request_runs_at_nice_zero() -> None:
    assert nice_for(0.0) == 0
    assert nice_for(AGING_STEP_S * 0.99) == 0  # every handshake outside a burst
    assert nice_for(-1.0) == 0  # a clock read before the accept: no age


def test_one_level_per_step_of_age_down_to_the_floor() -> None:
    assert nice_for(AGING_STEP_S) == -1
    assert nice_for(1.0) == -8
    assert nice_for(2.49) == -19
    assert nice_for(2.5) == FLOOR_NICE == -20
    assert nice_for(60.0) == FLOOR_NICE


def test_an_older_request_never_has_the_higher_nice_value() -> None:
    accepted = [i * 0.01 for i in range(400)]  # one request every 10 ms
    for now in (1.2, 2.0, 3.5, 6.0):
        levels = [nice_for(now - t) for t in accepted if t <= now]
        assert levels == sorted(levels), (now, levels)


def test_nfsd_requests_reach_the_floor_well_inside_nfsds_timer() -> None:
    assert -FLOOR_NICE * AGING_STEP_S <= 2.5 < 5.0  # SVC_HANDSHAKE_TO


def test_the_schedule_calls_setpriority_once_per_level(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args))
    schedule = AgingPriority(accepted_at=50.0)
    for now in (50.0, 50.1, 50.13, 50.2, 50.26, 50.3, 50.6, 51.0, 52.6, 90.0):
        schedule.keep_up(now)
    assert calls == [(os.PRIO_PROCESS, 0, n) for n in (0, -1, -2, -4, -8, -20)]
    assert schedule.next_change == float("inf")  # at the floor: nothing more to do


@needs_nice_limit
def test_a_worker_steps_down_as_its_request_ages() -> None:
    def child() -> bytes:
        assert priority.permit_priority_floor()
        schedule = AgingPriority(accepted_at=100.0)
        seen = []
        for now in (100.0, 100.1, 101.0, 101.2, 103.0, 200.0):
            schedule.keep_up(now)
            seen.append(os.getpriority(os.PRIO_PROCESS, 0))
        return json.dumps(seen).encode()

    assert json.loads(run_in_child(child)) == [0, 0, -8, -9, -20, -20]


def test_without_the_limit_nothing_changes() -> None:
    def child() -> bytes:
        resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
        if priority.permit_priority_floor():  # root may raise the limit again
            priority._may_raise = False
        before = os.getpriority(os.PRIO_PROCESS, 0)
        assert not priority.run_zygote_at_floor()
        priority.follow(waited_s=1.0)
        priority.keep_up()
        return str(os.getpriority(os.PRIO_PROCESS, 0) - before).encode()

    assert run_in_child(child) == b"0"


@needs_nice_limit
def test_through_the_daemon_a_request_that_waited_runs_at_a_lower_nice_value() -> None:
    """One worker at most: the second request waits in the queue while the
    first is served, and its worker starts below nice 0, under its seccomp
    filter; an idle spare sits at the zygote's floor."""
    with (
        FakeKernel() as kernel,
        running_daemon(kernel, nice_engine, min_workers=1, max_workers=1) as daemon,
    ):
        daemon.wait_for(
            lambda d: any(w["state"] == "idle" and w["pid"] for w in d["workers"]),
            what="a spare worker",
        )
        spare = next(w["pid"] for w in daemon.status()["workers"] if w["pid"])
        spare_nice = os.getpriority(os.PRIO_PROCESS, spare)
        first = Peer(kernel)
        daemon.wait_for(lambda d: d["in_flight"] == 1, what="the first in flight")
        second = Peer(kernel)
        daemon.wait_for(lambda d: d["queued"] == 1, what="the second queued")
        time.sleep(1.0)
        levels = []
        for peer in (first, second):
            peer.client.sendall(b"g")
            levels.append(int(recv_exactly(peer.client, 3)))
            assert peer.request.wait_done(10) == (0, ())
            peer.close()
    assert spare_nice == FLOOR_NICE
    assert levels[0] == 0, levels
    assert FLOOR_NICE <= levels[1] <= -8, levels  # waited over 1 s
