"""supervisor/broker.py: per-consumer deadlines and bounded admission."""

from __future__ import annotations

import resource

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
