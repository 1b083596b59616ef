"""supervisor/broker.py: per-consumer deadlines and bounded admission."""

from __future__ import annotations

import resource
from typing import Any

import pytest
from tlshd.supervisor.broker import (
    FD_HEADROOM,
    Broker,
    consumer_timer_ms,
    handshake_budget_s,
    raise_fd_limit,
)
from tlshd.supervisor.pool import WorkerPool
from tlshd.supervisor.stats import CompletionStats

from tlshd.config import Config, WorkerConfig
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

CONFIG = Config(worker=WorkerConfig(handshake_timeout_ms=7000))


def budget(message_type: int, auth_mode: int, timeout_ms: int | None = None) -> float:
    params = HandshakeParams(
        sockfd=3, message_type=message_type, auth_mode=auth_mode, timeout_ms=timeout_ms
    )
    return handshake_budget_s(params, CONFIG)


def test_deadline_follows_the_consumer() -> None:
    # sunrpc client: no TIMEOUT, XS_TLS_HANDSHAKE_TO = 10 s from its submit,
    # so 10 s from our ACCEPT ends just after it, never before.
    assert budget(MsgType.CLIENTHELLO, AuthMode.UNAUTH) == 10.0
    assert budget(MsgType.CLIENTHELLO, AuthMode.X509) == 10.0
    # nfsd: no TIMEOUT, SVC_HANDSHAKE_TO = 5 s.
    assert budget(MsgType.SERVERHELLO, AuthMode.X509) == 5.0
    # NVMe host and target send TIMEOUT; it wins over everything else.
    assert budget(MsgType.CLIENTHELLO, AuthMode.PSK, 10000) == 9.5
    assert budget(MsgType.SERVERHELLO, AuthMode.PSK, 30000) == 29.5
    assert budget(MsgType.SERVERHELLO, AuthMode.X509, 20000) == 19.5
    # An unknown consumer without TIMEOUT: [worker] handshake_timeout_ms.
    assert budget(MsgType.SERVERHELLO, AuthMode.PSK) == 7.0
    assert consumer_timer_ms(HandshakeParams(sockfd=3, message_type=99)) is None
    # Short timeouts keep a tenth as margin, and a floor.
    assert budget(MsgType.CLIENTHELLO, AuthMode.PSK, 1000) == 0.9
    assert budget(MsgType.CLIENTHELLO, AuthMode.PSK, 1) == 0.1


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_fd_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] in (hard, 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("limit_by", ["max_queued", "fds"])
def test_admission_is_bounded(limit_by: str) -> None:
    broker = Broker(object(), WorkerPool(), CompletionStats(), {}, lambda _s: None)
    if limit_by == "max_queued":
        broker.set_limits(max_queued=3, fd_limit=100000, fd_base=10)
    else:
        broker.set_limits(max_queued=1000, fd_limit=10 + FD_HEADROOM + 2 + 3, fd_base=10)
    admitted = 0
    while broker.can_accept() and admitted < 100:
        broker.queue._queued[admitted] = object()  # stands for one accepted request
        admitted += 1
    assert admitted == 3


def queued_half(broker: Broker, req_id: int, connection: int, local: bool = True) -> Any:
    """A stand-in request in the broker's queue (only what admission reads)."""
    from tlshd.supervisor.queue import Request

    request = Request.__new__(Request)
    request.req_id, request.deadline = req_id, float(req_id)
    client, server = ("127.0.0.1", "127.0.0.1") if local else ("192.0.2.7", "198.51.100.1")
    request.pair_key = ((client, 700 + connection), (server, 2049))
    broker.queue.push(request)
    return request


def test_running_handshakes_are_limited_and_loopback_halves_never_wait_on_each_other() -> None:
    from tlshd.supervisor.broker import Running

    broker = Broker(object(), WorkerPool(), CompletionStats(), {}, lambda _s: None)
    broker.max_running = 4
    running = Running([])
    # Local halves whose other half has not arrived take half of the room at most:
    lone = [queued_half(broker, i, i) for i in range(3)]
    assert broker.admissible(lone[0], running)
    running.add(broker.queue.pop_first(lambda r: r is lone[0]))
    running.add(broker.queue.pop_first(lambda r: r is lone[1]))
    assert running.lone_local == 2 and not broker.admissible(lone[2], running)
    # ...so a connection whose halves both wait here still starts, as a pair,
    remote = queued_half(broker, 10, 20, local=False)
    client, server = queued_half(broker, 11, 30), queued_half(broker, 12, 30)
    assert broker.admissible(server, running) and broker.admissible(remote, running)
    running.add(broker.queue.pop_first(lambda r: r is server))
    assert broker.queue.pop_partner(running.pair_keys) is client
    running.add(client)
    assert running.count == 4 and running.lone_local == 2
    # and then nothing starts but the other half of a running connection.
    assert not broker.admissible(remote, running)
    partner = queued_half(broker, 13, 0)
    assert broker.queue.pop_partner(running.pair_keys) is partner
    running.add(partner)
    assert running.lone_local == 1 and running.count == 5


def test_running_limit_scales_with_the_cpus_the_daemon_may_use() -> None:
    import os

    from tlshd.supervisor.broker import HANDSHAKES_PER_CPU, running_limit

    assert running_limit() == HANDSHAKES_PER_CPU * len(os.sched_getaffinity(0))


def test_the_zygote_forks_only_for_requests_that_could_start() -> None:
    from types import SimpleNamespace

    broker = Broker(object(), WorkerPool(), CompletionStats(), {}, lambda _s: None)
    broker.max_running = 4
    busy = [queued_half(broker, i, i) for i in range(3)]
    for request in busy:
        broker.queue.pop_first(lambda r, request=request: r is request)
    broker.pool = SimpleNamespace(busy=lambda: [SimpleNamespace(request=r) for r in busy])  # type: ignore[assignment]
    for i in range(10, 20):
        queued_half(broker, i, i, local=False)
    assert broker.workers_wanted() == 1  # room for one more of the ten
    queued_half(broker, 30, 0)
    queued_half(broker, 31, 1)  # the other halves of two running connections
    assert broker.workers_wanted() == 2  # both, and no room left
