"""What the daemon costs in memory: the PSS of its process tree, for `tlshd status`.

PSS (proportional set size) charges each shared page to the processes that map
it in equal parts.  Workers are forked from the supervisor and share most of
its pages (the interpreter, pyOpenSSL, the OpenSSL library) copy-on-write, so
adding up their RSS counts those pages once per worker; adding up PSS gives what
the tree really occupies.  psutil reads it from /proc/PID/smaps_rollup, which
needs the same uid or CAP_SYS_PTRACE-level access (the supervisor runs as root;
a process that cannot be read is listed with `pss_bytes: null`).
"""

from __future__ import annotations

from typing import Any

# psutil is imported by the functions, at the first status request: at module
# level it (and the subprocess module it loads) would cost the supervisor a
# tenth of a second of start-up under emulation, for nothing until then.


def process_pss(pid: int) -> int | None:
    """PSS of one process in bytes; None if it is gone or may not be read."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_full_info().pss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, AttributeError):
        # AttributeError: a kernel without smaps_rollup/smaps gives psutil no `pss`.
        return None


def tree_memory(root_pid: int) -> dict[str, Any]:
    """The PSS of `root_pid` and every descendant, and their sum.

    `{"total_pss_bytes": int, "complete": bool, "processes": [{"pid", "pss_bytes"}]}`;
    `complete` is false when a process of the tree could not be read, so the
    total then undercounts.  Processes that exit while being measured are left out.
    """
    import psutil

    try:
        root = psutil.Process(root_pid)
        pids = [root_pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return {"total_pss_bytes": None, "complete": False, "processes": []}
    processes = []
    for pid in pids:
        pss = process_pss(pid)
        if pss is None and not psutil.pid_exists(pid):
            continue
        processes.append({"pid": pid, "pss_bytes": pss})
    known = [p["pss_bytes"] for p in processes if p["pss_bytes"] is not None]
    return {
        "total_pss_bytes": sum(known) if known else None,
        "complete": len(known) == len(processes),
        "processes": processes,
    }
