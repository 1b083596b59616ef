"""Handshakes whose consumer's timer has run longest get the CPU first.

Why.  Each consumer times its request from the moment it submitted it: nfsd
gives up 5 s after its submit (SVC_HANDSHAKE_TO), the sunrpc client after
10 s (XS_TLS_HANDSHAKE_TO).  In a boot-time burst the CPUs are saturated for
seconds, and requests that share them evenly all slow down together: the
oldest, with the least time left, overrun.  Served oldest first, a burst
delays its newest requests instead, which still have most of their time.
The kernel shares the CPU between sessions first (autogroup; the supervisor
gives the daemon's session the weight of nice -20, supervisor/priority.py:
raise_session_share, so that the mount.nfs processes a burst starts, which
no consumer timer is running for yet, wait for the handshakes), then among
the tasks of a session by their nice values: this module orders the
daemon's own processes.  Scheduler traces of 64-mount bursts in the lab (7.3
kernel, benchmarks/README.md, stop 13) are behind both.

How.  A worker's nice value follows its request's age: 0 when the request is
accepted, one level lower every AGING_STEP_S (0.125 s), down to FLOOR_NICE
(-20) after 2.5 s.  One nice level is a factor of 1.25 in CPU weight
(kernel/sched/core.c: sched_prio_to_weight): a request 1 s older gets about
six times the CPU of a newer one, one 1 s old weighs as much as 7 tasks at
nice 0, one 2 s old as 35, one at the floor as 87.  A handshake that ends
within 0.125 s never leaves nice 0.  Nothing blocks: a worker waiting for
its peer uses no CPU whatever its nice value, so the two halves of a
loopback connection cannot hold each other up.  (How many handshakes run at
once is the supervisor's to bound, supervisor/broker.py: a request that
waited there for room starts at the nice value of its age.)  The zygote runs
at FLOOR_NICE throughout: every fork it makes during a burst serves a
request that is already waiting.

The bound.  A nice value below 0 needs RLIMIT_NICE above 20 (setpriority(2):
an unprivileged process may lower its nice value to 20 - RLIMIT_NICE).  The
zygote raises the limit to 40 while still root (`permit_priority_floor`;
under the systemd unit, which grants no CAP_SYS_RESOURCE, `LimitNICE=-20`
sets it).  A worker taken over by its peer can then give itself nice -20 at
once and keep one CPU (it cannot fork or make threads: workers/seccomp.py)
until its deadline kills it, 10 s at most for NFS.  Its seccomp filter
allows setpriority on itself only.  Without the limit everything runs at
nice 0, as before.

The worker re-reads its schedule each time the engine is about to wait for
the socket (`keep_up`, from workers/engine.py), after every stretch of CPU
work: a clock read, and a setpriority call when the level changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

FLOOR_NICE = -20  # the oldest handshakes, and the zygote
AGING_STEP_S = 0.125  # one nice level per step of age: the floor after 2.5 s
FLOOR_RLIMIT = 20 - FLOOR_NICE  # RLIMIT_NICE that lets a process reach FLOOR_NICE

_may_raise = False  # whether this process may go down to FLOOR_NICE; set in the zygote


def permit_priority_floor() -> bool:
    """Raise RLIMIT_NICE so that the zygote and its workers may reach
    FLOOR_NICE; run in the zygote before it drops privileges.  True if they may."""
    global _may_raise
    import resource

    with contextlib.suppress(OSError, ValueError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
        if soft < FLOOR_RLIMIT:
            resource.setrlimit(resource.RLIMIT_NICE, (FLOOR_RLIMIT, max(hard, FLOOR_RLIMIT)))
    with contextlib.suppress(OSError, ValueError):
        _may_raise = resource.getrlimit(resource.RLIMIT_NICE)[0] >= FLOOR_RLIMIT
    return _may_raise


def run_zygote_at_floor() -> bool:
    """The zygote's nice value: FLOOR_NICE where permitted (see the module
    docstring); its spare workers inherit it until they are given a request."""
    if not _may_raise:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, FLOOR_NICE)
    except OSError:
        return False
    return True


def nice_for(age_s: float) -> int:
    """The nice value of a request accepted `age_s` seconds ago."""
    return max(FLOOR_NICE, -int(max(age_s, 0.0) / AGING_STEP_S))


class AgingPriority:
    """The schedule of one worker's request (see the module docstring)."""

    def __init__(self, accepted_at: float) -> None:
        self.accepted_at = accepted_at
        self.current: int | None = None
        self.next_change = accepted_at  # monotonic time of the next step down

    def keep_up(self, now: float | None = None) -> None:
        """Apply the level the request's age calls for, if it changed."""
        now = time.monotonic() if now is None else now
        if now < self.next_change:
            return
        age = now - self.accepted_at
        wanted = nice_for(age)
        self.next_change = (
            self.accepted_at + (int(age / AGING_STEP_S) + 1) * AGING_STEP_S
            if wanted > FLOOR_NICE
            else float("inf")
        )
        if wanted != self.current:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, wanted)
                self.current = wanted


# Per thread: setpriority(PRIO_PROCESS, 0) sets the calling thread's nice
# value on Linux (setpriority(2), "BUGS"), and a worker host's threads each
# follow their own request (workers/host.py).
_schedules = threading.local()


def follow(waited_s: float) -> None:
    """From now on this process (a single-use worker), or this thread of a
    worker host, follows the schedule of its request, accepted `waited_s`
    seconds ago; a no-op where it may not raise its priority."""
    if not _may_raise:
        return
    schedule = AgingPriority(time.monotonic() - max(waited_s, 0.0))
    _schedules.current = schedule
    schedule.keep_up()


def keep_up() -> None:
    """Called by the engine before each wait for the socket."""
    schedule: AgingPriority | None = getattr(_schedules, "current", None)
    if schedule is not None:
        schedule.keep_up()
