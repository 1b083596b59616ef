"""Logging: syslog facility AUTH with the pid, like upstream; `-s` mirrors to stderr.

One severity per kind of failure:
  * handshake outcome lines: INFO on success, ERR (logging.ERROR) on failure;
  * OS / netlink errors in the daemon itself: ERR;
  * configuration problems that the daemon survives: WARNING.
Every line about a handshake goes through `handshake_logger`, which prefixes it
with the request id and the peer, so a line can always be tied to a request.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import MutableMapping
from typing import Any

LOGGER_NAME = "tlshd"
SYSLOG_ADDRESS = "/dev/log"

log = logging.getLogger(LOGGER_NAME)


class _PidFormatter(logging.Formatter):
    """Formats with the *current* pid, which changes in forked workers."""

    def format(self, record: logging.LogRecord) -> str:
        record.tlshd_pid = os.getpid()
        return super().format(record)


def setup_logging(to_stderr: bool = False, debug: bool = False) -> None:
    """Route the `tlshd` logger to syslog (LOG_AUTH) and optionally stderr."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if os.path.exists(SYSLOG_ADDRESS):
        try:
            handler = logging.handlers.SysLogHandler(
                address=SYSLOG_ADDRESS, facility=logging.handlers.SysLogHandler.LOG_AUTH
            )
            handler.setFormatter(_PidFormatter("tlshd[%(tlshd_pid)d]: %(message)s"))
            log.addHandler(handler)
        except OSError:
            pass
    if to_stderr or not log.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_PidFormatter("tlshd[%(tlshd_pid)d]: %(levelname)s %(message)s"))
        log.addHandler(stream)


def set_debug(debug: bool) -> None:
    """Apply `[debug] loglevel` (non-zero enables DEBUG, as upstream)."""
    log.setLevel(logging.DEBUG if debug else logging.INFO)


class HandshakeLogAdapter(logging.LoggerAdapter):
    """Prefixes each message with `req=<id> peer=<peer>`."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"req={extra.get('req')} peer={extra.get('peer')}: {msg}", kwargs


def handshake_logger(req_id: int | str, peer: str | None) -> HandshakeLogAdapter:
    """A logger for one handshake request; `peer` is the peer name or address."""
    return HandshakeLogAdapter(log, {"req": req_id, "peer": peer or "?"})


def log_oserror(what: str, err: OSError) -> None:
    """A failed system call in the daemon itself, named by `what`."""
    log.error("%s: %s", what, os.strerror(err.errno) if err.errno else err)
