"""Dropping a worker's privileges, once, right after fork.

Order matters (capabilities(7)):
  1. clear the capability bounding set (PR_CAPBSET_DROP needs CAP_SETPCAP,
     which root still has) and the ambient set, so nothing can come back
     through execve;
  2. setgroups([]), then setresgid, then setresuid: the gid change needs
     CAP_SETGID, gone after the uid change;
  3. once every uid is non-zero the kernel clears the permitted and effective
     sets (no SECBIT_KEEP_CAPS); capset() clears the inheritable set too;
  4. PR_SET_NO_NEW_PRIVS, so no setuid binary or file capability can raise
     privilege again.
Before any of that the worker joins a fresh anonymous session keyring.  Key
possession follows the keyrings a process holds, not its uid, and fork shares
the session keyring (keyrings(7)): without this, a worker running as nobody
could still read every key the supervisor's session keyring links.
The result is checked in /proc/self/status; a worker that cannot shed its
privileges refuses to run (PrivilegeError → boot error).
"""

from __future__ import annotations

import ctypes
import os
import pwd

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"
FALLBACK_CAP_LAST_CAP = 40  # CAP_CHECKPOINT_RESTORE, Linux 5.9


class PrivilegeError(Exception):
    """The worker could not reach an unprivileged state."""


# dlopen(NULL): the process's own symbols, libc's among them.  Not
# ctypes.util.find_library("c"), which runs `ldconfig -p` and imports
# subprocess, shutil and tempfile: 0.1 s of the zygote's start-up under
# emulation, and pages in every worker's copy-on-write heap.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return int(result)


def cap_last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return FALLBACK_CAP_LAST_CAP


def clear_bounding_set() -> None:
    for cap in range(cap_last_cap() + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as err:
            # EINVAL: this kernel does not know the capability.
            if err.errno != 22:
                raise


def clear_ambient_set() -> None:
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as err:
        if err.errno != 22:  # kernels before 4.3 have no ambient set
            raise


def clear_capability_sets() -> None:
    """capset() with all three sets empty (both 32-bit halves)."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def leave_session_keyring() -> None:
    from tlshd.keyring import join_session_keyring

    join_session_keyring(None)


def switch_user(user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"worker user {user!r} does not exist") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"worker user {user!r} is root; choose an unprivileged user")
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)


def read_status_fields(path: str = "/proc/self/status") -> dict[str, str]:
    fields = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def verify_unprivileged() -> None:
    status = read_status_fields()
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if key in status and int(status[key], 16) != 0:
            raise PrivilegeError(f"{key} is {status[key]} after dropping privileges")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PrivilegeError("still running as root after dropping privileges")
    if status.get("NoNewPrivs", "1") != "1":
        raise PrivilegeError("NoNewPrivs is not set")


def drop_privileges(user: str, enabled: bool = True) -> None:
    """Make this process `user`, with no capabilities and NO_NEW_PRIVS.

    With `enabled` false (or when not started as root, where there is
    nothing to drop) only NO_NEW_PRIVS is set.  Raises PrivilegeError or
    OSError; the caller treats either as a boot failure."""
    if enabled and os.geteuid() == 0:
        leave_session_keyring()
        clear_bounding_set()
        clear_ambient_set()
        switch_user(user)
        clear_capability_sets()
        set_no_new_privs()
        verify_unprivileged()
    else:
        set_no_new_privs()
