"""supervisor/signals.py: handlers that only record and wake the loop."""

from __future__ import annotations

import os
import selectors
import signal

from tlshd.supervisor.signals import SignalQueue


def test_signal_queue_records_and_wakes() -> None:
    queue = SignalQueue()
    queue.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR1)
        with selectors.DefaultSelector() as selector:
            selector.register(queue.fileno(), selectors.EVENT_READ)
            assert selector.select(5)
        assert queue.drain() == [signal.SIGUSR1, signal.SIGHUP]
        assert queue.drain() == []
    finally:
        queue.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
