"""Log lines cannot be forged by what the kernel or a peer sends (issue 11 #10)."""

from __future__ import annotations

import logging

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import Peer, gated_engine
from tlshd.log import escape_controls, handshake_logger, setup_logging

FORGED = "tlshd[1]: req=9 peer=admin: handshake succeeded"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\nb", "a\\x0ab"),
        ("a\r\x00\x1b[2Jb", "a\\x0d\\x00\\x1b[2Jb"),
        ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),
        ("line\u2028sep\u202eevil", "line\\u2028sep\\u202eevil"),
        ("bücher.example", "bücher.example"),
    ],
)
def test_escape_controls(text: str, expected: str) -> None:
    assert escape_controls(text) == expected
    assert escape_controls(expected) == expected  # idempotent


def test_stderr_lines_from_setup_logging_are_single_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging(to_stderr=True)
    try:
        handshake_logger(7, "evil\n" + FORGED).error("failed: %s", "detail\nmore")
        # a child logger's records reach the handler without the parent's filter
        logging.getLogger("tlshd.keyservice").warning("PSK %s", "id\n" + FORGED)
    finally:
        logging.getLogger("tlshd").handlers.clear()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("tlshd[") and "\\x0a" in line for line in lines)


@pytest.mark.timeout(120)
def test_peername_with_a_newline_forges_no_line() -> None:
    with FakeKernel() as kernel, running_daemon(kernel, gated_engine) as daemon:
        peer = Peer(kernel, peername="x\n" + FORGED)
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10) == (0, ())
        daemon.wait_for_log("handshake succeeded")
        peer.close()
        log = daemon.log()
    assert "peer=x\\x0a" + FORGED in log
    assert not any(line.startswith(FORGED) for line in log.splitlines())
