"""The supervisor's CPU priority: it must run the moment the kernel needs it.

The kernel keeps at most hn_pending_max unaccepted handshake requests per
network namespace (net/handshake/netlink.c: 20 on an 8 GiB host) and refuses
the next submission with EAGAIN.  nfsd and the sunrpc client then drop that
connection and retry later, and the half of it that was already accepted
fails with "peer closed".  Whether a burst overflows that list depends only
on how soon the supervisor ACCEPTs after READY, and that is a scheduling
question: during a boot-time burst the handshaking workers, mount.nfs and
modprobe keep both CPUs busy.  A scheduler trace of a 32-mount burst in the
lab (benchmarks/README.md) showed the supervisor at nice -5 runnable but
waiting 60-130 ms of every 100 ms, behind workers and modprobe, while 19
requests sat in the kernel: 8.5 s of waiting in a 64-mount burst.  At nice
-20 it still waited 4.2-4.5 s, with 19 pending and refusals.

So the supervisor, once it has sent READY (before that, start-up is the
zygote's race: a real-time supervisor from its start on made READY 0.35 s
later in two lab A/B pairs), asks for the lowest real-time priority,
SCHED_FIFO 1: it preempts every ordinary task as soon as it is woken, and
the kernel's RT balancing moves it to a CPU that runs ordinary tasks. It
cannot starve the machine: it sleeps in epoll between events, uses about
10 % of one CPU at the peak of a burst, and the kernel caps all real-time
tasks at 95 % of each period anyway (kernel.sched_rt_runtime_us).
SCHED_RESET_ON_FORK gives every process it forks (zygotes, and through them
workers) the ordinary policy back, so no process that parses network input
ever runs real-time; the zygote also drops a real-time policy it finds
(workers/zygote.py: ordinary_scheduling), in case one was inherited without
that flag.

Without CAP_SYS_NICE (an unprivileged container, a test run as a user), or
where RT group scheduling leaves no RT budget to the daemon's cgroup (EPERM),
it falls back to nice -5, and to nothing at all.
"""

from __future__ import annotations

import os

from tlshd.workers.priority import FLOOR_NICE

from tlshd.log import log

SUPERVISOR_RT_PRIORITY = 1  # the lowest: kernel threads that ask for RT stay above it
SUPERVISOR_NICE = -5


def raise_supervisor_priority() -> str:
    """Make the calling process real-time (or nicer); what it got, for the log.

    Under the shipped systemd unit the service manager has already made it
    SCHED_FIFO (CPUSchedulingPolicy=fifo): its RestrictRealtime=yes then
    refuses any further RT request, and the unit grants no CAP_SYS_NICE."""
    if is_real_time():
        return f"SCHED_FIFO {os.sched_getparam(0).sched_priority} (inherited)"
    try:
        os.sched_setscheduler(
            0,
            os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
            os.sched_param(SUPERVISOR_RT_PRIORITY),
        )
        return f"SCHED_FIFO {SUPERVISOR_RT_PRIORITY}"
    except OSError as err:
        log.debug("no real-time priority for the supervisor: %s", err.strerror or err)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, SUPERVISOR_NICE)
        return f"nice {SUPERVISOR_NICE}"
    except OSError:
        return f"nice {os.getpriority(os.PRIO_PROCESS, 0)}"


# The daemon's session's CPU weight: the floor of the workers' nice values.
SESSION_NICE = FLOOR_NICE
AUTOGROUP_PATH = "/proc/self/autogroup"


def raise_session_share(path: str = AUTOGROUP_PATH) -> str:
    """Give the daemon's session, which its zygote and workers share, the CPU
    weight of nice -20; what happened, for the log.

    With autogroup scheduling (CONFIG_SCHED_AUTOGROUP, on in Debian's
    kernels), every session is one scheduling entity wherever the cpu cgroup
    controller is not in use, which is systemd's default: each service and
    each mount unit calls setsid, so at boot the whole daemon weighs as much
    as one mount.nfs process, and the nice values of its processes only
    order them among themselves.  In the lab (7.3, 64 mounts, the mounts in
    init's session) the zygote, at nice -20, ran 0.1 s of the first 3 s of a
    burst and waited runnable for 2.85 s, while 32 requests waited for it.
    kernel/sched/autogroup.c: proc_sched_autogroup_set_nice needs what
    lowering a nice value needs (CAP_SYS_NICE or RLIMIT_NICE, which the unit
    sets with LimitNICE=-20).  Only as a session leader: started from a
    shell, the session is the user's, and its other jobs are not ours to boost."""
    if os.getsid(0) != os.getpid():
        return "not a session leader, autogroup left alone"
    try:
        with open(path, "w") as autogroup:
            autogroup.write(f"{SESSION_NICE}\n")
    except OSError as err:
        return f"autogroup nice unchanged: {err.strerror or err}"
    return f"autogroup nice {SESSION_NICE}"


def is_real_time() -> bool:
    """SCHED_FIFO or SCHED_RR, whoever set it."""
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR)
