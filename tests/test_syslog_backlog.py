"""tlshd/log.py: the supervisor never waits for the syslog daemon.

A Unix datagram socket queues only net.unix.max_dgram_qlen datagrams at the
reader; a blocking send() behind a slow syslog daemon stopped the supervisor
in the lab's bursts while requests waited unaccepted.  Here the "syslog
daemon" is a datagram socket nobody reads until the test says so.
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlshd import log as tlshd_log
from tlshd.log import SyslogHandler

LINES = 60  # well past any max_dgram_qlen default (10)
Syslogd = tuple[socket.socket, str]


@pytest.fixture()
def syslogd(tmp_path: Path) -> Iterator[Syslogd]:
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    yield server, path
    server.close()


def make_logger(path: str, nonblocking: bool) -> tuple[logging.Logger, SyslogHandler]:
    handler = SyslogHandler(path, logging.handlers.SysLogHandler.LOG_AUTH)
    handler.setFormatter(logging.Formatter("tlshd[1]: %(message)s"))
    handler.reopen(nonblocking=nonblocking)
    logger = logging.getLogger(f"tlshd-test-{id(handler)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler


def read_all(server: socket.socket) -> list[str]:
    lines = []
    server.settimeout(0.2)
    while True:
        try:
            data = server.recv(4096)
        except TimeoutError:
            return lines
        lines.append(data.decode().rstrip("\0").split(": ", 1)[1])


def test_a_slow_syslog_daemon_does_not_stop_the_logging_process(syslogd: Syslogd) -> None:
    server, path = syslogd
    logger, handler = make_logger(path, nonblocking=True)
    started = time.monotonic()
    for i in range(LINES):
        logger.info("line %d", i)
    assert time.monotonic() - started < 2.0  # a blocking send would hang here
    assert handler.backlog, "the reader's queue should have filled"
    got = read_all(server)
    for _ in range(LINES):
        if not handler.backlog:
            break
        handler.flush_backlog()
        got += read_all(server)
    assert got == [f"line {i}" for i in range(LINES)]


def test_a_full_backlog_drops_the_oldest_and_says_how_many(
    syslogd: Syslogd, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, path = syslogd
    monkeypatch.setattr(tlshd_log, "MAX_SYSLOG_BACKLOG", 5)
    logger, handler = make_logger(path, nonblocking=True)
    for i in range(LINES):
        logger.info("line %d", i)
    queued_at_reader = read_all(server)
    for _ in range(LINES):
        handler.flush_backlog()
        queued_at_reader += read_all(server)
        if not handler.backlog:
            break
    kept = [line for line in queued_at_reader if line.startswith("line")]
    notes = [line for line in queued_at_reader if "dropped" in line]
    assert kept[-5:] == [f"line {i}" for i in range(LINES - 5, LINES)]
    assert len(notes) == 1
    assert notes[0] == f"{LINES - len(kept)} log lines dropped: syslog was behind"


def test_at_stop_the_backlog_is_sent_waiting_for_the_reader(syslogd: Syslogd) -> None:
    server, path = syslogd
    logger, handler = make_logger(path, nonblocking=True)
    for i in range(LINES):
        logger.info("line %d", i)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(read_all(server)))
    reader.start()
    handler.drain(timeout_s=2.0)
    reader.join()
    assert got == [f"line {i}" for i in range(LINES)]
    assert not handler.nonblocking


def test_a_zygote_takes_a_blocking_socket_of_its_own(syslogd: Syslogd) -> None:
    _server, path = syslogd
    _logger, handler = make_logger(path, nonblocking=True)
    inherited = handler.socket
    handler.backlog.append(b"<38>a line of the supervisor's")
    assert not handler.reopen(nonblocking=False)
    assert handler.socket is not inherited and inherited.fileno() == -1
    assert handler.socket.gettimeout() is None  # blocking
    assert not handler.backlog  # not this process's lines to send


def test_a_line_the_socket_can_never_take_is_dropped_not_retried_forever(
    syslogd: Syslogd,
) -> None:
    # A datagram over the socket's send buffer fails with EMSGSIZE on every
    # try, reconnected or not: it must not hold the supervisor in a loop.
    server, path = syslogd
    logger, handler = make_logger(path, nonblocking=True)
    logger.info("%s", "x" * (4 << 20))
    logger.info("after")
    got = read_all(server)
    assert got == ["1 log lines dropped: syslog was behind", "after"], got
    assert not handler.backlog
