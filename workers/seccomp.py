"""The worker's seccomp filter: installed after the privilege drop, before peer data.

A worker parses untrusted peer data.  If that ever gives a peer control of the
worker, the filter keeps it inside the one handshake it serves.  It cannot:

* outlive its job holding the consumer's socket: fork, vfork, clone, clone3
  (a forked child kept NFS plaintext readable after DONE).  A worker starts no
  threads (strace of workers running the real engine shows no clone after the
  privilege drop), so clone is denied whatever its flags;
* run other code: execve, execveat;
* reach the kernel or the network on its own: socket, socketpair, connect,
  bind, listen, accept (NETLINK_GENERIC would let it send its own DONE on
  kernels where DONE does not require CAP_NET_ADMIN);
* touch kernel keys: add_key, keyctl, request_key (only the supervisor may);
* trace or signal other processes: ptrace, process_vm_readv/writev, and kill,
  tkill, tgkill for any pid but its own (abort() signals itself);
* change the consumer socket behind the kernel's back: shutdown, fcntl other
  than F_GETFD/F_SETFD/F_GETFL, ioctl other than TCGETS (isatty), dup*.

Policy: an allowlist of what one handshake, the kTLS setsockopts, the
supervisor channel, logging and the Python runtime need; every other call
fails with EPERM.  EPERM rather than a kill: an honest path that meets a
denied call (SysLogHandler reconnecting with socket()) gets an error it logs,
and the handshake ends with a status instead of a dead worker.  System calls
of a foreign architecture (int 0x80 on x86-64) kill the process (libseccomp's
default for a bad architecture).

Binding: pyseccomp (PyPI), a pure-Python ctypes binding to the system's
libseccomp.so.2 whose API is that of libseccomp's own Python module.  The
daemon runs in a pip virtualenv (/opt/tlshd, the lab's cp313 wheels, pyenv
interpreters in development) where Debian's python3-seccomp, built for the
system interpreter only, cannot be imported; pyseccomp installs in any of
them as a pure wheel and loads the distribution's libseccomp, which systemd
and apt already depend on.  pyseccomp has had no release since 2021, but it is
a thin shim over libseccomp's stable C API with the official module's API, so
moving to a maintained build of the official binding is a one-line import
change once one ships wheels for every Python we run (mephi42-seccomp, the
official binding repackaged, had none for CPython 3.11 in November 2026).

The module loads pyseccomp at import, in the zygote before it drops its
privileges: after the drop a worker may not be able to read the installation.

Compiled once.  libseccomp turns the rules into a BPF program in every
seccomp_load: 1.4 ms of CPU and 320 page faults per worker on the host, a
third of a single-use worker's whole cost, and many times that under QEMU TCG.
The only per-worker part of the program is the worker's pid (kill, tgkill), so
the zygote compiles it once with a sentinel pid (`prepare_worker_filter`),
checks that patching the sentinel gives byte for byte what libseccomp compiles
for a real pid, and each worker patches in its own pid and loads the program
with prctl(PR_SET_SECCOMP) itself.  Where the check fails, every worker
compiles its own, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib
import os
import struct
import sys
import termios
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyseccomp import SyscallFilter

# The sonames pyseccomp looks up at import, as the dynamic loader knows them.
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    """pyseccomp, imported with ctypes.util.find_library answered from the
    loader's own search path where it can be.  pyseccomp resolves libc and
    libseccomp with find_library at import, and on Linux each call runs
    `ldconfig -p` in a subprocess: about 0.1 s of the zygote's start-up in
    the TCG lab guest, for the names that dlopen() finds by soname anyway.
    A soname dlopen() cannot load falls back to the real lookup.

    ctypes.util itself is not imported unless that fallback needs it: it
    imports shutil, subprocess and tempfile (with bz2 and lzma), 0.2 s of
    the zygote's imports in the 7.3 guest (`-X importtime`) for modules no
    worker uses, in every worker's copy-on-write heap.  pyseccomp sees a
    stand-in module for the length of its import."""
    import types

    def find_library(name: str) -> str | None:
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        # The real lookup, by the real module, for this and any later call.
        _restore_ctypes_util(real_module, real_attribute)
        real_util = importlib.import_module("ctypes.util")
        return real_util.find_library(name)  # type: ignore[no-any-return]

    stand_in = types.ModuleType("ctypes.util")
    stand_in.find_library = find_library  # type: ignore[attr-defined]
    real_module = sys.modules.get("ctypes.util")
    real_attribute = getattr(ctypes, "util", None)
    sys.modules["ctypes.util"] = stand_in
    ctypes.util = stand_in  # type: ignore[attr-defined]
    try:
        import pyseccomp

        return pyseccomp
    finally:
        _restore_ctypes_util(real_module, real_attribute)


def _restore_ctypes_util(module: Any, attribute: Any) -> None:
    """Put ctypes.util back as it was: the real one, or not imported."""
    if module is None:
        sys.modules.pop("ctypes.util", None)
    else:
        sys.modules["ctypes.util"] = module
    if attribute is None:
        with contextlib.suppress(AttributeError):
            del ctypes.util  # type: ignore[attr-defined]
    else:
        ctypes.util = attribute  # type: ignore[attr-defined]


try:
    seccomp = _import_pyseccomp()
    _LOAD_ERROR: str | None = None
except (ImportError, OSError, RuntimeError) as exc:  # libseccomp.so.2 missing
    seccomp = None
    _LOAD_ERROR = f"cannot load libseccomp through pyseccomp: {exc}"

PR_SET_NAME = 15  # setproctitle names the thread
PR_GET_NAME = 16
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
# A pid no process can have (PID_MAX_LIMIT is 2^22), in a program compiled
# before the worker's pid is known; 32 bits, as libseccomp compares the low word.
PID_SENTINEL = 0x7E57_0A1D
# struct sock_filter (linux/filter.h): u16 code, u8 jt, u8 jf, u32 k
SOCK_FILTER = struct.Struct("=HBBI")
K_OFFSET = 4  # of k in a sock_filter, after code, jt, jf


class _SockFprog(ctypes.Structure):
    # struct sock_fprog: unsigned short len; struct sock_filter *filter
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Prepared:
    """The program the zygote compiled, ready for prctl: each worker writes its
    pid at `pid_offsets` of its (copy-on-write) copy of `code` and loads it."""

    def __init__(self, program: bytes) -> None:
        self.code = ctypes.create_string_buffer(program, len(program))
        self.fprog = _SockFprog(len(program) // SOCK_FILTER.size, ctypes.addressof(self.code))
        self.pid_offsets = _pid_offsets(program)
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl

    def load(self, pid: int) -> None:
        _write_pid(self.code, self.pid_offsets, pid)
        _prctl(self.prctl, PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
        _prctl(self.prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, "PR_SET_SECCOMP", self.fprog)


_prepared: _Prepared | None = None

# Allowed whatever their arguments.  Names a given architecture lacks (open,
# stat, poll on aarch64) are skipped.
ALLOWED = (
    # files and descriptors already open: the channel, the consumer's socket,
    # stdio, the syslog socket; openat for the system trust store, which
    # OpenSSL reads at verification time, and for traceback source lines
    "read", "readv", "pread64", "write", "writev", "pwrite64", "close", "lseek",
    "openat", "open", "fstat", "newfstatat", "stat", "lstat", "statx",
    "readlink", "readlinkat", "getcwd", "access", "faccessat", "faccessat2",
    "pipe", "pipe2",
    # memory (mmap with PROT_EXEC: cffi's callbacks need a W+X page)
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    # waiting and time
    "poll", "ppoll", "select", "pselect6", "nanosleep", "clock_nanosleep",
    "clock_gettime", "clock_getres", "gettimeofday", "time",
    # I/O on sockets it was given; TCP_NODELAY, SO_RCVTIMEO, TCP_ULP, TLS_TX/RX
    "recvfrom", "recvmsg", "sendto", "sendmsg", "getsockopt", "setsockopt",
    "getpeername", "getsockname",
    # signals (its own handlers and wake-up pipe)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    # the runtime
    "futex", "getrandom", "sched_yield", "sched_getaffinity", "uname", "sysinfo",
    "getrusage", "times", "getpid", "gettid", "getppid", "getuid", "geteuid",
    "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "exit", "exit_group",
)  # fmt: skip


class SeccompError(OSError):
    """The filter could not be built or loaded; the worker must not run."""


def load_error() -> str | None:
    """Why the filter cannot be installed here (libseccomp missing), or None."""
    return _LOAD_ERROR


def install_worker_filter() -> None:
    """Confine this process (see the module docstring); raises SeccompError."""
    if seccomp is None:
        raise SeccompError(errno.ENOSYS, _LOAD_ERROR)
    try:
        if _prepared is not None:
            _prepared.load(os.getpid())
            return
        worker_filter = _build(os.getpid())
        worker_filter.load()
    except OSError as exc:
        raise SeccompError(exc.errno or errno.EINVAL, f"seccomp filter: {exc}") from exc


def prepare_worker_filter() -> bool:
    """Compile the workers' program once, in this process (the zygote), so that
    each forked worker only patches in its pid; True if it will be used."""
    global _prepared
    _prepared = None
    if seccomp is None:
        return False
    try:
        program = compiled_program(PID_SENTINEL)
        matches = program_for(program, os.getpid()) == compiled_program(os.getpid())
    except OSError:
        return False
    if matches:
        _prepared = _Prepared(program)
    return matches


def compiled_program(pid: int) -> bytes:
    """The BPF program libseccomp compiles for a worker with `pid`."""
    assert seccomp is not None
    fd = os.memfd_create("tlshd-seccomp", os.MFD_CLOEXEC)
    with open(fd, "w+b") as exported:
        _build(pid).export_bpf(exported)
        exported.seek(0)
        return exported.read()


def program_for(program: bytes, pid: int) -> bytes:
    """`program` with every comparison against PID_SENTINEL made against `pid`:
    what a worker loads (the same patch as _Prepared.load)."""
    patched = bytearray(program)
    _write_pid(patched, _pid_offsets(program), pid)
    return bytes(patched)


def _pid_offsets(program: bytes) -> tuple[int, ...]:
    """Offsets of the `k` fields that hold PID_SENTINEL."""
    return tuple(
        offset + K_OFFSET
        for offset in range(0, len(program) - SOCK_FILTER.size + 1, SOCK_FILTER.size)
        if SOCK_FILTER.unpack_from(program, offset)[3] == PID_SENTINEL
    )


def _write_pid(code: Any, offsets: tuple[int, ...], pid: int) -> None:
    # `code`: a bytearray or the ctypes buffer prctl reads
    for offset in offsets:
        struct.pack_into("=I", code, offset, pid)


def _prctl(prctl: Any, option: int, value: int, name: str, pointer: Any = None) -> None:
    # What seccomp_load does with its default attributes: no_new_privs (the
    # zygote set it already; unprivileged loading requires it), then the filter.
    arg = ctypes.byref(pointer) if pointer is not None else ctypes.c_ulong(0)
    zero = ctypes.c_ulong(0)
    if prctl(option, ctypes.c_ulong(value), arg, zero, zero) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({name})")


def _build(pid: int) -> SyscallFilter:
    allow, arg, eq = seccomp.ALLOW, seccomp.Arg, seccomp.EQ
    worker_filter = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    for name in ALLOWED:
        _allow(worker_filter, name)
    for command in (fcntl.F_GETFD, fcntl.F_SETFD, fcntl.F_GETFL):
        worker_filter.add_rule(allow, "fcntl", arg(1, eq, command))
    worker_filter.add_rule(allow, "ioctl", arg(1, eq, termios.TCGETS))
    for option in (PR_SET_NAME, PR_GET_NAME):
        worker_filter.add_rule(allow, "prctl", arg(0, eq, option))
    # its own nice value only (workers/priority.py: oldest handshake first)
    for call in ("getpriority", "setpriority"):
        worker_filter.add_rule(allow, call, arg(0, eq, os.PRIO_PROCESS), arg(1, eq, 0))
    # itself only: abort() and raise() signal the calling process
    worker_filter.add_rule(allow, "kill", arg(0, eq, pid))
    worker_filter.add_rule(allow, "tgkill", arg(0, eq, pid))
    return worker_filter


def _allow(worker_filter: SyscallFilter, name: str) -> None:
    try:
        number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
    except (OSError, ValueError):
        return
    if number < 0:  # not a system call of this architecture
        return
    worker_filter.add_rule(seccomp.ALLOW, number)
