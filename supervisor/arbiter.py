"""The supervisor's arbiter: the loop, the signals, the processes.

Process model (supervisor/pool.py has the tree)
    One single-threaded, privileged supervisor; per configuration generation
    one unprivileged zygote with a warm TLS engine (workers/zygote.py); and
    single-use workers that the zygote forks, each serving exactly one
    request.  The supervisor forks only zygotes: at start, on reload, and to
    replace a dead one.  It never forks during a burst; the zygote keeps a
    small reserve of forked, idle workers so that a hand-off never waits.

    * The supervisor alone holds the `handshake` netlink sockets.  It ACCEPTs
      (READY, ENOBUFS, or a periodic sweep for lost READYs), keeps the fd the
      kernel installed, and brokers the request (supervisor/broker.py).
    * The kernel resolves DONE's SOCKFD in the sender's fd table, so DONE
      comes from the supervisor, with its own fd number, after the worker's
      `result` (or its death, deadline, junk, or a stop).  Exactly one DONE
      per accepted request, on every path.
    * The loop waits on one selector: the netlink notify socket, the signal
      wake-up pipe, every zygote's and worker's channel and the status socket.
      Signal handlers only record; `handle_<name>` methods run in the loop.
    * Reload (SIGHUP/SIGUSR1) builds a new generation and a new zygote for it;
      spare workers of the old one are let go at once, busy ones finish their
      handshake, and the old zygote exits.
    * Stop (SIGTERM): stop accepting, fail queued requests with EIO, let
      in-flight handshakes finish for up to GRACEFUL_TIMEOUT_S, then fail the
      rest with EIO and kill their workers; reap everything (bounded), and
      return 0.  SIGINT does the same without the grace period.

The arbiter keeps the loop and the processes; moving requests is the broker's
job, and the status document is built in supervisor/status.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tlshd import ipc
from tlshd.config import Config, ConfigError, load_config
from tlshd.heap import trim_heap
from tlshd.log import (
    drain_syslog_backlog,
    flush_syslog_backlog,
    log,
    log_oserror,
    own_syslog_socket,
    set_debug,
)
from tlshd.netlink import HandshakeFamilyMissing, HandshakeNetlink, NetlinkDecodeError
from tlshd.params import Engine, HandshakeParams
from tlshd.pemfiles import CredentialFiles, CredentialsError, read_credential_files
from tlshd.proctitle import set_title
from tlshd.uapi import MAX_ERRNO

from . import handoff
from .broker import Broker, open_fd_count, raise_fd_limit
from .notify import Notifier
from .pool import (
    FD_EXHAUSTED,
    Generation,
    WorkerHandle,
    WorkerPool,
    WorkerState,
    ZygoteHandle,
    become_subreaper,
    describe_exit,
    is_boot_error,
)
from .priority import raise_session_share, raise_supervisor_priority
from .queue import DeadlineQueue
from .signals import SIGNAL_NAMES, SignalQueue
from .stats import CompletionStats
from .status import StatusServer, build_status

if TYPE_CHECKING:
    from tlshd.credentials import Credentials

    from .firstzygote import FirstZygote

LOOP_MAX_WAIT_S = 1.0
ACCEPT_SWEEP_INTERVAL_S = 2.0  # recovers requests whose READY was lost
# ACCEPTs per loop pass.  The kernel keeps at most hn_pending_max unaccepted
# requests per netns, clamp(RAM / 400 MiB, 3, 50) (net/handshake/netlink.c:
# handshake_net_init): 20 on an 8 GiB host.  A consumer submitting beyond it
# gets EAGAIN at once, which nfsd and the sunrpc client treat as "TLS not
# started" and retry with a new connection later: in a 64-mount burst that was
# 77 refused submissions and the retries behind them (benchmarks/README.md).
# So one pass drains the whole pending list (at most 50) before it does
# anything else; a full pass makes the next one accept again without waiting.
MAX_ACCEPTS_PER_PASS = 64
# Forks asked of the zygote and not yet answered: enough to keep it busy
# through a burst, few enough that its channel never fills.
MAX_OUTSTANDING_FORKS = 16
ZYGOTE_BOOT_TIMEOUT_S = 30.0  # importing OpenSSL under emulation takes seconds
WORKER_BOOT_TIMEOUT_S = 15.0
GRACEFUL_TIMEOUT_S = 2.0
REAP_TIMEOUT_S = 3.0
RESPAWN_BACKOFF_MAX_S = 10.0


class HaltServer(Exception):
    """Stop the daemon with `exit_status`; `reason` is logged."""

    def __init__(self, reason: str, exit_status: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


def _default_keyservice(config: Config) -> Any:
    from .keyservice import SupervisorKeyService

    return SupervisorKeyService(config.keyrings)


class Arbiter:
    def __init__(
        self,
        config_path: str,
        config: Config,
        *,
        netlink: HandshakeNetlink | None = None,
        credentials: Credentials | None = None,
        files: CredentialFiles | None = None,
        keyservice: Any = None,
        engine: Engine | None = None,
        install_ktls: Callable[[socket.socket, bytes, bytes], None] | None = None,
        ktls_state: Callable[[socket.socket], tuple[str, bool, bool]] = handoff.ktls_state,
        notifier: Notifier | None = None,
        prepare_kernel: Callable[[], object] | None = None,
        first_zygote: FirstZygote | None = None,
    ) -> None:
        self.config_path = config_path
        self._keyservice_for = (
            (lambda _c: keyservice) if keyservice is not None else _default_keyservice
        )
        if first_zygote is not None:
            # Forked by the command line before this module was imported
            # (supervisor/firstzygote.py); the key service is ours alone.
            self.generation = replace(
                first_zygote.generation, keyservice=self._keyservice_for(config)
            )
        else:
            if credentials is None and files is None:
                files = read_credential_files(config)
            # Without parsed credentials the zygote parses `files`: the supervisor
            # never imports cryptography on its way to READY (tlshd/pemfiles.py).
            self.generation = Generation(
                1, config, credentials, self._keyservice_for(config), files=files
            )
        self.generations: dict[int, Generation] = {1: self.generation}
        self.netlink = netlink if netlink is not None else HandshakeNetlink()
        # None: the zygote imports the real engine itself, after the fork, so
        # the supervisor never loads OpenSSL (start-up time, memory).
        self.engine = engine
        self.install_ktls = install_ktls
        self.notifier = notifier if notifier is not None else Notifier()
        self.prepare_kernel = prepare_kernel
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue()
        self.pool = first_zygote.pool if first_zygote is not None else WorkerPool()
        self.stats = CompletionStats()
        self.broker = Broker(
            self.netlink, self.pool, self.stats, self.generations, self.unwatch, ktls_state
        )
        self.status = StatusServer(config.status_socket, self.selector, self.snapshot)
        self.started_at = time.monotonic()
        self.next_sweep = 0.0
        self.accepting = False
        self.accept_owed = False  # a READY came while admission was closed
        self.stopping = False
        self.grace_deadline: float | None = None
        self.ready_sent = False
        self.zygote_deaths = 0  # in a row, before one became ready
        self.respawn_at = 0.0
        self.forks_paused_until = 0.0

    @property
    def config(self) -> Config:
        return self.generation.config

    @property
    def queue(self) -> DeadlineQueue:
        return self.broker.queue

    # --- run ----------------------------------------------------------------

    def run(self) -> int:
        """Start, loop until stopped, stop; the exit status of the daemon."""
        try:
            self.start()
            while not (self.stopping and self.stop_complete()):
                self.run_once()
            self.finish_stop()
            log.info("tlshd stopped")
            return 0
        except HandshakeFamilyMissing as err:
            log.error("%s", err.strerror)
            self.emergency_stop()  # the zygote is already running
            return 1
        except HaltServer as halt:
            log.error("stopping: %s", halt.reason)
            self.emergency_stop()
            return halt.exit_status
        except Exception:
            log.exception("unhandled error in the supervisor")
            self.emergency_stop()
            return 1
        finally:
            self.close()

    def start(self) -> None:
        set_title("tlshd: supervisor")
        fd_limit = raise_fd_limit()
        # The whole daemon against the mounts of a boot-time burst (priority.py)
        log.debug("supervisor %d: %s", os.getpid(), raise_session_share())
        if not own_syslog_socket(nonblocking=True):
            log.debug("syslog sends may block the supervisor (no datagram /dev/log)")
        if not become_subreaper():
            log.warning("cannot become a child subreaper; orphaned workers go to init")
        # tls.ko and the kernel's kTLS capabilities before the zygote: it and
        # every worker inherit what ensure_tls_module() found (whether
        # TLS_TX_MAX_PAYLOAD_LEN exists), and a worker cannot probe it itself.
        if self.prepare_kernel is not None:
            self.prepare_kernel()
        # Then the zygote, unless the command line forked it already: its
        # imports and warm-up are the longest part of start-up, and they
        # overlap with the rest of it on another CPU.
        first = self.pool.live_zygote(self.generation.number)
        if first is not None:
            self.watch_zygote(first)
        else:
            self.spawn_zygote()
        try:
            self.netlink.open()
        except HandshakeFamilyMissing:
            raise
        except OSError as err:
            raise HaltServer(f"cannot open the handshake netlink family: {err}") from err
        self.selector.register(self.netlink.fileno(), selectors.EVENT_READ, self._on_netlink)
        self.signals.install()
        self.selector.register(self.signals.fileno(), selectors.EVENT_READ, lambda _ev: None)
        self.status.open()
        self.broker.set_limits(self.config.pool.max_queued, fd_limit, open_fd_count())
        self.accepting = True

    def run_once(self) -> None:
        """One pass of the loop.  The order matters:
        1. wait and read: netlink READYs (ACCEPT, hand-off at once), worker
           results (DONE at once), zygote reports, status clients;
        2. signals, so a stop or reload acts before new work is handed out;
        3. reap: a dead zygote's requests get EIO before anything waits on it;
        4. deadlines: kill overrunning workers (ETIMEDOUT) and fail expired
           queued requests before dispatch could hand them out too late;
        5. accept what admission now allows (a sweep, or READYs owed while the
           queue was full), then dispatch the queue to spare workers;
        6. refill the reserve: after dispatch, so the fork requests count what
           this pass used; the zygote forks while the loop waits again;
        7. upkeep: replace a dead zygote, forget exited workers, notify, and
           send log lines kept while syslog was behind (tlshd/log.py)."""
        for key, events in self.selector.select(self.next_timeout()):
            key.data(events)
        for signum in self.signals.drain():
            self.dispatch_signal(signum)
        self.reap_children()
        now = time.monotonic()
        self.murder_workers(now)
        self.broker.expire(now)
        if self.accepting and (self.accept_owed or now >= self.next_sweep):
            self.accept_requests()
        self.broker.dispatch(time.monotonic())
        self.refill_reserve()
        self.zygote_upkeep(time.monotonic())
        self.status.expire_clients(now)
        self.update_notify(time.monotonic())
        flush_syslog_backlog()

    def next_timeout(self) -> float:
        now = time.monotonic()
        wakeups = [now + LOOP_MAX_WAIT_S, now + self.notifier.next_wakeup(now)]
        if self.accepting:
            wakeups.append(self.next_sweep)
        if (deadline := self.broker.next_deadline()) is not None:
            wakeups.append(deadline)
        if self.grace_deadline is not None:
            wakeups.append(self.grace_deadline)
        if self.pool.live_zygote(self.generation.number) is None and not self.stopping:
            wakeups.append(self.respawn_at)
        return max(0.0, min(wakeups) - now)

    def unwatch(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    # --- signals --------------------------------------------------------------

    def dispatch_signal(self, signum: int) -> None:
        name = SIGNAL_NAMES.get(signum)
        handler = getattr(self, f"handle_{name}", None) if name else None
        if handler is None:
            log.warning("ignoring unexpected signal %d", signum)
            return
        handler()

    def handle_hup(self) -> None:
        """Reload the configuration and credentials (a new generation and zygote)."""
        self.reload()

    def handle_usr1(self) -> None:
        """Same as SIGHUP, as upstream."""
        self.reload()

    def handle_term(self) -> None:
        """Graceful stop: in-flight handshakes get GRACEFUL_TIMEOUT_S to finish."""
        self.begin_stop(GRACEFUL_TIMEOUT_S)

    def handle_int(self) -> None:
        """Quick stop: no grace period for in-flight handshakes."""
        self.begin_stop(0.0)

    def handle_chld(self) -> None:
        """A zygote (or an orphaned worker) exited; `reap_children` runs on every pass."""

    # --- accepting requests -----------------------------------------------------

    def _on_netlink(self, _events: int) -> None:
        try:
            batch = self.netlink.read_notifications()
        except OSError as err:
            raise HaltServer(f"netlink notification socket failed: {err}") from err
        if batch.should_accept and self.accepting:
            if batch.overrun:
                log.warning("netlink notifications were lost (ENOBUFS); accepting until empty")
            self.accept_requests()

    def accept_requests(self) -> None:
        """ACCEPT up to MAX_ACCEPTS_PER_PASS requests while admission allows,
        handing each to a spare worker at once.  Requests beyond the bound stay
        pending in the kernel; `accept_owed` brings us back when there is room."""
        self.next_sweep = time.monotonic() + ACCEPT_SWEEP_INTERVAL_S
        self.accept_owed = False
        for _ in range(MAX_ACCEPTS_PER_PASS):
            if not self.broker.can_accept():
                self.accept_owed = True
                return
            try:
                params = self.netlink.accept()
            except NetlinkDecodeError:
                continue  # the codec logged it and failed the fd
            except OSError as err:
                log_oserror("ACCEPT", err)
                if err.errno in FD_EXHAUSTED:
                    self.accept_owed = True
                return
            if params is None:
                return
            self.broker.enqueue(params, self.config)
            self.broker.dispatch(time.monotonic())
        self.accept_owed = True  # more may be pending: next pass, no wait

    # --- zygotes ----------------------------------------------------------------------

    def spawn_zygote(self) -> ZygoteHandle | None:
        from tlshd.workers.zygote import Zygote

        generation = self.generation

        def build(channel: socket.socket) -> Zygote:
            return Zygote(channel, generation, self.engine, self.close_in_child, self.install_ktls)

        try:
            zygote = self.pool.spawn_zygote(generation.number, build)
        except OSError as err:
            log.error("cannot fork a zygote: %s; retrying", err)
            self.respawn_at = time.monotonic() + 1.0
            return None
        self.watch_zygote(zygote)
        return zygote

    def watch_zygote(self, zygote: ZygoteHandle) -> None:
        assert zygote.sock is not None
        self.selector.register(
            zygote.sock, selectors.EVENT_READ, lambda _ev, z=zygote: self._on_zygote_readable(z)
        )

    def _on_zygote_readable(self, zygote: ZygoteHandle) -> None:
        for _ in range(4 * MAX_OUTSTANDING_FORKS):
            if zygote.sock is None:
                return
            try:
                message, fds = self.pool.receive_report(zygote)
            except (BlockingIOError, InterruptedError):
                return
            except (ipc.IpcError, OSError) as err:
                log.error("zygote %d: %s; killing it", zygote.pid, err)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(zygote.pid, 9)  # our child, not yet reaped: no pid reuse
                self.zygote_lost(zygote, "it misbehaved")
                return
            if message is None:
                self.zygote_lost(zygote, "it exited")
                return
            try:
                self.handle_zygote_message(zygote, message, fds)
            except ipc.IpcError as err:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                log.error("zygote %d sent an invalid message: %s", zygote.pid, err)

    def handle_zygote_message(
        self, zygote: ZygoteHandle, message: dict[str, Any], fds: list[int]
    ) -> None:
        op = message["op"]
        if op == "zygote_ready":
            if ipc.check_int(message, "pid", 1, 2**31) != zygote.pid:
                raise ipc.IpcError("'zygote_ready' names another pid")
            zygote.ready_at = time.monotonic()
            self.zygote_deaths = 0
            log.debug(
                "zygote %d ready (generation %d) in %.2f s",
                zygote.pid,
                zygote.generation,
                zygote.ready_at - zygote.spawned_at,
            )
        elif op == "forked":
            token = ipc.check_int(message, "token", 1, 2**63)
            pid = ipc.check_int(message, "pid", 1, 2**31)
            pidfd = fds[0] if fds else None
            worker = self.pool.workers.get(token)
            if worker is None or worker.zygote_pid != zygote.pid:
                if pidfd is not None:
                    with contextlib.suppress(OSError):
                        os.close(pidfd)
                return
            try:
                if (message.get("shared") is True) != worker.shared:
                    raise ipc.IpcError("'forked' does not say what kind of worker was asked for")
                worker.forked(pid, pidfd, zygote.pid)
            except ipc.IpcError as err:
                self.broker.reject_worker(worker, str(err))
        elif op == "fork_failed":
            token = ipc.check_int(message, "token", 1, 2**63)
            fork_errno = ipc.check_int(message, "errno", 0, MAX_ERRNO)
            log.error("zygote %d cannot fork a worker: %s", zygote.pid, os.strerror(fork_errno))
            self.forks_paused_until = time.monotonic() + 0.5  # EAGAIN: let processes exit
            if (worker := self.pool.workers.get(token)) is not None:
                if (request := worker.release_request()) is not None:
                    self.queue.push(request)
                worker.reaped = True
                self.broker.close_worker(worker)
        elif op == "exited":
            self.worker_exited(
                ipc.check_int(message, "pid", 1, 2**31), ipc.check_int(message, "status", 0, 2**16)
            )

    def worker_exited(self, pid: int, status: int) -> None:
        """A worker's wait status, from its zygote or from our own waitpid
        (a worker host's: each of its threads)."""
        for worker in self.pool.by_pid(pid):
            self.worker_process_exited(worker, pid, status)

    def worker_process_exited(self, worker: WorkerHandle, pid: int, status: int) -> None:
        worker.exit_status = status
        worker.reaped = True
        if worker.sock is not None:
            # Its `result` may be queued behind the exit report: read it
            # before calling the worker lost, or a finished handshake would
            # get DONE(EIO).
            self.broker.on_worker_readable(worker)
        if worker.sock is not None:
            self.broker.worker_lost(worker, "exited")
        text, level = describe_exit(status)
        if worker.killed:
            log.debug("worker %d was killed by the supervisor", pid)
        elif status != 0:
            log.log(level, "worker %d %s", pid, text)
        if worker.ready_at is None and not worker.killed and is_boot_error(status):
            raise HaltServer("workers cannot start (see the worker's error above)")

    def zygote_lost(self, zygote: ZygoteHandle, reason: str) -> None:
        """Its channel closed: fail its workers' requests with EIO now and
        kill its workers (they are reparented to us, and reaped here)."""
        if zygote.sock is not None:
            self.unwatch(zygote.sock)
            zygote.close_channel()
        if zygote.retiring:
            return
        log.error("zygote %d is gone (%s)", zygote.pid, reason)
        if zygote.exit_status is None:
            # Our child, not yet reaped: its pid cannot have been reused.  One
            # that closed its channel and lives on is of no use.
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote.pid, 9)
        for worker in self.pool.of_zygote(zygote):
            if worker.request is not None:
                worker.request.log.error("the zygote of worker %s died", worker.pid)
            self.broker.kill_worker(worker, errno.EIO, "the zygote died")
            if worker.pidfd is None:
                worker.reaped = True  # never forked, or we cannot know: forget it

    def retire_zygote(self, zygote: ZygoteHandle) -> None:
        """Let a zygote go: it reads EOF and exits; its busy workers finish."""
        zygote.retiring = True
        if zygote.sock is not None:
            self.unwatch(zygote.sock)
            zygote.close_channel()
        for worker in self.pool.of_zygote(zygote):
            if worker.spare:
                self.broker.close_worker(worker)
                worker.let_go()
            if worker.pid is None:
                # Its `forked` report is lost with the channel; it exits on
                # EOF and is reaped by reap_children() as an unknown orphan.
                worker.reaped = True

    def reap_children(self) -> None:
        for pid, status in self.pool.reap_children():
            zygote = self.pool.zygotes.pop(pid, None)
            if zygote is None:
                self.worker_exited(pid, status)  # orphaned by a dead zygote
                continue
            zygote.exit_status = status
            self.zygote_lost(zygote, "it exited")
            text, level = describe_exit(status)
            if zygote.retiring or self.stopping:
                log.debug("zygote %d %s", pid, text)
                continue
            log.log(max(level, 30), "zygote %d %s", pid, text)
            if zygote.ready_at is None and is_boot_error(status):
                raise HaltServer("workers cannot start: the zygote could not (see its error above)")
            if zygote.ready_at is None:
                self.zygote_deaths += 1
            # Replace it, backing off if zygotes keep dying before they are ready.
            delay = min(RESPAWN_BACKOFF_MAX_S, 0.25 * (2**self.zygote_deaths - 1))
            self.respawn_at = time.monotonic() + delay

    def zygote_upkeep(self, now: float) -> None:
        """Replace a dead zygote of the current generation; forget exited workers."""
        self.pool.forget_finished()
        if self.stopping:
            return
        current = self.pool.live_zygote(self.generation.number)
        unreaped = any(
            z.generation == self.generation.number and not z.retiring
            for z in self.pool.zygotes.values()
        )
        if current is None and not unreaped and now >= self.respawn_at:
            # Only once the dead one is reaped: its exit status decides
            # between a replacement and a halt (WORKER_BOOT_ERROR).
            self.spawn_zygote()
        elif (
            current is not None
            and current.ready_at is None
            and now - current.spawned_at > ZYGOTE_BOOT_TIMEOUT_S
        ):
            log.error("zygote %d did not become ready; killing it", current.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(current.pid, 9)
            self.zygote_lost(current, "it did not become ready")

    def refill_reserve(self) -> None:
        """Ask the zygote for workers: the reserve, plus one per queued
        request that dispatch would start now (`Broker.workers_wanted`), within
        `[pool] max_workers` live workers.  Not one per queued request: a
        forked worker holds 1-1.5 MiB of its own before its handshake starts."""
        if self.stopping or time.monotonic() < self.forks_paused_until:
            return
        zygote = self.pool.live_zygote(self.generation.number)
        if zygote is None or zygote.ready_at is None:
            return
        pool_config = self.config.pool
        census = self.pool.census(self.generation.number)
        wanted = pool_config.min_workers + self.broker.workers_wanted() - census.spare
        shared = pool_config.handshakes_per_worker > 1
        # Where workers share hosts, a request that needs keys still gets a
        # process of its own, forked when it is queued (workers/host.py).
        single = 0
        if shared:
            single = self.broker.keyed_queued() - census.spare_own
            wanted = max(wanted, single)
        count = min(
            wanted,
            pool_config.max_workers - census.live,
            MAX_OUTSTANDING_FORKS - census.unforked,
        )
        for n in range(max(0, count)):
            if not self.broker.can_add_worker():
                return
            worker = self.pool.request_worker(zygote, shared=shared and n >= single)
            if worker is None:
                return
            assert worker.sock is not None
            self.selector.register(
                worker.sock,
                selectors.EVENT_READ,
                lambda _ev, w=worker: self.broker.on_worker_readable(w),
            )

    def murder_workers(self, now: float) -> None:
        """Kill workers stuck before `ready`, and everything busy after the grace period."""
        for worker in self.pool:
            if (
                worker.state is WorkerState.STARTING
                and now - worker.requested_at > WORKER_BOOT_TIMEOUT_S
            ):
                log.error("worker %s did not become ready; killing it", worker.pid)
                self.broker.kill_worker(worker, errno.EIO, "worker did not boot")
        if self.grace_deadline is not None and now >= self.grace_deadline:
            for worker in self.pool.busy():
                assert worker.request is not None
                worker.request.log.error("daemon stopping; abandoning the handshake")
                self.broker.kill_worker(worker, errno.EIO, "the daemon is stopping")

    def close_in_child(self) -> None:
        """Runs in a freshly forked zygote: drop the supervisor's resources
        through their owners, so no object later closes a reused fd number."""
        self.signals.close_in_child()
        self.status.close_in_child()
        self.notifier.close()
        for worker in self.pool:
            worker.forget()
        for zygote in self.pool.zygotes.values():
            zygote.close_channel()
        for request in [*self.queue, *(w.request for w in self.pool.busy())]:
            if request is not None:
                request.sock.close()
        with contextlib.suppress(OSError):
            self.netlink.close()
        self.selector.close()

    # --- reload ---------------------------------------------------------------------

    def reload(self) -> None:
        if self.stopping:
            return
        self.notifier.reloading()
        try:
            # Parsed here, not in the new zygote, so that a file that does not
            # parse keeps the current generation serving.  The supervisor
            # then holds cryptography for the rest of its life (memory only).
            from tlshd.credentials import load_credentials

            config = load_config(self.config_path)
            credentials = load_credentials(config)
            keyservice = self._keyservice_for(config)
        except (ConfigError, CredentialsError, OSError, MemoryError) as err:
            log.error("reload failed; keeping the current configuration: %s", err)
            self.notifier.ready()
            return
        for warning in config.warnings:
            log.warning("%s", warning)
        set_debug(config.loglevel != 0)
        if config.status_socket != self.status.path:
            log.warning("the status socket moves to %s only on restart", config.status_socket)
        number = self.generation.number + 1
        self.generation = Generation(number, config, credentials, keyservice)
        self.generations[number] = self.generation
        self.broker.current = number
        self.broker.max_queued = config.pool.max_queued
        log.info("configuration reloaded from %s (generation %d)", self.config_path, number)
        for zygote in list(self.pool.zygotes.values()):
            if zygote.generation != number and not zygote.retiring:
                self.retire_zygote(zygote)
        self.respawn_at = 0.0
        self.spawn_zygote()
        self.prune_generations()
        self.notifier.ready()

    def prune_generations(self) -> None:
        live = {w.generation for w in self.pool} | {self.generation.number}
        for number in list(self.generations):
            if number not in live:
                del self.generations[number]

    # --- stop -----------------------------------------------------------------------

    def begin_stop(self, grace_s: float) -> None:
        now = time.monotonic()
        if self.stopping:
            # A second signal shortens the grace period.
            self.grace_deadline = min(self.grace_deadline or now, now + grace_s)
            return
        log.info("stopping: %d in flight, %d queued", self.broker.in_flight(), len(self.queue))
        self.stopping = True
        self.accepting = False
        self.grace_deadline = now + grace_s
        self.notifier.stopping()
        self.broker.fail_queued(errno.EIO, "the daemon is stopping")
        for zygote in list(self.pool.zygotes.values()):
            self.retire_zygote(zygote)

    def stop_complete(self) -> bool:
        return self.broker.in_flight() == 0

    def finish_stop(self) -> None:
        """Reap the zygotes and every worker within REAP_TIMEOUT_S, killing stragglers."""
        for worker in self.pool:
            self.broker.close_worker(worker)
        self.reap_all(REAP_TIMEOUT_S)
        for worker in self.pool:
            log.warning("worker %s did not exit; killing it", worker.pid)
            worker.kill()
        for zygote in self.pool.zygotes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote.pid, 9)
        self.reap_all(REAP_TIMEOUT_S)

    def reap_all(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while True:
            for pid, status in self.pool.reap_children():
                if self.pool.zygotes.pop(pid, None) is None:
                    with contextlib.suppress(HaltServer):
                        self.worker_exited(pid, status)
            self.pool.forget_finished()
            if not (self.pool.zygotes or len(self.pool)) or time.monotonic() >= end:
                return
            time.sleep(0.02)

    def emergency_stop(self) -> None:
        """After an error: fail everything now, kill every worker, reap."""
        self.stopping = True
        self.accepting = False
        self.broker.fail_queued(errno.EIO, "the daemon is stopping")
        for worker in self.pool:
            self.broker.kill_worker(worker, errno.EIO, "the daemon is stopping")
        for zygote in list(self.pool.zygotes.values()):
            self.retire_zygote(zygote)
        self.reap_all(REAP_TIMEOUT_S)

    def close(self) -> None:
        self.notifier.stopping()
        self.status.close()
        self.signals.close()
        with contextlib.suppress(OSError, RuntimeError):
            self.netlink.close()
        self.selector.close()
        self.notifier.close()
        drain_syslog_backlog()

    # --- status -------------------------------------------------------------------

    def update_notify(self, now: float) -> None:
        current = self.generation.number
        census = self.pool.census(current)
        idle = census.idle
        zygote = self.pool.live_zygote(current)
        if (
            not self.ready_sent
            and not self.stopping
            and zygote is not None
            and zygote.ready_at is not None
            and idle >= 1
        ):
            # Ready once a worker is: the rest of the reserve is seconds
            # away at most, and start-up time is what systemd waits on.
            self.ready_sent = True
            # The line first, then READY: systemd starts dependent units (NFS
            # mounts) the moment READY arrives, and the benchmark and the lab
            # take the line as the moment the daemon is ready.
            log.info(
                "tlshd supervisor %d serving handshakes, %.2f s after exec "
                "(zygote ready in %.2f s; %d spare workers, at most %d)",
                os.getpid(),
                process_age_s(),
                zygote.ready_at - zygote.spawned_at,
                idle,
                self.config.pool.max_workers,
            )
            self.notifier.ready()
            trim_heap()  # after READY: it costs time, and saves memory for as long as we run
            # From now on the supervisor's ACCEPTs and DONEs race the consumers'
            # timers: it runs before the handshakes (supervisor/priority.py).  Not
            # before: start-up is the zygote's, and in the lab a real-time
            # supervisor from start() on made READY 0.35 s later in two A/B pairs.
            log.debug("supervisor %d runs at %s", os.getpid(), raise_supervisor_priority())
        self.notifier.set_status(
            f"{census.live} workers ({idle} idle), {self.broker.in_flight()} in flight, "
            f"{len(self.queue)} queued, {self.stats.done} done, {self.stats.failed} failed"
        )
        self.notifier.tick(now)

    def snapshot(self) -> dict[str, Any]:
        return build_status(self)


def process_age_s() -> float:
    """Seconds since this process was started (exec'd, or forked), from /proc."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            now = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0
    return now - start_ticks / os.sysconf("SC_CLK_TCK")


def run_daemon(config_path: str, config: Config, first_zygote: FirstZygote) -> int:
    """The daemon's life after the command line loaded the config and forked
    the first zygote (supervisor/firstzygote.py); the exit status."""
    from .tlsmodule import ensure_tls_module

    set_title("tlshd: supervisor")
    try:
        arbiter = Arbiter(
            config_path, config, prepare_kernel=ensure_tls_module, first_zygote=first_zygote
        )
    except ImportError as err:
        log.error("cannot start: %s", err)
        first_zygote.abandon()
        return 1
    return arbiter.run()


__all__ = ["Arbiter", "HaltServer", "HandshakeParams", "run_daemon"]
