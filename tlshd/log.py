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

import collections
import contextlib
import logging
import logging.handlers
import os
import re
import socket
import sys
from collections.abc import Callable, MutableMapping
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


# Lines the supervisor keeps while the syslog daemon is behind (about 300 KiB).
MAX_SYSLOG_BACKLOG = 2048


class SyslogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that, once reopened with `nonblocking=True`, never waits
    for the syslog daemon: a datagram that does not fit its socket's queue waits
    in a bounded backlog, sent before the next line or by `flush_backlog()`.

    The supervisor sends DONE and ACCEPT against the consumers' timers, and it
    logs a line per handshake.  A Unix datagram socket queues only
    net.unix.max_dgram_qlen (10) datagrams at the reader; when the syslog
    daemon falls behind, as busybox syslogd did in the lab during 64-mount
    bursts, a blocking send() stops the supervisor until the daemon reads.
    The lab's scheduler traces had it asleep in send() while up to 19
    requests waited unaccepted and the kernel refused 150 to 170 submissions
    per burst.  When the backlog is full the oldest lines go, and a line says
    how many."""

    # SysLogHandler's own, which typeshed does not declare.
    socket: socket.socket
    _connect_unixsocket: Callable[[Any], None]

    def __init__(self, address: str, facility: int) -> None:
        super().__init__(address=address, facility=facility)
        self.backlog: collections.deque[bytes] = collections.deque()
        self.dropped = 0
        self.nonblocking = False

    def reopen(self, nonblocking: bool) -> bool:
        """A socket of this process's own (a forked child shares its parent's
        file, O_NONBLOCK flag included), blocking or not; True if it never
        blocks now.  Never non-blocking on a stream /dev/log, which could
        take half a line.  Lines kept for the parent are not this process's."""
        self.backlog.clear()
        self.dropped = 0
        self.nonblocking = False
        if not self._connect(nonblocking and self.socktype == socket.SOCK_DGRAM):
            return False
        self.nonblocking = nonblocking and self.socktype == socket.SOCK_DGRAM
        return self.nonblocking

    def emit(self, record: logging.LogRecord) -> None:
        if not self.nonblocking:
            super().emit(record)
            return
        try:
            self.queue_datagram(self.datagram(record))
        except Exception:
            self.handleError(record)
        self.flush_backlog()

    def datagram(self, record: logging.LogRecord) -> bytes:
        """What SysLogHandler.emit sends for `record` (its format, NUL and PRI)."""
        message = self.ident + self.format(record) if self.ident else self.format(record)
        if self.append_nul:
            message += "\000"
        priority = self.encodePriority(self.facility, self.mapPriority(record.levelname))
        return f"<{priority}>".encode() + message.encode("utf-8")

    def queue_datagram(self, data: bytes) -> None:
        if len(self.backlog) >= MAX_SYSLOG_BACKLOG:
            self.backlog.popleft()
            self.dropped += 1
        self.backlog.append(data)

    def flush_backlog(self) -> None:
        """Send what the syslog daemon has room for; never waits."""
        reconnected = False
        while self.backlog:
            try:
                self.socket.send(self.backlog[0])
            except BlockingIOError:
                return
            except OSError:
                # syslog restarted: reconnect once, as SysLogHandler does.  A
                # line that fails on the new socket too (EMSGSIZE) is dropped,
                # as SysLogHandler.emit would lose it, not retried forever.
                if not reconnected:
                    if not self._connect(nonblocking=True):
                        return
                    reconnected = True
                    continue
                self.dropped += 1
            self.backlog.popleft()
        if self.dropped:
            note = f"tlshd[{os.getpid()}]: {self.dropped} log lines dropped: syslog was behind"
            self.dropped = 0
            priority = self.encodePriority(self.facility, "warning")
            self.backlog.append(f"<{priority}>{note}\000".encode())
            self.flush_backlog()

    def drain(self, timeout_s: float) -> None:
        """At stop: back to blocking sends, each waiting at most `timeout_s`,
        after sending the backlog that way; what still does not go is lost."""
        self.nonblocking = False
        with contextlib.suppress(OSError):
            self.socket.settimeout(timeout_s)
            while self.backlog:
                self.socket.send(self.backlog[0])
                self.backlog.popleft()
        self.backlog.clear()

    def _connect(self, nonblocking: bool) -> bool:
        """A new socket to the syslog daemon in place of the current one."""
        try:
            if self.socket is not None:
                self.socket.close()
            self._connect_unixsocket(self.address)
        except OSError:
            return False
        self.socket.setblocking(not nonblocking)
        return True


def syslog_handler() -> SyslogHandler | None:
    """The syslog handler `setup_logging` installed, if any."""
    return next((h for h in log.handlers if isinstance(h, SyslogHandler)), None)


def own_syslog_socket(nonblocking: bool) -> bool:
    """A syslog socket of this process's own: non-blocking for the supervisor
    (lines wait in memory rather than stop it), blocking for a zygote and its
    workers, which must not lose their last lines when they exit."""
    handler = syslog_handler()
    return handler is not None and handler.reopen(nonblocking)


def flush_syslog_backlog() -> None:
    """Send lines kept while syslog was behind; called once per loop pass."""
    handler = syslog_handler()
    if handler is not None and handler.backlog:
        handler.flush_backlog()


def drain_syslog_backlog(timeout_s: float = 1.0) -> None:
    """At stop: the lines kept while syslog was behind, then blocking sends."""
    handler = syslog_handler()
    if handler is not None and handler.nonblocking:
        handler.drain(timeout_s)


def setup_logging(to_stderr: bool = False, debug: bool = False) -> None:
    """Route the `tlshd` logger to syslog (LOG_AUTH) and optionally stderr."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    if os.path.exists(SYSLOG_ADDRESS):
        try:
            handler = SyslogHandler(SYSLOG_ADDRESS, logging.handlers.SysLogHandler.LOG_AUTH)
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
