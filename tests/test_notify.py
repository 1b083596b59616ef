"""supervisor/notify.py: our schedule over sdnotify's transport, against a fake NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sdnotify
from tlshd.supervisor.notify import Notifier


@pytest.fixture
def caplog_tlshd(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the "tlshd" logger even if the daemon's setup stopped its propagation."""
    logger = logging.getLogger("tlshd")
    old = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="tlshd")
    yield caplog
    logger.propagate = old


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's side: an abstract datagram socket named in $NOTIFY_SOCKET."""
    name = f"tlshd-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield receiver
    receiver.close()


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.send("READY=1")
    notifier.ready()
    notifier.tick(100.0)
    assert notifier.fileno() == -1


def test_abstract_socket_watchdog_and_status_rate_limit(abstract_receiver: socket.socket) -> None:
    receiver = abstract_receiver
    notifier = Notifier({**_env(), "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval_s == 1.0
    notifier.ready("up")
    assert receiver.recv(100) == b"READY=1\nSTATUS=up"
    notifier.set_status("a")
    notifier.tick(100.0)
    assert {receiver.recv(100), receiver.recv(100)} == {b"STATUS=a", b"WATCHDOG=1"}
    notifier.set_status("b")
    notifier.tick(100.2)  # within a second of the last STATUS, and of the watchdog
    assert notifier.next_wakeup(100.2) == pytest.approx(0.8)
    receiver.settimeout(0.2)
    with pytest.raises(TimeoutError):
        receiver.recv(100)
    notifier.tick(101.1)
    assert {receiver.recv(100), receiver.recv(100)} == {b"STATUS=b", b"WATCHDOG=1"}
    notifier.close()
    assert notifier.fileno() == -1


def test_reloading_carries_monotonic_usec_and_stopping_is_sent_once(
    abstract_receiver: socket.socket,
) -> None:
    notifier = Notifier()
    notifier.reloading()
    reloading, usec = abstract_receiver.recv(100).decode().split("\n")
    assert reloading == "RELOADING=1" and usec.startswith("MONOTONIC_USEC=")
    assert int(usec.split("=")[1]) > 0
    notifier.stopping()
    notifier.stopping()
    assert abstract_receiver.recv(100) == b"STOPPING=1"
    abstract_receiver.settimeout(0.2)
    with pytest.raises(TimeoutError):
        abstract_receiver.recv(100)


def test_sdnotify_is_the_transport(
    abstract_receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    carried: list[str] = []
    real_notify = sdnotify.SystemdNotifier.notify

    def spy(self: sdnotify.SystemdNotifier, state: str) -> None:
        carried.append(state)
        real_notify(self, state)

    monkeypatch.setattr(sdnotify.SystemdNotifier, "notify", spy)
    notifier = Notifier()
    notifier.ready()
    notifier.stopping()
    assert carried == ["READY=1", "STOPPING=1"]
    assert [abstract_receiver.recv(100), abstract_receiver.recv(100)] == [b"READY=1", b"STOPPING=1"]


def test_failures_are_logged_once_and_the_transport_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog_tlshd: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    assert not notifier.send("READY=1")  # nobody listens yet: sdnotify would be silent
    assert not notifier.send("STATUS=x")
    failures = [r for r in caplog_tlshd.records if "sd_notify to" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert path in failures[0].getMessage()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    try:
        assert notifier.send("READY=1")  # a new connection, now that systemd listens
        assert receiver.recv(100) == b"READY=1"
        assert any("works again" in r.getMessage() for r in caplog_tlshd.records)
    finally:
        notifier.close()
        receiver.close()


def test_full_queue_loses_the_message_without_blocking(
    abstract_receiver: socket.socket, caplog_tlshd: pytest.LogCaptureFixture
) -> None:
    """A receiver that does not read (net.unix.max_dgram_qlen messages queued):
    a blocking transport would hang the main loop here (pytest-timeout)."""
    notifier = Notifier()
    results = [notifier.send(f"STATUS={i}") for i in range(200)]
    assert results[0] and not all(results)
    assert any("sd_notify to" in r.getMessage() for r in caplog_tlshd.records)
    notifier.close()


def test_first_delivery_names_sdnotify(
    abstract_receiver: socket.socket, caplog_tlshd: pytest.LogCaptureFixture
) -> None:
    Notifier().ready()
    lines = [r.getMessage() for r in caplog_tlshd.records]
    assert f"through sdnotify {sdnotify.__version__}" in "\n".join(lines)
    assert "READY=1 sent to @" in "\n".join(lines)


def test_watchdog_for_another_pid_is_ignored(abstract_receiver: socket.socket) -> None:
    env = {**_env(), "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval_s is None


def test_an_address_sdnotify_would_not_use_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        Notifier({"NOTIFY_SOCKET": "/run/elsewhere"})


def _env() -> dict[str, str]:
    return {"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}
