"""The `tlshd` command: upstream's `-c -h -s -v`, plus `--check-config` and `status`.

    tlshd [-s] [-c FILE]            run the daemon in the foreground
    tlshd --check-config [-c FILE]  validate the config and every PEM file it names
    tlshd -v | -h
    tlshd status [--json] [--socket PATH] [-c FILE]

Exit codes: 0 success; 1 usage error, bad configuration, check-config errors,
or an unreachable status socket.  As upstream, `-h` prints usage to stderr and
exits 0.  Unlike upstream, `-v` prints to stdout (so scripts can capture it)
and names the Python TLS stack, since that is what decides the TLS behaviour.

This module imports nothing that loads OpenSSL: `main` must first let
`tlshd.openssl_conf` point OPENSSL_CONF at the daemon's own file, because
OpenSSL reads it once, when the first import of cryptography/pyOpenSSL
initialises the library.
"""

from __future__ import annotations

import errno
import getopt
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import tlshd
from tlshd.config import (
    DEFAULT_STATUS_SOCKET,
    ConfigError,
    find_config_path,
    load_config,
)

USAGE = (
    "usage: tlshd [-chsv] [--check-config]\n"
    "       tlshd status [--json] [--socket PATH] [-c FILE]\n"
)
PATH_MAX = 4096
STATUS_TIMEOUT_S = 5.0
STATUS_MAX_BYTES = 16 * 1024 * 1024

log = logging.getLogger("tlshd")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tlshd` console script and `python -m tlshd`."""
    _ensure_openssl_conf()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "status":
        return status_main(args[1:])
    try:
        opts, rest = getopt.gnu_getopt(
            args, "c:hsv", ["config=", "help", "stderr", "version", "check-config"]
        )
    except getopt.GetoptError as err:
        return _usage_error(str(err))
    if rest:
        return _usage_error(f"unexpected argument {rest[0]!r}")
    config_arg: str | None = None
    to_stderr = check_only = False
    for opt, value in opts:
        if opt in ("-h", "--help"):
            sys.stderr.write(USAGE)
            return 0
        if opt in ("-v", "--version"):
            print(version_string())
            return 0
        if opt in ("-c", "--config"):
            config_arg = value
        elif opt in ("-s", "--stderr"):
            to_stderr = True
        elif opt == "--check-config":
            check_only = True
    if config_arg is not None and (not config_arg or len(os.fsencode(config_arg)) >= PATH_MAX):
        sys.stderr.write("tlshd: Invalid config file\n")
        return 1
    if check_only:
        return check_config_main(config_arg)
    return run_main(config_arg, to_stderr)


def _ensure_openssl_conf() -> None:
    # OpenSSL reads OPENSSL_CONF once, when it initialises: NumTickets = 0 only
    # takes effect if this runs before the first OpenSSL/cryptography import.
    from tlshd.openssl_conf import ensure_openssl_conf

    ensure_openssl_conf()


def _usage_error(message: str) -> int:
    sys.stderr.write(f"tlshd: {message}\n{USAGE}")
    return 1


def version_string() -> str:
    """`tlshd <version> (python tlshd; pyOpenSSL X, cryptography Y, OpenSSL Z)`."""
    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(errors="replace")
    return (
        f"tlshd {tlshd.__version__} (python tlshd; pyOpenSSL {OpenSSL.__version__}, "
        f"cryptography {cryptography.__version__}, {openssl})"
    )


# --- run ----------------------------------------------------------------------------


def run_main(config_arg: str | None, to_stderr: bool) -> int:
    """Load the config and hand over to the supervisor; its return is our exit code."""
    from tlshd.log import set_debug, setup_logging
    from tlshd.selfcheck import BindingsError, require_bindings

    setup_logging(to_stderr=to_stderr, debug=False)
    log.info("tlshd %s starting", tlshd.__version__)
    try:
        require_bindings()
    except BindingsError as err:
        log.error("%s", err)
        return 1
    path = find_config_path(config_arg)
    try:
        config = load_config(path)
    except ConfigError as err:
        log.error("%s", err)
        return 1
    for warning in config.warnings:
        log.warning("%s", warning)
    set_debug(config.loglevel != 0)
    try:
        from tlshd.supervisor.arbiter import run_daemon
    except ImportError as err:
        log.error("cannot start the supervisor: %s", err)
        return 1
    return run_daemon(path, config)


# --- check-config -------------------------------------------------------------------


def _setup_tool_logging() -> None:
    """One-shot commands log to stderr only, never to syslog."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tlshd: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)


def check_config_main(config_arg: str | None, out: TextIO | None = None) -> int:
    """Print every finding, `error:`/`warning:` first; 1 if any is an error."""
    from tlshd.config import check_config

    out = out or sys.stdout
    _setup_tool_logging()
    path = find_config_path(config_arg)
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"error: {err}", file=out)
        return 1
    findings = check_config(config)
    for finding in findings:
        print(finding, file=out)
    if any(f.severity == "error" for f in findings):
        return 1
    print(f"config OK: {path}", file=out)
    return 0


# --- status -------------------------------------------------------------------------


class StatusError(Exception):
    """The status socket could not be reached or answered nonsense."""


def status_main(args: Sequence[str]) -> int:
    """`tlshd status`: ask the running daemon for its state and print it."""
    try:
        opts, rest = getopt.gnu_getopt(list(args), "c:hj", ["config=", "help", "json", "socket="])
    except getopt.GetoptError as err:
        return _usage_error(f"status: {err}")
    if rest:
        return _usage_error(f"status: unexpected argument {rest[0]!r}")
    as_json = False
    socket_path = config_arg = None
    for opt, value in opts:
        if opt in ("-h", "--help"):
            sys.stderr.write(USAGE)
            return 0
        if opt in ("-j", "--json"):
            as_json = True
        elif opt == "--socket":
            socket_path = value
        else:
            config_arg = value
    _setup_tool_logging()
    try:
        path = socket_path or _status_socket_from_config(config_arg)
        document = fetch_status(path)
    except (StatusError, ConfigError) as err:
        sys.stderr.write(f"tlshd status: {err}\n")
        return 1
    if as_json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render_status(document))
    return 0


def _status_socket_from_config(config_arg: str | None) -> str:
    """`[status] socket` of the config; the default if no config file exists.

    An explicit `-c FILE` must load; a broken default config only warns, since
    the user asked about the daemon, not about the file.
    """
    path = find_config_path(config_arg)
    try:
        return load_config(path).status_socket
    except ConfigError as err:
        if config_arg is not None:
            raise
        if os.path.lexists(path):
            log.warning("%s; trying %s", err, DEFAULT_STATUS_SOCKET)
        return DEFAULT_STATUS_SOCKET


def fetch_status(path: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """Send `status\\n` to the daemon's socket and parse the JSON it sends back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(b"status\n")
            sock.shutdown(socket.SHUT_WR)
            data = _read_to_eof(sock)
        except FileNotFoundError:
            raise StatusError(f"{path}: no such socket (is tlshd running?)") from None
        except ConnectionRefusedError:
            raise StatusError(f"{path}: connection refused (is tlshd running?)") from None
        except PermissionError:
            raise StatusError(
                f"{path}: permission denied (the status socket is root-only)"
            ) from None
        except TimeoutError:
            raise StatusError(f"{path}: no answer within {timeout:g} s") from None
        except OSError as err:
            raise StatusError(f"{path}: {err.strerror or err}") from None
    try:
        document = json.loads(data)
    except ValueError as err:
        raise StatusError(f"{path}: the daemon's answer is not JSON: {err}") from None
    if not isinstance(document, dict):
        raise StatusError(f"{path}: the daemon's answer is not a JSON object")
    return document


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
        if total > STATUS_MAX_BYTES:
            raise StatusError(f"answer larger than {STATUS_MAX_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- rendering ----------------------------------------------------------------------


def status_name(code: int) -> str:
    """ "ok" for 0, else the errno name ("EACCES")."""
    return "ok" if code == 0 else errno.errorcode.get(code, f"errno {code}")


def format_duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_bytes(value: Any) -> str:
    if not isinstance(value, int | float) or value < 0:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def render_status(doc: dict[str, Any]) -> str:
    """A human-readable report of the status document."""
    lines = _render_summary(doc)
    lines += _render_workers(doc.get("workers") or [])
    lines += _render_counters(doc.get("counters") or {})
    lines += _render_latency(doc.get("latency_ms") or {})
    return "\n".join(lines) + "\n"


def _render_summary(doc: dict[str, Any]) -> list[str]:
    return [
        f"tlshd pid {_cell(doc.get('pid'))}, up {format_duration(doc.get('uptime_s'))}, "
        f"config generation {_cell(doc.get('generation'))}",
        f"handshakes: {_cell(doc.get('in_flight'))} in flight, {_cell(doc.get('queued'))} queued, "
        f"{_cell(doc.get('done'))} done, {_cell(doc.get('failed'))} failed",
    ]


_WORKER_ROW = "  {:>8}  {:<12} {:<28} {:>8} {:>9} {:>10} {:>10}"


def _render_workers(workers: list[Any]) -> list[str]:
    lines = ["", f"workers ({len(workers)}):"]
    if not workers:
        return [*lines, "  (none)"]
    lines.append(_WORKER_ROW.format("PID", "STATE", "PEER", "REQ", "AGE", "RSS", "HANDSHAKES"))
    for w in workers:
        w = w if isinstance(w, dict) else {}
        lines.append(
            _WORKER_ROW.format(
                _cell(w.get("pid")),
                _cell(w.get("state")),
                _cell(w.get("peer"))[:28],
                _cell(w.get("req")),
                format_duration(w.get("age_s")),
                format_bytes(w.get("rss_bytes")),
                _cell(w.get("handshakes")),
            )
        )
    return lines


def _render_counters(counters: dict[str, Any]) -> list[str]:
    lines = ["", "handshake results:"]
    if not counters:
        return [*lines, "  (none yet)"]

    def order(item: tuple[str, Any]) -> tuple[int, str]:
        key = item[0]
        return (int(key), "") if key.lstrip("-").isdigit() else (1 << 30, key)

    for key, count in sorted(counters.items(), key=order):
        name = status_name(int(key)) if key.lstrip("-").isdigit() else key
        lines.append(f"  {key:>5}  {name:<14} {_cell(count):>10}")
    return lines


def _render_latency(latency: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"latency (ms, {_cell(latency.get('count', 0))} handshakes): "
        f"p50 {_ms(latency.get('p50'))}  p90 {_ms(latency.get('p90'))}  "
        f"p99 {_ms(latency.get('p99'))}  max {_ms(latency.get('max'))}",
    ]
    buckets = [
        b for b in latency.get("buckets") or [] if isinstance(b, list | tuple) and len(b) == 2
    ]
    counts = [c for _, c in buckets if isinstance(c, int)]
    peak = max(counts, default=0)
    for upper, count in buckets:
        label = f"<= {upper:g} ms" if isinstance(upper, int | float) else "  > last"
        width = round(40 * count / peak) if peak and isinstance(count, int) else 0
        lines.append(f"  {label:>12} {_cell(count):>8}  {'#' * width}")
    return lines
