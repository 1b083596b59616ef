"""supervisor/priority.py: the supervisor runs real-time; nothing it forks does."""

from __future__ import annotations

import errno
import json
import os
import time

import psutil
import pytest
from tlshd.supervisor import priority

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import pair_engine
from tests.helpers.forked import run_in_child


def _can_be_real_time() -> bool:
    def job() -> bytes:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            return b"no"
        return b"yes"

    return run_in_child(job) == b"yes"


needs_rt = pytest.mark.skipif(
    not _can_be_real_time(), reason="this process may not use SCHED_FIFO (no CAP_SYS_NICE)"
)


def _policy_of(pid: int) -> int:
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK


def _policy() -> int:
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK


@needs_rt
def test_supervisor_is_fifo_and_its_children_are_not() -> None:
    def job() -> bytes:
        got = priority.raise_supervisor_priority()
        mine = (_policy(), os.sched_getparam(0).sched_priority, priority.is_real_time())
        # A forked child (a zygote, then its workers) is back to SCHED_OTHER.
        child = json.loads(
            run_in_child(
                lambda: json.dumps([_policy(), os.getpriority(os.PRIO_PROCESS, 0)]).encode()
            )
        )
        return json.dumps([got, list(mine), child]).encode()

    got, mine, child = json.loads(run_in_child(job))
    assert got == "SCHED_FIFO 1"
    assert mine == [os.SCHED_FIFO, 1, True]
    assert child == [os.SCHED_OTHER, 0]


def test_without_real_time_it_falls_back_to_nice(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)

    def job() -> bytes:
        got = priority.raise_supervisor_priority()
        return json.dumps(
            [got, os.getpriority(os.PRIO_PROCESS, 0), priority.is_real_time()]
        ).encode()

    got, nice, real_time = json.loads(run_in_child(job))
    assert not real_time
    if os.geteuid() == 0:
        assert (got, nice) == ("nice -5", -5)
    else:  # no CAP_SYS_NICE: the inherited value stays
        assert got == f"nice {nice}"


@needs_rt
def test_a_policy_set_by_the_service_manager_is_kept() -> None:
    """Under the unit, systemd made it SCHED_FIFO and RestrictRealtime=yes refuses more."""

    def job() -> bytes:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return priority.raise_supervisor_priority().encode()

    assert run_in_child(job) == b"SCHED_FIFO 1 (inherited)"


@needs_rt
def test_the_zygote_drops_a_real_time_policy_inherited_without_reset_on_fork() -> None:
    from tlshd.workers.zygote import ordinary_scheduling

    def job() -> bytes:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # no SCHED_RESET_ON_FORK
        os.setpriority(os.PRIO_PROCESS, 0, -5)
        ordinary_scheduling()
        return json.dumps([_policy(), os.getpriority(os.PRIO_PROCESS, 0)]).encode()

    assert json.loads(run_in_child(job)) == [os.SCHED_OTHER, 0]


@needs_rt
def test_a_serving_daemon_has_a_real_time_supervisor_and_ordinary_workers(
    kernel: FakeKernel,
) -> None:
    with running_daemon(kernel, pair_engine) as daemon:
        # Raised in the pass that sends READY, which may end just after the
        # status reply the helper waited on.
        deadline = time.monotonic() + 10
        while _policy_of(daemon.pid) != os.SCHED_FIFO and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _policy_of(daemon.pid) == os.SCHED_FIFO
        children = psutil.Process(daemon.pid).children(recursive=True)
        assert children  # the zygote and its spare workers
        for child in children:
            assert os.sched_getscheduler(child.pid) == os.SCHED_OTHER, child
            assert os.getpriority(os.PRIO_PROCESS, child.pid) >= 0, child


# --- the daemon's session (autogroup) ------------------------------------------------


def test_a_session_leader_gives_its_session_the_weight_of_nice_minus_20(tmp_path) -> None:
    target = tmp_path / "autogroup"
    target.write_text("")

    def leader() -> bytes:
        os.setsid()
        return priority.raise_session_share(str(target)).encode()

    assert run_in_child(leader) == b"autogroup nice -20"
    assert target.read_text() == "-20\n"


def test_outside_its_own_session_the_daemon_leaves_the_autogroup_alone(tmp_path) -> None:
    # Started from a shell: the session, and its other jobs, are the user's.
    target = tmp_path / "autogroup"
    target.write_text("untouched")

    def member() -> bytes:
        if os.getsid(0) == os.getpid():  # pytest itself leads a session: leave it
            pid = os.fork()
            if pid == 0:
                os._exit(0 if priority.raise_session_share(str(target)).startswith("not") else 1)
            return str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])).encode()
        return b"0" if priority.raise_session_share(str(target)).startswith("not") else b"1"

    assert run_in_child(member) == b"0"
    assert target.read_text() == "untouched"


def test_a_refused_autogroup_write_is_reported_not_raised(tmp_path) -> None:
    def leader() -> bytes:
        os.setsid()
        return priority.raise_session_share(str(tmp_path / "missing" / "autogroup")).encode()

    assert run_in_child(leader).startswith(b"autogroup nice unchanged: ")


def test_the_real_autogroup_file_takes_the_write_where_the_kernel_has_one() -> None:
    if not os.path.exists(priority.AUTOGROUP_PATH):
        pytest.skip("kernel without CONFIG_SCHED_AUTOGROUP")

    def leader() -> bytes:
        os.setsid()
        said = priority.raise_session_share()
        with open(priority.AUTOGROUP_PATH) as f:
            return json.dumps([said, f.read()]).encode()

    said, now = json.loads(run_in_child(leader))
    if said.startswith("autogroup nice unchanged"):
        pytest.skip(f"this process may not lower a nice value: {said}")
    assert said == "autogroup nice -20"
    assert now.endswith("nice -20\n"), now
