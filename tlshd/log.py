"""Logging: syslog facility AUTH with the pid, like upstream; `-s` mirrors to stderr.

One severity per kind of failure:
  * handshake outcome lines: INFO on success, ERR (logging.ERROR) on failure;
  * OS / netlink errors in the daemon itself: ERR;
  * configuration problems that the daemon survives: WARNING.
Every line about a handshake goes through `handshake_logger`, which prefixes it
with the request id and the peer, so a line can always be tied to a request.

Peer names, identities and error details come from the kernel or the peer: a
PEERNAME with a newline would otherwise start a forged log line.  Control
characters (C0, DEL, C1), Unicode line and paragraph separators and bidi
overrides in a message are written as \\xNN / \\uNNNN, by a filter on the
`tlshd` logger and on each handler `setup_logging` installs (a logger's
filters do not see records propagated from its children).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys
from collections.abc import MutableMapping
from typing import Any

LOGGER_NAME = "tlshd"
SYSLOG_ADDRESS = "/dev/log"

log = logging.getLogger(LOGGER_NAME)

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """`text` with every character that could break or disguise a log line escaped."""
    return _UNSAFE.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class EscapeControls(logging.Filter):
    """Rewrites a record whose message holds control characters; idempotent."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_controls(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


_ESCAPE_CONTROLS = EscapeControls()
log.addFilter(_ESCAPE_CONTROLS)


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
            handler.addFilter(_ESCAPE_CONTROLS)
            log.addHandler(handler)
        except OSError:
            pass
    if to_stderr or not log.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_PidFormatter("tlshd[%(tlshd_pid)d]: %(levelname)s %(message)s"))
        stream.addFilter(_ESCAPE_CONTROLS)
        log.addHandler(stream)


def set_debug(debug: bool) -> None:
    """Apply `[debug] loglevel` (non-zero enables DEBUG, as upstream)."""
    log.setLevel(logging.DEBUG if debug else logging.INFO)


class HandshakeLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each message with `req=<id> peer=<peer>`."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"req={extra.get('req')} peer={extra.get('peer')}: {msg}", kwargs


def peer_name(sock: socket.socket, peername: str | None) -> str:
    """How logs, titles and the status socket name a request's peer: the
    consumer's PEERNAME if it gave one, with the peer address."""
    try:
        address = sock.getpeername()
    except OSError:
        address = None
    text = ""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        text = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    elif isinstance(address, str):
        text = address
    if peername:
        return f"{peername} ({text})" if text else peername
    return text or "unknown peer"


def handshake_logger(req_id: int | str, peer: str | None) -> HandshakeLogAdapter:
    """A logger for one handshake request; `peer` is the peer name or address."""
    return HandshakeLogAdapter(log, {"req": req_id, "peer": peer or "?"})


def log_oserror(what: str, err: OSError) -> None:
    """A failed system call in the daemon itself, named by `what`."""
    log.error("%s: %s", what, os.strerror(err.errno) if err.errno else err)
