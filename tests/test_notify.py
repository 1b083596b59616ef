"""supervisor/notify.py: sd_notify messages, watchdog and STATUS rate limit."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from tlshd.supervisor.notify import Notifier


def test_notifier_noop_without_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready()
    notifier.tick(time.monotonic())
    assert notifier.fileno() == -1


def test_notifier_abstract_socket_watchdog_and_status_rate_limit() -> None:
    name = f"tlshd-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval_s == 1.0
    notifier.ready("up")
    assert receiver.recv(100) == b"READY=1\nSTATUS=up"
    notifier.set_status("a")
    notifier.tick(100.0)
    got = {receiver.recv(100), receiver.recv(100)}
    assert got == {b"STATUS=a", b"WATCHDOG=1"}
    notifier.set_status("b")
    notifier.tick(100.2)  # within a second of the last STATUS, and of the watchdog
    receiver.settimeout(0.2)
    with pytest.raises(TimeoutError):
        receiver.recv(100)
    notifier.tick(101.1)
    assert {receiver.recv(100), receiver.recv(100)} == {b"STATUS=b", b"WATCHDOG=1"}
    notifier.close()
    receiver.close()


def test_notifier_watchdog_for_another_pid_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval_s is None
