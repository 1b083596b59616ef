"""Request brokering: enqueue, dispatch, hand-off, result, DONE.

A request's life in the supervisor:
  1. `enqueue`: ACCEPT gave a socket fd; it gets a deadline (`handshake_budget_s`)
     and waits in the DeadlineQueue.  Admission is bounded (`can_accept`):
     beyond `[pool] max_queued` accepted requests, or close to RLIMIT_NOFILE,
     the supervisor stops ACCEPTing, and the requests stay pending in the
     kernel until there is room (the kernel fails an ACCEPT it cannot install
     an fd for with EIO, so running out of descriptors must never happen).
  2. `dispatch`: queued requests go to spare single-use workers of the
     current generation, the second half of a loopback connection first,
     then earliest deadline first while fewer than `running_limit()`
     handshakes run (see `Broker.admissible` for why, and for the rule that
     keeps loopback halves from waiting on each other).
  3. `hand_off`: the request and a copy of its fd go to the worker by
     SCM_RIGHTS (supervisor/handoff.py); the supervisor keeps its copy.
  4. `on_worker_readable`: key requests are answered; the `result` is checked
     against what this request may name.
  5. DONE (handoff.complete) from the supervisor, on every path: result,
     worker death (EIO, at once), deadline (kill, ETIMEDOUT), junk (kill,
     EIO), stop.

Worker-process bookkeeping (forks, deaths, reaping) is the arbiter's; this
module only moves requests.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from tlshd import ipc
from tlshd.config import Config
from tlshd.log import log
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import AuthMode, MsgType

from . import handoff
from .pool import Generation, WorkerHandle, WorkerPool, WorkerState
from .queue import DeadlineQueue, Request
from .stats import CompletionStats

MAX_HANDOFFS = 2
MAX_MESSAGES_PER_WAKEUP = 32  # per worker, so one chatty worker cannot starve the loop
# A consumer's own timer runs from its submit, before our ACCEPT; a DONE after
# its cancel is silently dropped, so finish this much inside it.
CONSUMER_TIMEOUT_MARGIN_MS = 500
MIN_BUDGET_MS = 100
# The consumers that send no TIMEOUT, told apart by message type and auth
# mode (shared/docs/kernel-protocol.md §2.3 and §4.1):
#   * the sunrpc client (CLIENTHELLO, UNAUTH or X509): xs_tls_handshake_sync()
#     waits XS_TLS_HANDSHAKE_TO = 10U * HZ (net/sunrpc/xprtsock.c);
#   * nfsd (SERVERHELLO, X509): svc_tcp_handshake() waits SVC_HANDSHAKE_TO =
#     5U * HZ (net/sunrpc/svcsock.c), with an nfsd thread tied up meanwhile.
# NVMe host and target (PSK) always send TIMEOUT (module parameter
# tls_handshake_timeout, 10 s by default).  Any other consumer without
# TIMEOUT gets `[worker] handshake_timeout_ms`.
SUNRPC_CLIENT_TIMER_MS = 10_000
NFSD_TIMER_MS = 5_000
# Descriptors kept free for everything but accepted requests: status
# clients, a zygote's channel, a reload's file reads, the log socket.
FD_HEADROOM = 24
FDS_PER_WORKER = 2  # its channel and its pidfd
# Handshakes running at once, per CPU the daemon may use.  A burst's
# handshakes are CPU-bound (loopback, or a LAN's sub-millisecond RTT), so
# beyond a few per CPU more of them at once finish no sooner: they share the
# CPUs thinner and each holds a worker's own memory meanwhile (1.5-3 MiB;
# benchmarks/README.md, stop 14: 32-36 workers alive, 120-131 MiB PSS, in a
# 64-mount burst on 2 vCPUs when every request got its worker at once).
HANDSHAKES_PER_CPU = 8


def running_limit() -> int:
    """Handshakes dispatch starts while fewer than this many run (besides the
    second halves of loopback connections, which never wait for room)."""
    return HANDSHAKES_PER_CPU * max(1, len(os.sched_getaffinity(0)))


def consumer_timer_ms(params: HandshakeParams) -> int | None:
    """The timer of the consumer that sent this request, if it sends no TIMEOUT."""
    if params.message_type == MsgType.CLIENTHELLO and params.auth_mode in (
        AuthMode.UNAUTH,
        AuthMode.X509,
    ):
        return SUNRPC_CLIENT_TIMER_MS
    if params.message_type == MsgType.SERVERHELLO and params.auth_mode == AuthMode.X509:
        return NFSD_TIMER_MS
    return None


def handshake_budget_s(params: HandshakeParams, config: Config) -> float:
    """Seconds from ACCEPT to the deadline of this request.

    * TIMEOUT in ACCEPT: that, minus a margin (the consumer's clock started
      at its submit, and a DONE after its cancel is dropped).
    * No TIMEOUT, a consumer whose timer we know (sunrpc client, nfsd): that
      timer, with no margin.  Counted from our ACCEPT it ends a little after
      the consumer's own, which started at submit: a kill before it would only
      lose handshakes the consumer still takes (under a burst on 6.12 many
      finish between 4 and 5 s), a kill after it costs nothing but a worker.
    * Otherwise `[worker] handshake_timeout_ms`."""
    if params.timeout_ms:
        margin = min(CONSUMER_TIMEOUT_MARGIN_MS, params.timeout_ms // 10)
        budget_ms = params.timeout_ms - margin
    else:
        budget_ms = consumer_timer_ms(params) or config.worker.handshake_timeout_ms
    return max(budget_ms, MIN_BUDGET_MS) / 1000


def raise_fd_limit() -> int:
    """RLIMIT_NOFILE soft up to the hard limit (systemd's default soft limit
    is 1024); the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as err:
            log.warning("cannot raise the descriptor limit to %d: %s", hard, err)
    return soft


def open_fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own fd
    except OSError:
        return 64


class Broker:
    def __init__(
        self,
        netlink: Any,
        pool: WorkerPool,
        stats: CompletionStats,
        generations: dict[int, Generation],
        unwatch: Callable[[socket.socket], None],
        ktls_state: Callable[[socket.socket], tuple[str, bool, bool]] = handoff.ktls_state,
    ) -> None:
        self.netlink = netlink
        # Reads the kTLS state of the supervisor's fd copy before DONE(0).
        self.ktls_state = ktls_state
        self.pool = pool
        self.queue = DeadlineQueue()
        self.stats = stats
        self.generations = generations
        self.unwatch = unwatch
        self.current = 1  # the generation new requests are served by
        self.next_req_id = 1
        self.max_queued = 256
        self.fd_limit = 1024
        self.fd_base = 0
        self.max_running = running_limit()

    # --- admission ------------------------------------------------------------------

    def set_limits(self, max_queued: int, fd_limit: int, fd_base: int) -> None:
        self.max_queued, self.fd_limit, self.fd_base = max_queued, fd_limit, fd_base

    def held_fds(self) -> int:
        """Descriptors the supervisor holds: what it had at start, one per
        accepted request, two per worker, one per zygote."""
        requests = len(self.queue) + len(self.pool.busy())
        return self.fd_base + requests + FDS_PER_WORKER * len(self.pool) + len(self.pool.zygotes)

    def can_accept(self) -> bool:
        """Room for one more accepted request, and a worker for it."""
        if len(self.queue) >= self.max_queued:
            return False
        return self.held_fds() + 1 + FDS_PER_WORKER + FD_HEADROOM <= self.fd_limit

    def can_add_worker(self) -> bool:
        return self.held_fds() + FDS_PER_WORKER + FD_HEADROOM <= self.fd_limit

    # --- enqueue --------------------------------------------------------------------

    def enqueue(self, params: HandshakeParams, config: Config) -> Request | None:
        now = time.monotonic()
        req_id = self.next_req_id
        self.next_req_id += 1
        budget = handshake_budget_s(params, config)
        request = handoff.open_request(params, req_id, now, budget)
        if request is None:
            return None
        request.log.debug(
            "accepted %s request (auth mode %d), fd %d, deadline in %.1f s",
            request.role,
            params.auth_mode,
            params.sockfd,
            budget,
        )
        self.queue.push(request)
        return request

    # --- dispatch and hand-off -----------------------------------------------------

    def dispatch(self, now: float) -> None:
        """Hand queued requests to spare workers: first the other half of a
        connection whose first half has a worker (both ends local), then the
        earliest deadline that `admissible` lets run.  Ready workers before
        those still starting."""
        if not self.queue:
            return
        spare = self.pool.spare(self.current)
        if not spare:
            return
        spare.sort(key=lambda w: (w.ready_at is None, w.token))
        running = self.running()
        for worker in spare:
            if not self.queue:
                return
            # A thread of a worker host serves no request that needs keys
            # (workers/host.py); a worker of its own serves any.
            fits = _fits_shared if worker.shared else _fits_any
            request = self.queue.pop_partner(running.pair_keys, fits)
            if request is None and running.count < self.max_running:
                request = self.queue.pop_first(partial(_startable, self, running, fits))
            if request is None:
                if worker.shared:
                    continue  # a worker of its own may still take a request that needs keys
                return
            if self.hand_off(worker, request, now):
                running.add(request)

    def running(self) -> Running:
        return Running([w.request for w in self.pool.busy() if w.request is not None])

    def admissible(self, request: Request, running: Running) -> bool:
        """May `request` start now, its connection's other half not running?

        Fewer than `max_running` handshakes may run (HANDSHAKES_PER_CPU); the
        other half of a running loopback connection is exempt (`dispatch`
        takes it first), or the two could wait for each other.  That alone
        could still deadlock a loopback burst: the limit full of client
        halves whose server halves nfsd has not submitted, because each nfsd
        thread waits (5 s, svc_tcp_handshake) on a server half queued here
        behind the limit.  So half of the room at most goes to local halves
        whose other half has not arrived; a local half whose other half is
        queued starts as a pair, and pairs need nothing from outside."""
        if running.count >= self.max_running:
            return False
        if not request.local_peer or self.queue.partner_queued(request):
            return True
        return running.lone_local < max(1, self.max_running // 2)

    def keyed_queued(self) -> int:
        """Queued requests that need a worker of their own (`Request.needs_keys`)."""
        return sum(1 for r in self.queue if r.needs_keys)

    def workers_wanted(self) -> int:
        """Workers `dispatch` would hand queued requests to right now: the
        second halves of running connections, and what the limit leaves room
        for.  The zygote forks no further ahead (supervisor/arbiter.py)."""
        running = self.running()
        partners = self.queue.count_partners(running.pair_keys)
        room = max(0, self.max_running - running.count - partners)
        return partners + min(len(self.queue) - partners, room)

    def hand_off(self, worker: WorkerHandle, request: Request, now: float) -> bool:
        assert worker.sock is not None
        try:
            handoff.hand_off(worker.sock, _name(worker), request, now)
        except (OSError, ipc.IpcError) as err:
            # Nothing was sent (SOCK_SEQPACKET is all or nothing): the request
            # waits for another worker; this one is broken.
            request.log.warning("hand-off to worker %s failed: %s", _name(worker), err)
            self.queue.push(request)
            self.kill_worker(worker, errno.EIO, "its channel is full or broken")
            return False
        worker.assign(request)
        request.handoffs += 1
        return True

    # --- finishing requests --------------------------------------------------------

    def finish(self, request: Request, status: int, detail: str = "") -> None:
        handoff.complete(
            self.netlink, request, HandshakeResult(status=status, detail=detail), self.stats
        )

    def fail_queued(self, status: int, detail: str) -> None:
        for request in self.queue.drain():
            self.finish(request, status, detail)

    def expire(self, now: float) -> None:
        """Queued requests past their deadline fail; workers past it are killed."""
        for request in self.queue.pop_expired(now):
            self.finish(request, errno.ETIMEDOUT, "still queued at its deadline")
        for worker in self.pool.busy():
            assert worker.request is not None
            if now >= worker.request.deadline:
                worker.request.log.error(
                    "worker %s overran the handshake deadline; killing it", _name(worker)
                )
                self.kill_worker(worker, errno.ETIMEDOUT, "handshake deadline passed")

    def next_deadline(self) -> float | None:
        deadlines = [w.request.deadline for w in self.pool.busy() if w.request is not None]
        if (queued := self.queue.next_deadline()) is not None:
            deadlines.append(queued)
        return min(deadlines, default=None)

    def in_flight(self) -> int:
        return len(self.pool.busy())

    # --- worker deaths --------------------------------------------------------------

    def kill_worker(self, worker: WorkerHandle, status: int, reason: str) -> None:
        """SIGKILL a worker and fail its request with `status` at once."""
        worker.kill()
        if (request := worker.release_request()) is not None:
            self.finish(request, status, reason)
        self.close_worker(worker)

    def worker_lost(self, worker: WorkerHandle, reason: str) -> None:
        """The worker's channel closed: it died or exited; fail its request
        now.  A worker that died before it reported its first phase never
        touched the socket (HandshakeJob reports the phase before the engine
        runs): its request goes back to the queue, once."""
        unstarted = worker.phase == "handoff"
        if (request := worker.release_request()) is not None:
            if unstarted and request.handoffs < MAX_HANDOFFS:
                request.log.warning(
                    "worker %s died before starting (%s); handing the request on",
                    _name(worker),
                    reason,
                )
                self.queue.push(request)
                self.close_worker(worker)
                return
            request.log.error("worker %s died during the handshake (%s)", _name(worker), reason)
            self.finish(request, errno.EIO, "the worker died")
        self.close_worker(worker)

    def reject_worker(self, worker: WorkerHandle, reason: str) -> None:
        log.error("worker %s sent an invalid message (%s); killing it", _name(worker), reason)
        self.kill_worker(worker, errno.EIO, "the worker misbehaved")

    def close_worker(self, worker: WorkerHandle) -> None:
        if worker.sock is not None:
            self.unwatch(worker.sock)
        worker.close_channel()

    # --- worker messages -------------------------------------------------------------

    def on_worker_readable(self, worker: WorkerHandle) -> None:
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
                    # Usually it died; one that closed its channel and lives on
                    # is beyond supervision and may still hold a consumer's
                    # socket.  The pidfd cannot name a reused pid.
                    if worker.state is not WorkerState.EXITING:
                        worker.kill()
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
            worker.became_ready(
                ipc.check_int(message, "pid", 1, 2**31),
                ipc.check_int(message, "generation", 0, 2**31),
                time.monotonic(),
            )
        elif op == "phase":
            ipc.check_req(message, _current_req_id(worker))
            worker.phase = ipc.check_str(message, "phase", ipc.MAX_PHASE_LEN)
            ipc.check_str(message, "peer", ipc.MAX_PEER_LEN)
        elif op in ipc.KEY_OPS:
            self.on_key_request(worker, message)
        elif op == "result":
            self.on_result(worker, message)

    def on_key_request(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        ipc.check_req(message, _current_req_id(worker))
        request = worker.request
        assert request is not None and worker.sock is not None
        key_request = ipc.KeyRequest.from_message(message)
        reply = self.answer_key_request(worker, request, key_request)
        if reply.ok and reply.serial:
            request.known_serials.add(reply.serial)
        try:
            ipc.send_message(worker.sock, reply.to_message(key_request.id))
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
            reply: ipc.KeyReply = keyservice.answer(request.key_scope, key_request)
            return reply
        except Exception:
            request.log.exception("key request %s failed", key_request.op)
            return ipc.KeyReply.failure(errno.EIO)

    def on_result(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        ipc.check_req(message, _current_req_id(worker))
        request = worker.request
        assert request is not None
        result = ipc.check_result(message)
        unknown = set(result.remote_auth) - request.known_serials
        if request.params.message_type == MsgType.SERVERHELLO:
            # An x509 server reports UINT_MAX per client certificate (no key), as upstream.
            unknown.discard(ipc.X509_SERVER_PEER_ID)
        if unknown:
            raise ipc.IpcError(f"remote_auth names keys {sorted(unknown)} unknown to this request")
        worker.release_request()
        checked = handoff.checked_result(request, result, self.ktls_state)
        handoff.complete(self.netlink, request, checked, self.stats)


class Running:
    """The requests that have a worker, as `admissible` counts them."""

    def __init__(self, requests: list[Request]) -> None:
        self.count = 0
        self.pair_keys: set[tuple[object, object] | None] = set()
        self._local_halves: dict[tuple[object, object] | None, int] = {}
        self.lone_local = 0  # local halves whose other half has no worker
        for request in requests:
            self.add(request)

    def add(self, request: Request) -> None:
        self.count += 1
        self.pair_keys.add(request.pair_key)
        if request.local_peer:
            halves = self._local_halves.get(request.pair_key, 0) + 1
            self._local_halves[request.pair_key] = halves
            self.lone_local += 1 if halves == 1 else -1


def _startable(
    broker: Broker, running: Running, fits: Callable[[Request], bool], request: Request
) -> bool:
    return fits(request) and broker.admissible(request, running)


def _fits_any(_request: Request) -> bool:
    return True


def _fits_shared(request: Request) -> bool:
    return not request.needs_keys


def _current_req_id(worker: WorkerHandle) -> int | None:
    return worker.request.req_id if worker.request is not None else None


def _name(worker: WorkerHandle) -> str:
    return str(worker.pid) if worker.pid is not None else f"#{worker.token}"


def _hung_up(sock: socket.socket) -> bool:
    """True once the peer of a SOCK_SEQPACKET socket has closed its end."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(events & select.POLLHUP for _fd, events in poller.poll(0))
