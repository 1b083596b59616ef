"""The supervisor: owns the netlink socket, the keys and the worker pool.

Process model
    One single-threaded, privileged supervisor and a pool of pre-forked,
    unprivileged workers that each run one TLS handshake at a time.

    * The supervisor alone holds the `handshake` netlink sockets.  It ACCEPTs
      every request (READY, ENOBUFS, or a periodic sweep for lost READYs),
      keeps the fd the kernel installed for it, and queues the request with
      a deadline.  Idle workers get queued requests oldest deadline first:
      a copy of the fd goes by SCM_RIGHTS (supervisor/handoff.py).
    * The kernel resolves DONE's SOCKFD in the sender's fd table, so DONE
      comes from the supervisor, with its own fd number, after the worker's
      `result` (or the worker's death, deadline, junk, or shutdown); then the
      supervisor closes its copy.  Every accepted request gets exactly one
      DONE, on every path.
    * The loop waits on one selector: the netlink notify socket, the signal
      wake-up pipe, every worker's channel and the status socket.  Signal
      handlers only record; `handle_<name>` methods run in the loop.
    * Workers are untrusted.  Every message is validated (tlshd/ipc.py);
      a worker that sends junk is killed and its request fails with EIO.  The
      supervisor never blocks on a worker: channels are non-blocking and a
      full channel counts as a broken worker.
    * A worker inherits, through fork, the generation (Config + Credentials)
      current at fork time, and nothing else: it closes every other fd,
      including accepted sockets of other requests (workers/base.py).
    * Reload (SIGHUP/SIGUSR1) builds a new generation and swaps it in only if
      both the config and the credentials load.  New requests go to workers of
      the new generation; idle old workers are retired at once, busy ones
      after their handshake.
    * Stop (SIGTERM): stop accepting, fail queued requests with EIO, let
      in-flight handshakes finish for up to GRACEFUL_TIMEOUT_S, then fail the
      rest with EIO and kill their workers; reap every worker (bounded), and
      return 0.  SIGINT does the same without the grace period.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

from tlshd import ipc
from tlshd.config import Config, ConfigError, load_config
from tlshd.credentials import Credentials, CredentialsError, load_credentials
from tlshd.log import log, log_oserror, set_debug
from tlshd.netlink import HandshakeFamilyMissing, HandshakeNetlink, NetlinkDecodeError
from tlshd.params import Engine, HandshakeParams, HandshakeResult
from tlshd.proctitle import set_title
from tlshd.uapi import MsgType

from . import handoff
from .memory import tree_memory
from .notify import Notifier
from .pool import (
    WORKER_BOOT_ERROR,
    Generation,
    WorkerHandle,
    WorkerPool,
    WorkerState,
    describe_exit,
)
from .queue import DeadlineQueue, Request
from .signals import SIGNAL_NAMES, SignalQueue
from .stats import CompletionStats
from .status import StatusServer

LOOP_MAX_WAIT_S = 1.0
ACCEPT_SWEEP_INTERVAL_S = 2.0  # recovers requests whose READY was lost
# ACCEPTs per loop pass: a burst is taken in slices, so worker results, deaths
# (DONE at once) and hand-offs are served between slices rather than after the
# whole burst; a full slice makes the next pass accept again without waiting.
MAX_ACCEPTS_PER_PASS = 8
MAX_SPAWNS_PER_PASS = 2
SUPERVISOR_NICE = -5
MAX_MESSAGES_PER_WAKEUP = 32  # per worker, so one chatty worker cannot starve the loop
# A consumer that sends TIMEOUT runs its own timer of that length; finish
# inside it, since a DONE after its cancel is silently dropped.
CONSUMER_TIMEOUT_MARGIN_MS = 500
MIN_BUDGET_MS = 100
BOOT_TIMEOUT_S = 15.0
RETIRE_KILL_AFTER_S = 5.0
IDLE_RETIRE_AFTER_S = 30.0
RSS_CHECK_INTERVAL_S = 5.0
GRACEFUL_TIMEOUT_S = 2.0
REAP_TIMEOUT_S = 3.0
MAX_CONSECUTIVE_BOOT_DEATHS = 5


class HaltServer(Exception):
    """Stop the daemon with `exit_status`; `reason` is logged."""

    def __init__(self, reason: str, exit_status: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


def handshake_budget_s(params: HandshakeParams, config: Config) -> float:
    """Seconds from ACCEPT to the deadline of this request."""
    if params.timeout_ms:
        margin = min(CONSUMER_TIMEOUT_MARGIN_MS, params.timeout_ms // 10)
        budget_ms = params.timeout_ms - margin
    else:
        budget_ms = config.worker.handshake_timeout_ms
    return max(budget_ms, MIN_BUDGET_MS) / 1000


def _default_engine() -> Engine:
    from tlshd.workers.engine import perform_handshake

    return perform_handshake


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
        keyservice: Any = None,
        engine: Engine | None = None,
        install_ktls: Callable[[socket.socket, bytes, bytes], None] | None = None,
        ktls_state: Callable[[socket.socket], tuple[str, bool, bool]] = handoff.ktls_state,
        notifier: Notifier | None = None,
        prepare_kernel: Callable[[], object] | None = None,
    ) -> None:
        self.config_path = config_path
        self._keyservice_for = (
            (lambda _c: keyservice) if keyservice is not None else _default_keyservice
        )
        if credentials is None:
            credentials = load_credentials(config)
        self.generation = Generation(1, config, credentials, self._keyservice_for(config))
        self.generations: dict[int, Generation] = {1: self.generation}
        self.netlink = netlink if netlink is not None else HandshakeNetlink()
        self.engine = engine if engine is not None else _default_engine()
        self.install_ktls = install_ktls
        self.ktls_state = ktls_state
        self.notifier = notifier if notifier is not None else Notifier()
        self.prepare_kernel = prepare_kernel
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue()
        self.pool = WorkerPool()
        self.queue = DeadlineQueue()
        self.stats = CompletionStats()
        self.status = StatusServer(config.status_socket, self.selector, self.snapshot)
        self.started_at = time.monotonic()
        self.next_req_id = 1
        self.next_sweep = 0.0
        self.next_rss_check = 0.0
        self.accepting = False
        self.stopping = False
        self.grace_deadline: float | None = None
        self.ready_sent = False
        self.boot_deaths = 0
        self._last_worker_count = -1
        self.spawn_backlog = False  # more workers wanted than forked this pass

    @property
    def config(self) -> Config:
        return self.generation.config

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
        # The supervisor's ACCEPTs and DONEs run against the consumers' timers
        # and cost little CPU: let it win the CPU over the handshakes (workers
        # go back to 0 after fork).  Unprivileged: keep the inherited value.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, SUPERVISOR_NICE)
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
        if self.prepare_kernel is not None:
            self.prepare_kernel()
        self.accepting = True
        self.manage_workers()
        log.info(
            "tlshd supervisor %d serving handshakes (pool %d..%d workers)",
            os.getpid(),
            self.config.pool.min_workers,
            self.config.pool.max_workers,
        )

    def run_once(self) -> None:
        """One pass of the loop: wait, dispatch, then the periodic duties."""
        for key, events in self.selector.select(self.next_timeout()):
            key.data(events)
        for signum in self.signals.drain():
            self.dispatch_signal(signum)
        now = time.monotonic()
        if self.accepting and now >= self.next_sweep:
            self.accept_requests()
        self.murder_workers(now)
        self.reap_workers()
        self.expire_queued(now)
        self.dispatch_queued(now)
        self.manage_workers()
        self.status.expire_clients(now)
        self.update_notify(now)

    def next_timeout(self) -> float:
        if self.spawn_backlog:
            return 0.0
        now = time.monotonic()
        wakeups = [now + LOOP_MAX_WAIT_S, now + self.notifier.next_wakeup(now)]
        if self.accepting:
            wakeups.append(self.next_sweep)
        if (queued := self.queue.next_deadline()) is not None:
            wakeups.append(queued)
        wakeups += [w.request.deadline for w in self.pool if w.request is not None]
        if self.grace_deadline is not None:
            wakeups.append(self.grace_deadline)
        return max(0.0, min(wakeups) - now)

    # --- signals --------------------------------------------------------------

    def dispatch_signal(self, signum: int) -> None:
        name = SIGNAL_NAMES.get(signum)
        handler = getattr(self, f"handle_{name}", None) if name else None
        if handler is None:
            log.warning("ignoring unexpected signal %d", signum)
            return
        handler()

    def handle_hup(self) -> None:
        """Reload the configuration and credentials (new generation of workers)."""
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
        """A worker exited; `reap_workers` runs on every pass anyway."""

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
        """ACCEPT up to MAX_ACCEPTS_PER_PASS requests, handing each to an idle
        worker at once; if the kernel may have more, the next pass accepts again."""
        self.next_sweep = time.monotonic() + ACCEPT_SWEEP_INTERVAL_S
        for _ in range(MAX_ACCEPTS_PER_PASS):
            try:
                params = self.netlink.accept()
            except NetlinkDecodeError:
                continue  # the codec logged it and failed the fd
            except OSError as err:
                log_oserror("ACCEPT", err)
                return
            if params is None:
                return
            self.enqueue(params)
            self.dispatch_queued(time.monotonic())
        self.next_sweep = time.monotonic()  # more may be pending: next pass, no wait

    def enqueue(self, params: HandshakeParams) -> None:
        now = time.monotonic()
        req_id = self.next_req_id
        self.next_req_id += 1
        budget = handshake_budget_s(params, self.config)
        request = handoff.open_request(params, req_id, now, budget)
        if request is None:
            return
        request.log.debug(
            "accepted %s request (auth mode %d), fd %d, deadline in %.1f s",
            request.role,
            params.auth_mode,
            params.sockfd,
            budget,
        )
        self.queue.push(request)

    # --- finishing requests ------------------------------------------------------

    def finish(self, request: Request, status: int, detail: str = "") -> None:
        self.finish_with(request, HandshakeResult(status=status, detail=detail))

    def finish_with(self, request: Request, result: HandshakeResult) -> None:
        handoff.complete(self.netlink, request, result, self.stats)

    def expire_queued(self, now: float) -> None:
        for request in self.queue.pop_expired(now):
            self.finish(request, errno.ETIMEDOUT, "no worker became free before the deadline")

    def dispatch_queued(self, now: float) -> None:
        """Hand queued requests to idle workers: first the other half of a
        connection whose first half has a worker (both ends local), then the
        earliest deadline.  A half alone only waits for its peer."""
        if not self.queue:
            return
        idle = [
            w
            for w in self.pool
            if w.state is WorkerState.IDLE and w.generation == self.generation.number
        ]
        idle.sort(key=lambda w: w.idle_since, reverse=True)  # warmest first
        if not idle:
            return
        in_flight = {w.request.pair_key for w in self.pool if w.request is not None}
        while self.queue and idle:
            worker = idle.pop(0)
            request = self.queue.pop_partner(in_flight) or self.queue.pop()
            self.hand_off(worker, request, now)
            in_flight.add(request.pair_key)

    def hand_off(self, worker: WorkerHandle, request: Request, now: float) -> None:
        assert worker.sock is not None
        try:
            handoff.hand_off(worker.sock, worker.pid, request, now)
        except (OSError, ipc.IpcError) as err:
            # Nothing was sent (SOCK_SEQPACKET is all or nothing): the request
            # waits for another worker; this one is broken.
            request.log.warning("hand-off to worker %d failed: %s", worker.pid, err)
            self.queue.push(request)
            self.kill_worker(worker, errno.EIO, "its channel is full or broken")
            return
        worker.state = WorkerState.BUSY
        worker.request = request
        worker.phase = "handoff"

    # --- worker messages ---------------------------------------------------------

    def _on_worker_readable(self, worker: WorkerHandle) -> None:
        for _ in range(MAX_MESSAGES_PER_WAKEUP):
            if worker.sock is None:
                return
            try:
                message, fds = ipc.recv_message(worker.sock, ipc.WORKER_OPS)
            except (BlockingIOError, InterruptedError):
                return
            except ipc.IpcError as err:
                self.reject_worker(worker, str(err))
                return
            except OSError as err:
                self.worker_lost(worker, f"channel error: {err}")
                return
            if message is None:
                if _hung_up(worker.sock):
                    # Usually it died; but one that closed its channel and lives
                    # on is beyond supervision and may still hold a consumer's
                    # socket.  Not reaped yet (exit_status None), so its pid
                    # cannot have been reused.
                    if worker.exit_status is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.pid, signal.SIGKILL)
                    self.worker_lost(worker, "closed its channel")
                else:  # a zero-length datagram reads like EOF, but the worker is alive
                    self.reject_worker(worker, "an empty datagram")
                return
            if fds:
                for fd in fds:
                    os.close(fd)
                self.reject_worker(worker, "a worker never sends file descriptors")
                return
            try:
                self.handle_worker_message(worker, message)
            except ipc.IpcError as err:
                self.reject_worker(worker, str(err))
                return

    def handle_worker_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "ready":
            self.on_ready(worker, message)
        elif op == "phase":
            self.on_phase(worker, message)
        elif op in ipc.KEY_OPS:
            self.on_key_request(worker, message)
        elif op == "result":
            self.on_result(worker, message)

    def on_ready(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        if worker.ready_at is not None or worker.state not in (
            WorkerState.BOOTING,
            WorkerState.RETIRING,  # retired while booting (a reload): it exits soon
        ):
            raise ipc.IpcError(f"'ready' from a worker in state {worker.state.value}")
        if ipc.check_int(message, "pid", 1, 2**31) != worker.pid:
            raise ipc.IpcError("'ready' names another pid")
        if ipc.check_int(message, "generation", 0, 2**31) != worker.generation:
            raise ipc.IpcError("'ready' names another generation")
        now = time.monotonic()
        worker.ready_at = worker.idle_since = now
        if worker.state is WorkerState.BOOTING:
            worker.state = WorkerState.IDLE
        self.boot_deaths = 0
        log.debug("worker %d ready (generation %d)", worker.pid, worker.generation)

    def on_phase(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        ipc.check_req(message, self._current_req_id(worker))
        worker.phase = ipc.check_str(message, "phase", ipc.MAX_PHASE_LEN)
        ipc.check_str(message, "peer", ipc.MAX_PEER_LEN)

    def on_key_request(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        ipc.check_req(message, self._current_req_id(worker))
        request = worker.request
        assert request is not None
        key_request = ipc.KeyRequest.from_message(message)
        reply = self.answer_key_request(worker, request, key_request)
        if reply.ok and reply.serial:
            request.known_serials.add(reply.serial)
        try:
            ipc.send_message(worker.sock, reply.to_message(key_request.id))  # type: ignore[arg-type]
        except (OSError, ipc.IpcError) as err:
            self.kill_worker(worker, errno.EIO, f"cannot send its key reply: {err}")

    def answer_key_request(
        self, worker: WorkerHandle, request: Request, key_request: ipc.KeyRequest
    ) -> ipc.KeyReply:
        from .keyservice import RequestScope

        keyservice = self.generations[worker.generation].keyservice
        if request.key_scope is None:  # one scope per request: it counts PSK searches
            request.key_scope = RequestScope.from_params(request.params)
        try:
            return keyservice.answer(request.key_scope, key_request)
        except Exception:
            request.log.exception("key request %s failed", key_request.op)
            return ipc.KeyReply.failure(errno.EIO)

    def on_result(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        ipc.check_req(message, self._current_req_id(worker))
        request = worker.request
        assert request is not None
        result = ipc.check_result(message)
        unknown = set(result.remote_auth) - request.known_serials
        if request.params.message_type == MsgType.SERVERHELLO:
            # An x509 server reports UINT_MAX per client certificate (no key), as upstream.
            unknown.discard(ipc.X509_SERVER_PEER_ID)
        if unknown:
            raise ipc.IpcError(f"remote_auth names keys {sorted(unknown)} unknown to this request")
        worker.request = None
        worker.handshakes += 1
        worker.phase = ""
        self.finish_with(request, handoff.checked_result(request, result, self.ktls_state))
        worker.state = WorkerState.IDLE
        worker.idle_since = time.monotonic()
        if self.stopping or worker.generation != self.generation.number:
            self.retire_worker(worker)

    @staticmethod
    def _current_req_id(worker: WorkerHandle) -> int | None:
        return worker.request.req_id if worker.request is not None else None

    # --- worker deaths ------------------------------------------------------------

    def reject_worker(self, worker: WorkerHandle, reason: str) -> None:
        log.error("worker %d sent an invalid message (%s); killing it", worker.pid, reason)
        self.kill_worker(worker, errno.EIO, "the worker misbehaved")

    def kill_worker(self, worker: WorkerHandle, status: int, reason: str) -> None:
        """SIGKILL a worker and fail its request with `status` at once."""
        self.pool.signal(worker, signal.SIGKILL)
        if worker.request is not None:
            request, worker.request = worker.request, None
            self.finish(request, status, reason)
        self.mark_dead(worker)

    def worker_lost(self, worker: WorkerHandle, reason: str) -> None:
        """The worker's channel closed: it died (or exited); fail its request now."""
        if worker.request is not None:
            request, worker.request = worker.request, None
            request.log.error("worker %d died during the handshake (%s)", worker.pid, reason)
            self.finish(request, errno.EIO, "the worker died")
        self.mark_dead(worker)

    def mark_dead(self, worker: WorkerHandle) -> None:
        if worker.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.sock)
            worker.close_channel()
        worker.state = WorkerState.DEAD

    def reap_workers(self) -> None:
        for worker in self.pool.reap():
            if worker.sock is not None:
                # A worker may send its `result` and exit (SIGTERM during a
                # stop) after this pass's select(): read what it queued before
                # calling it lost, or a finished handshake would get DONE(EIO).
                self._on_worker_readable(worker)
            if worker.sock is not None:
                self.worker_lost(worker, "exited")
            assert worker.exit_status is not None
            self.log_worker_exit(worker)
            retired = worker.killed or worker.retire_sent_at is not None
            if worker.ready_at is None and not retired and not self.stopping:
                self.note_boot_death(worker)
        self.prune_generations()

    def log_worker_exit(self, worker: WorkerHandle) -> None:
        assert worker.exit_status is not None
        if worker.killed:
            log.debug("worker %d was killed by the supervisor", worker.pid)
            return
        text, level = describe_exit(worker.exit_status)
        if worker.retire_sent_at is not None and level < logging.ERROR:
            level = logging.DEBUG  # retired on purpose
        log.log(level, "worker %d %s", worker.pid, text)

    def note_boot_death(self, worker: WorkerHandle) -> None:
        assert worker.exit_status is not None
        if (
            os.WIFEXITED(worker.exit_status)
            and os.WEXITSTATUS(worker.exit_status) == WORKER_BOOT_ERROR
        ):
            raise HaltServer("workers cannot start (see the worker's error above)")
        self.boot_deaths += 1
        if self.boot_deaths >= MAX_CONSECUTIVE_BOOT_DEATHS:
            raise HaltServer(f"{self.boot_deaths} workers in a row died before becoming ready")

    def prune_generations(self) -> None:
        live = {w.generation for w in self.pool} | {self.generation.number}
        for number in list(self.generations):
            if number not in live:
                del self.generations[number]

    def murder_workers(self, now: float) -> None:
        """Kill workers past their deadline, stuck booting, or slow to retire."""
        for worker in self.pool:
            if worker.request is not None and now >= worker.request.deadline:
                worker.request.log.error(
                    "worker %d overran the handshake deadline; killing it", worker.pid
                )
                self.kill_worker(worker, errno.ETIMEDOUT, "handshake deadline passed")
            elif worker.state is WorkerState.BOOTING and now - worker.spawned_at > BOOT_TIMEOUT_S:
                log.error("worker %d did not become ready; killing it", worker.pid)
                self.kill_worker(worker, errno.EIO, "worker did not boot")
            elif (
                worker.state is WorkerState.RETIRING
                and worker.retire_sent_at is not None
                and now - worker.retire_sent_at > RETIRE_KILL_AFTER_S
            ):
                log.warning("worker %d did not exit when retired; killing it", worker.pid)
                self.kill_worker(worker, errno.EIO, "worker did not retire")
        if self.grace_deadline is not None and now >= self.grace_deadline:
            for worker in self.pool:
                if worker.request is not None:
                    worker.request.log.error("daemon stopping; abandoning the handshake")
                    self.kill_worker(worker, errno.EIO, "the daemon is stopping")

    # --- pool size -------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Keep min_workers idle, grow for queued requests, retire old and surplus."""
        if self.stopping:
            self.spawn_backlog = False
            return
        now = time.monotonic()
        self.retire_old_generations()
        if now >= self.next_rss_check:
            self.next_rss_check = now + RSS_CHECK_INTERVAL_S
            self.measure_workers()
        self.recycle_workers()
        self.spawn_needed_workers()
        self.retire_surplus_workers(now)
        count = self.pool.count(WorkerState.BOOTING, WorkerState.IDLE, WorkerState.BUSY)
        if count != self._last_worker_count:
            log.debug("%d workers", count)
            self._last_worker_count = count

    def retire_old_generations(self) -> None:
        for worker in self.pool:
            if worker.generation != self.generation.number and worker.state in (
                WorkerState.IDLE,
                WorkerState.BOOTING,
            ):
                self.retire_worker(worker)

    def measure_workers(self) -> None:
        for worker in self.pool:
            if worker.state is WorkerState.DEAD:
                continue
            with contextlib.suppress(psutil.Error):
                worker.rss_bytes = psutil.Process(worker.pid).memory_info().rss

    def recycle_workers(self) -> None:
        pool_config = self.config.pool
        for worker in self.pool.in_state(WorkerState.IDLE):
            if worker.handshakes >= pool_config.max_handshakes:
                log.info(
                    "worker %d served %d handshakes; recycling it", worker.pid, worker.handshakes
                )
                self.retire_worker(worker)
            elif worker.handshakes and worker.rss_bytes > pool_config.max_rss_mib * 1024 * 1024:
                # Only a worker that has served: a fresh one's size is the
                # baseline, and replacing it would only churn.
                log.info("worker %d uses %d MiB; recycling it", worker.pid, worker.rss_bytes >> 20)
                self.retire_worker(worker)

    def spawn_needed_workers(self) -> None:
        pool_config = self.config.pool
        current = self.generation.number
        ready_soon = self.pool.count(WorkerState.IDLE, WorkerState.BOOTING, generation=current)
        live = self.pool.count(WorkerState.IDLE, WorkerState.BOOTING, WorkerState.BUSY)
        wanted = max(pool_config.min_workers, len(self.queue)) - ready_soon
        needed = max(0, min(wanted, pool_config.max_workers - live))
        # A fork of the supervisor is slow (page tables; ~0.1-0.2 s under
        # emulation): fork a few per pass, so ACCEPTs, hand-offs and DONEs
        # go on between forks while the pool grows.
        for _ in range(min(needed, MAX_SPAWNS_PER_PASS)):
            self.spawn_worker()
        self.spawn_backlog = needed > MAX_SPAWNS_PER_PASS

    def retire_surplus_workers(self, now: float) -> None:
        if self.queue:
            return
        idle = sorted(
            (w for w in self.pool.in_state(WorkerState.IDLE)),
            key=lambda w: w.idle_since,
        )
        surplus = len(idle) - self.config.pool.min_workers
        for worker in idle[: max(0, surplus)]:
            if now - worker.idle_since > IDLE_RETIRE_AFTER_S:
                self.retire_worker(worker)

    def spawn_worker(self) -> WorkerHandle:
        from tlshd.workers.base import Worker

        generation = self.generation

        def build(channel: socket.socket) -> Worker:
            return Worker(channel, generation, self.engine, self.close_in_child, self.install_ktls)

        worker = self.pool.spawn(generation.number, build)
        assert worker.sock is not None
        self.selector.register(
            worker.sock, selectors.EVENT_READ, lambda _ev, w=worker: self._on_worker_readable(w)
        )
        return worker

    def retire_worker(self, worker: WorkerHandle) -> None:
        """Ask a worker without a request to exit (SIGTERM); it gets no more work."""
        if worker.state in (WorkerState.RETIRING, WorkerState.DEAD) or worker.request:
            return
        worker.state = WorkerState.RETIRING
        worker.retire_sent_at = time.monotonic()
        self.pool.signal(worker, signal.SIGTERM)

    def close_in_child(self) -> None:
        """Runs in a freshly forked worker: drop the supervisor's resources
        through their owners, so no object later closes a reused fd number."""
        self.signals.close_in_child()
        self.status.close_in_child()
        self.notifier.close()
        self.pool.close_channels_in_child()
        for request in [*self.queue, *(w.request for w in self.pool if w.request)]:
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
            config = load_config(self.config_path)
            credentials = load_credentials(config)
            keyservice = self._keyservice_for(config)
        except (ConfigError, CredentialsError, OSError) as err:
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
        log.info("configuration reloaded from %s (generation %d)", self.config_path, number)
        self.retire_old_generations()
        self.notifier.ready()

    # --- stop -----------------------------------------------------------------------

    def begin_stop(self, grace_s: float) -> None:
        now = time.monotonic()
        if self.stopping:
            # A second signal shortens the grace period.
            self.grace_deadline = min(self.grace_deadline or now, now + grace_s)
            return
        log.info("stopping: %d in flight, %d queued", self.in_flight(), len(self.queue))
        self.stopping = True
        self.accepting = False
        self.grace_deadline = now + grace_s
        self.notifier.stopping()
        for request in self.queue.drain():
            self.finish(request, errno.EIO, "the daemon is stopping")
        for worker in self.pool:
            if worker.state is not WorkerState.DEAD:
                if worker.state is not WorkerState.BUSY:
                    worker.state = WorkerState.RETIRING
                    worker.retire_sent_at = now
                self.pool.signal(worker, signal.SIGTERM)

    def stop_complete(self) -> bool:
        return self.in_flight() == 0

    def finish_stop(self) -> None:
        """Reap every worker within REAP_TIMEOUT_S, killing the stragglers."""
        self.reap_all(REAP_TIMEOUT_S)
        for worker in self.pool:
            log.warning("worker %d did not exit; killing it", worker.pid)
            self.kill_worker(worker, errno.EIO, "the daemon is stopping")
        self.reap_all(REAP_TIMEOUT_S)

    def reap_all(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        self.reap_workers()
        while len(self.pool) and time.monotonic() < end:
            time.sleep(0.02)
            self.reap_workers()

    def emergency_stop(self) -> None:
        """After an error: fail everything now, kill every worker, reap."""
        self.stopping = True
        self.accepting = False
        for request in self.queue.drain():
            self.finish(request, errno.EIO, "the daemon is stopping")
        for worker in self.pool:
            self.kill_worker(worker, errno.EIO, "the daemon is stopping")
        self.reap_all(REAP_TIMEOUT_S)

    def close(self) -> None:
        self.notifier.stopping()
        self.status.close()
        self.signals.close()
        with contextlib.suppress(OSError, RuntimeError):
            self.netlink.close()
        self.selector.close()
        self.notifier.close()

    # --- status -------------------------------------------------------------------

    def in_flight(self) -> int:
        return sum(1 for w in self.pool if w.request is not None)

    def update_notify(self, now: float) -> None:
        idle = self.pool.count(WorkerState.IDLE, generation=self.generation.number)
        if not self.ready_sent and not self.stopping and idle >= self.config.pool.min_workers:
            self.ready_sent = True
            self.notifier.ready()
            log.debug("ready: %d idle workers", idle)
        live = self.pool.count(WorkerState.IDLE, WorkerState.BUSY, WorkerState.BOOTING)
        self.notifier.set_status(
            f"{live} workers ({idle} idle), {self.in_flight()} in flight, "
            f"{len(self.queue)} queued, {self.stats.done} done, {self.stats.failed} failed"
        )
        self.notifier.tick(now)

    def snapshot(self) -> dict[str, Any]:
        self.measure_workers()  # status requests are rare; show current sizes
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "uptime_s": round(now - self.started_at, 3),
            "generation": self.generation.number,
            "workers": [self.describe_worker(w, now) for w in self.pool],
            "in_flight": self.in_flight(),
            "queued": len(self.queue),
            "done": self.stats.done,
            "failed": self.stats.failed,
            "counters": self.stats.counters(),
            "latency_ms": self.stats.latency(),
            "memory": tree_memory(os.getpid()),
        }

    @staticmethod
    def describe_worker(worker: WorkerHandle, now: float) -> dict[str, Any]:
        request = worker.request
        return {
            "pid": worker.pid,
            "state": worker.state.value,
            "peer": request.peer if request else None,
            "req": request.req_id if request else None,
            "phase": worker.phase or None,
            "age_s": round(now - worker.spawned_at, 3),
            "rss_bytes": worker.rss_bytes,
            "handshakes": worker.handshakes,
            "generation": worker.generation,
        }


def _hung_up(sock: socket.socket) -> bool:
    """True once the peer of a SOCK_SEQPACKET socket has closed its end."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(events & select.POLLHUP for _fd, events in poller.poll(0))


def run_daemon(config_path: str, config: Config, to_stderr: bool) -> int:
    """The daemon's life after the CLI loaded the config; the exit status."""
    from .tlsmodule import ensure_tls_module

    del to_stderr  # logging is already set up by the CLI
    set_title("tlshd: supervisor")
    try:
        credentials = load_credentials(config)
    except CredentialsError as err:
        log.error("%s", err)
        return 1
    try:
        arbiter = Arbiter(
            config_path, config, credentials=credentials, prepare_kernel=ensure_tls_module
        )
    except ImportError as err:
        log.error("cannot start: %s", err)
        return 1
    return arbiter.run()
