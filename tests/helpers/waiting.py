"""Waiting for an event that has no notification of its own: poll for it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "the condition") -> T:
    """Call `condition` until it returns a true value, and return that value.

    Fails the test (AssertionError naming `what`) if `timeout` seconds pass
    first.  The short pause between calls only spaces the polls; the result
    never depends on how long it is.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g} s"
        time.sleep(0.02)
