"""The zygote: a warm, unprivileged template that forks single-use workers.

The supervisor forks one zygote per configuration generation (and forks a new
one to replace a dead one); it never forks a worker itself.  The pattern is
CPython's multiprocessing.forkserver: preload, then one loop that forks on
request, reports each child's pid at once and its exit status later, and
exits when the supervisor is gone.

`Zygote.init_process` runs in the child of the supervisor and, in order:
  1. resets the supervisor's signal handling and closes every inherited
     descriptor except its channel and the log's (the supervisor's netlink and
     status sockets, other zygotes' channels, accepted sockets of requests);
  2. imports the TLS engine, checks the private OpenSSL bindings it uses
     (tlshd/selfcheck.py), parses the generation's PEM files from the bytes
     the supervisor read (tlshd/pemfiles.py: the supervisor never imports
     cryptography on its way to READY; a file that does not parse exits
     WORKER_BOOT_ERROR, which stops the daemon), and warms the engine with
     one complete TLS 1.3 handshake
     over memory BIOs, still as root: the lazy initialisation of OpenSSL
     (providers, EC groups, the DRBG, cipher fetches) and every lazy Python
     import then happens once here instead of in every worker, and nothing is
     left to load after the privilege drop;
  3. drops privileges (workers/privileges.py), exiting with WORKER_BOOT_ERROR
     if it cannot: respawning could never help;
  4. gc.freeze()s the warm heap, so no collection in a worker walks (and
     copies, page by page) the template's objects;
  5. says `zygote_ready` and serves `fork` requests until EOF.

Channels.  For each worker the supervisor makes a fresh SOCK_SEQPACKET
socketpair, keeps one end and sends the other with `fork` (SCM_RIGHTS).  The
zygote forks, the child keeps that end as its only channel, and the zygote
closes its copy at once, so the worker's end is held by the worker alone:
EOF on the supervisor's end means the worker is gone.  The zygote answers
`forked` with the pid and a pidfd of the child (opened before the child can
be reaped, so it cannot name a reused pid): the supervisor signals workers
through it.  It reports `exited` with the wait status when it reaps one.

Workers are the zygote's children, not the supervisor's; the supervisor is a
child subreaper, so if the zygote dies its workers are reparented to, and
reaped by, the supervisor.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tlshd.workers import WORKER_BOOT_ERROR
from tlshd.workers.priority import permit_priority_floor, run_zygote_at_floor

from tlshd import ipc
from tlshd.children import reap_exited
from tlshd.heap import trim_heap
from tlshd.log import log, own_syslog_socket
from tlshd.openssl_conf import warn_if_tickets_enabled
from tlshd.params import Engine
from tlshd.proctitle import set_title

# Messages on the zygote's channel.
FORK_OPS = frozenset({"fork"})
ZYGOTE_OPS = frozenset({"zygote_ready", "forked", "fork_failed", "exited"})
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM)


class Zygote:
    def __init__(
        self,
        channel: socket.socket,
        generation: Any,
        engine: Engine | None,
        close_inherited: Callable[[], None] = lambda: None,
        install_ktls: Callable[..., None] | None = None,
        prepare_kernel: Callable[[], object] | None = None,
    ) -> None:
        """Runs in the supervisor before fork: only records what the child needs.
        `prepare_kernel` runs first in the child, as root: the first zygote is
        forked before the supervisor probed the kernel (supervisor/firstzygote.py)."""
        self.channel = channel
        self.generation = generation
        self.engine = engine
        self.close_inherited = close_inherited
        self.install_ktls = install_ktls
        self.prepare_kernel = prepare_kernel
        self._wake_r = self._wake_w = -1
        self.hosts: list[_Host] = []

    # --- start-up (in the forked child) ------------------------------------------

    def init_process(self) -> None:
        """Runs in the child; ends the process and never returns."""
        reset_signals()
        self.close_inherited()
        # Not the supervisor's non-blocking syslog socket: a worker's last
        # lines must reach syslog before it exits (tlshd/log.py).
        own_syslog_socket(nonblocking=False)
        close_fds_except({self.channel.fileno()})
        set_title(f"tlshd: zygote {self.generation.number}")
        ordinary_scheduling()
        # While still root (workers/priority.py: oldest handshake first).
        if permit_priority_floor():
            run_zygote_at_floor()
        steps = StepTimer()
        if self.prepare_kernel is not None:
            self.prepare_kernel()
        warm_engine = self.engine is None
        if self.engine is None:
            from tlshd.workers.engine import perform_handshake

            self.engine = perform_handshake
            require_bindings_or_exit()
        # Imported before the privilege drop: workers cannot read the installation.
        from tlshd.workers import base, seccomp  # noqa: F401
        from tlshd.workers.contexts import prepare_contexts

        steps.done("imports")
        self.generation = parse_credentials_or_exit(self.generation)
        steps.done("credentials")
        warm_up_tls()
        if warm_engine and not warm_up_engine(self.engine, self.generation):
            log.debug("zygote %d: the engine warm-up did not complete", os.getpid())
        steps.done("warm-up")
        # After the warm-up, which must not use them up: each worker takes its copy once.
        prepare_contexts(self.generation.credentials)
        # Each worker then loads a compiled filter instead of compiling its own.
        if not seccomp.prepare_worker_filter():
            log.debug("zygote %d: workers compile their own seccomp filter", os.getpid())
        steps.done("contexts")
        config = self.generation.config
        from tlshd.workers.privileges import PrivilegeError, drop_privileges

        try:
            drop_privileges(config.worker.user, config.worker.drop_privileges)
        except (PrivilegeError, OSError) as err:
            log.error("zygote %d cannot drop privileges: %s", os.getpid(), err)
            os._exit(WORKER_BOOT_ERROR)
        # Every worker confines itself with seccomp before it touches peer data
        # (workers/base.py); a missing libseccomp is a start-up error, said once.
        if seccomp.load_error() is not None:
            log.error("zygote %d: %s", os.getpid(), seccomp.load_error())
            os._exit(WORKER_BOOT_ERROR)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        # Before the first fork, so no worker shares the start-up's dead pages.
        trim_heap()
        gc.freeze()
        steps.done("privileges")
        # Where start-up goes, for whoever tunes it (benchmarks/README.md).
        log.debug("zygote %d ready: %s", os.getpid(), steps)
        self.channel.setblocking(True)
        ipc.send_message(
            self.channel,
            {"op": "zygote_ready", "pid": os.getpid(), "generation": self.generation.number},
        )
        self.run()
        os._exit(0)

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        """Fork on request, report exits; return when the supervisor is gone."""
        poller = select.poll()
        poller.register(self.channel, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                events = dict(poller.poll())
            except InterruptedError:
                events = {}
            if self._wake_r in events:
                _drain(self._wake_r)
            self.report_exits()
            if self.channel.fileno() in events and not self.serve_one():
                return

    def serve_one(self) -> bool:
        try:
            message, fds = ipc.recv_message(self.channel, FORK_OPS)
        except ConnectionError:
            return False
        except (ipc.IpcError, OSError) as err:
            log.error("zygote %d: bad message from the supervisor: %s", os.getpid(), err)
            return False
        if message is None:
            return False  # EOF: the supervisor is gone, or retired this generation
        token = message.get("token")
        if len(fds) != 1 or type(token) is not int:
            for fd in fds:
                os.close(fd)
            log.error("zygote %d: malformed fork request", os.getpid())
            return False
        if message.get("shared") is True:
            self.place_in_host(token, fds[0])
        else:
            self.fork_worker(token, fds[0])
        return True

    # --- shared workers ([pool] handshakes_per_worker > 1; workers/host.py) ---------

    def place_in_host(self, token: int, channel_fd: int) -> None:
        """Give the worker channel to a host process with a slot left, forking
        a new host if none has one, and report the host's pid as the worker's.
        A host takes `handshakes_per_worker` channels in its life: then its
        control channel is closed, and it exits once its threads are done."""
        host = self.open_host()
        if host is None:
            os.close(channel_fd)
            self.report_fork_failed(token, errno.EAGAIN)
            return
        assert host.control is not None
        try:
            ipc.send_message(host.control, {"op": "slot"}, (channel_fd,))
        except OSError:
            host.retire()  # it died: its slots' channels see EOF in the supervisor
            os.close(channel_fd)
            self.report_fork_failed(token, errno.EAGAIN)
            return
        os.close(channel_fd)
        host.slots_given += 1
        if host.slots_given >= self.generation.config.pool.handshakes_per_worker:
            host.retire()
        with contextlib.suppress(OSError):
            ipc.send_message(
                self.channel,
                {"op": "forked", "token": token, "pid": host.pid, "shared": True},
                (host.pidfd,) if host.pidfd >= 0 else (),
            )

    def open_host(self) -> _Host | None:
        for host in self.hosts:
            if host.control is not None:
                return host
        control, child_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            pid = os.fork()
        except OSError:
            control.close()
            child_end.close()
            return None
        if pid == 0:  # pragma: no cover - the host
            control.close()
            self._become_host(child_end)
        child_end.close()
        host = _Host(pid, _pidfd_open(pid), control)
        self.hosts = [h for h in self.hosts if h.alive] + [host]
        return host

    def _become_host(self, control: socket.socket) -> None:  # pragma: no cover - in the child
        def run() -> int:
            from tlshd.workers.host import WorkerHost

            assert self.engine is not None
            return WorkerHost(control, self.generation, self.engine, self.install_ktls).run()

        self._child_life("worker host", run)

    def fork_worker(self, token: int, channel_fd: int) -> None:
        try:
            pid = os.fork()
        except OSError as err:
            os.close(channel_fd)
            self.report_fork_failed(token, err.errno or 0)
            return
        if pid == 0:  # pragma: no cover - the worker
            self._become_worker(channel_fd)
        os.close(channel_fd)
        pidfd = _pidfd_open(pid)
        try:
            ipc.send_message(
                self.channel,
                {"op": "forked", "token": token, "pid": pid},
                (pidfd,) if pidfd >= 0 else (),
            )
        except OSError:
            pass  # the supervisor is gone: the loop sees EOF next
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _become_worker(self, channel_fd: int) -> None:  # pragma: no cover - in the child
        def run() -> int:
            from tlshd.workers.base import Worker

            assert self.engine is not None
            channel = socket.socket(fileno=channel_fd)
            return Worker(channel, self.generation, self.engine, self.install_ktls).run()

        self._child_life("worker", run)

    def _child_life(self, what: str, run: Callable[[], int]) -> None:  # pragma: no cover
        """A forked worker's or host's whole life: let go of what is the
        zygote's (its signal wake-up, its channel, the hosts' channels and
        pidfds), run, and exit with run's status; never returns."""
        code = WORKER_BOOT_ERROR
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self.channel.close()
            for host in self.hosts:
                host.close()
            code = run()
        except BaseException:
            with contextlib.suppress(BaseException):
                log.exception("%s %d crashed", what, os.getpid())
            code = 1
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
            os._exit(code)

    def report_fork_failed(self, token: int, err: int) -> None:
        with contextlib.suppress(OSError):
            ipc.send_message(self.channel, {"op": "fork_failed", "token": token, "errno": err})

    def report_exits(self) -> None:
        for pid, status in reap_exited():
            for host in self.hosts:
                if host.pid == pid:
                    host.exited()
            with contextlib.suppress(OSError):
                ipc.send_message(self.channel, {"op": "exited", "pid": pid, "status": status})


class _Host:
    """A worker host as the zygote sees it: its control channel (None once it
    has all its slots) and a pidfd the `forked` reports pass on."""

    def __init__(self, pid: int, pidfd: int, control: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.control: socket.socket | None = control
        self.slots_given = 0
        self.alive = True

    def retire(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    def exited(self) -> None:
        self.retire()
        self.alive = False
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def close(self) -> None:
        """In a forked child: none of this is its own."""
        if self.control is not None:
            self.control.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)


# --- helpers shared with the worker --------------------------------------------------


class StepTimer:
    """Seconds per named start-up step, said as "imports 1.20 s, ..."."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._steps: list[tuple[str, float]] = []

    def done(self, name: str) -> None:
        now = time.monotonic()
        self._steps.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self._steps)


def require_bindings_or_exit() -> None:
    """The engine's private OpenSSL bindings (tlshd/selfcheck.py), checked here
    because the zygote is the first process that loads OpenSSL."""
    from tlshd.selfcheck import BindingsError, require_bindings

    try:
        require_bindings()
    except BindingsError as err:
        log.error("%s", err)
        os._exit(WORKER_BOOT_ERROR)


def parse_credentials_or_exit(generation: Any) -> Any:
    """The generation with its credentials parsed from the bytes the supervisor
    read (tlshd/pemfiles.py); a file that does not parse is a start-up error
    (WORKER_BOOT_ERROR stops the daemon), logged naming the file and the key."""
    if generation.credentials is not None or getattr(generation, "files", None) is None:
        return generation
    from dataclasses import replace

    from tlshd.credentials import load_credentials
    from tlshd.pemfiles import CredentialsError

    try:
        credentials = load_credentials(generation.config, generation.files)
    except CredentialsError as err:
        log.error("%s", err)
        os._exit(WORKER_BOOT_ERROR)
    # The raw bytes are not needed any more; the parsed PEM is what workers use.
    return replace(generation, credentials=credentials, files=None)


def reset_signals() -> None:
    """Drop the supervisor's handlers (its wake-up fd is not ours).  INT, HUP,
    USR1 and TERM are the supervisor's business: a stop reaches workers as EOF
    on their channel, or SIGKILL after the grace period."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def close_fds_except(keep: set[int]) -> None:
    """Close every inherited descriptor but stdio, `keep` and the log's."""
    import logging.handlers

    keep = {0, 1, 2, *keep}
    for handler in logging.getLogger("tlshd").handlers:
        target: Any = None
        if isinstance(handler, logging.handlers.SysLogHandler):
            target = getattr(handler, "socket", None)  # not in typeshed's SysLogHandler
        elif isinstance(handler, logging.StreamHandler):
            target = handler.stream
        with contextlib.suppress(AttributeError, OSError, ValueError):
            keep.add(target.fileno())
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _pidfd_open(pid: int) -> int:
    """A pidfd for a child not yet reaped (so `pid` is still ours), or -1."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError) as err:
        if getattr(err, "errno", None) not in (errno.EMFILE, errno.ENFILE, errno.ENOSYS, None):
            log.debug("pidfd_open(%d): %s", pid, err)
        return -1


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def ordinary_scheduling() -> None:
    """SCHED_OTHER at nice 0 or above, for the zygote and so every worker,
    before workers/priority.py lets them down to nice -20 (FLOOR_NICE) at most.

    The supervisor runs SCHED_FIFO or at nice -5 (supervisor/priority.py);
    nothing that parses network input may run real-time, nor inherit the
    supervisor's nice value.  SCHED_RESET_ON_FORK already
    resets the children of our supervisor, but a policy set by someone else
    (a unit with CPUSchedulingResetOnFork=no, chrt) may lack the flag.
    Lowering is always allowed; only raising needs CAP_SYS_NICE."""
    with contextlib.suppress(OSError):
        if os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, max(0, os.getpriority(os.PRIO_PROCESS, 0)))


def warm_up_tls() -> None:
    """One complete TLS 1.3 handshake between two memory BIOs in this process.

    It exercises what every real handshake needs and OpenSSL initialises
    lazily: provider and cipher fetches, the P-256 group, ECDSA sign and
    verify, HKDF, AES-GCM, the DRBG.  Done here, before the fork of any worker,
    it is paid once and shared copy-on-write, so a worker's first handshake is
    as fast as its hundredth.  The handshake is the NumTickets probe's
    (tlshd/openssl_conf.py, throw-away key and certificate): one in-memory
    handshake serves both, which under QEMU TCG is tens of milliseconds of
    start-up saved.  Warns if OpenSSL did not apply NumTickets = 0."""
    warn_if_tickets_enabled()


class _NoKeys:
    """The warm-up's KeyService: it asks for no kernel key."""

    def read_key(self, serial: int) -> Any:
        raise OSError(errno.ENOKEY, "no keys in the warm-up")

    def search_psks(self, identities: Sequence[str], keyring: int | None) -> None:
        return None

    def add_peer_certificate(self, der: bytes, description: str) -> int:
        return 0


def warm_up_engine(engine: Engine, generation: Any, timeout_s: float = 10.0) -> bool:
    """One real handshake through the engine itself, both roles, over a
    loopback TCP connection, with this generation's server certificate: the
    engine's own first-use costs (context set-up, callbacks, PEM parsing,
    HKDF) are then paid here, once.  No kTLS is installed and nothing is
    logged.  True if both sides ran to the end (whatever the outcome)."""
    import logging
    import threading
    import time

    from tlshd.workers.engine import HandshakeContext

    from tlshd.params import HandshakeParams
    from tlshd.uapi import AuthMode, MsgType

    server_creds = generation.credentials.server
    if not (server_creds.cert_chain_pem and server_creds.private_key_pem):
        return False
    quiet = logging.getLogger("tlshd.warm-up")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False

    def context() -> Any:
        return HandshakeContext(
            config=generation.config,
            credentials=generation.credentials,
            keys=_NoKeys(),
            deadline=time.monotonic() + timeout_s,
            log=logging.LoggerAdapter(quiet, {}),
            install_ktls=lambda _sock, _tx, _rx: None,
        )

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = socket.create_connection(listener.getsockname(), timeout_s)
            server, _ = listener.accept()
    except OSError:
        return False
    with client, server:
        client.settimeout(None)
        client_params = HandshakeParams(
            sockfd=client.fileno(),
            message_type=MsgType.CLIENTHELLO,
            auth_mode=AuthMode.UNAUTH,
            peername="localhost",
        )
        server_params = HandshakeParams(
            sockfd=server.fileno(), message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509
        )
        side = threading.Thread(target=engine, args=(client, client_params, context()))
        side.start()
        engine(server, server_params, context())
        side.join(timeout_s)
        return not side.is_alive()
