"""The client side of `tlshd status`: fetch the daemon's status document and render it.

The daemon answers one JSON document on its root-only socket
(supervisor/status.py); `fetch_status` reads it with a time limit and a size
limit, and `render_status` turns it into the text report.  The renderer
tolerates missing or mistyped fields (an older or newer daemon), printing "-".
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from typing import Any

from tlshd.config import DEFAULT_STATUS_SOCKET, ConfigError, find_config_path, load_config

STATUS_TIMEOUT_S = 5.0
STATUS_MAX_BYTES = 16 * 1024 * 1024

log = logging.getLogger("tlshd")


class StatusError(Exception):
    """The status socket could not be reached or answered nonsense."""


def status_socket_from_config(config_arg: str | None) -> str:
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
    raw_memory = doc.get("memory")
    memory: dict[str, Any] = raw_memory if isinstance(raw_memory, dict) else {}
    lines = _render_summary(doc)
    lines += _render_memory(memory, doc.get("pid"))
    lines += _render_zygotes(doc.get("zygotes") or [], _pss_by_pid(memory))
    lines += _render_workers(doc.get("workers") or [], _pss_by_pid(memory))
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


def _pss_by_pid(memory: dict[str, Any]) -> dict[int, Any]:
    processes = memory.get("processes") or []
    return {
        p["pid"]: p.get("pss_bytes")
        for p in processes
        if isinstance(p, dict) and isinstance(p.get("pid"), int)
    }


def _render_memory(memory: dict[str, Any], supervisor_pid: Any) -> list[str]:
    """PSS, not RSS: workers share the supervisor's pages copy-on-write, and PSS
    splits each shared page among its users, so the per-process figures add up."""
    if not memory:
        return []
    processes = memory.get("processes") or []
    partial = "" if memory.get("complete", True) else " (some processes unreadable)"
    supervisor = (
        _pss_by_pid(memory).get(supervisor_pid) if isinstance(supervisor_pid, int) else None
    )
    return [
        f"memory: {format_bytes(memory.get('total_pss_bytes'))} PSS in {len(processes)} "
        f"processes{partial}; supervisor {format_bytes(supervisor)}"
    ]


_WORKER_ROW = "  {:>8}  {:<12} {:<28} {:>8} {:>9} {:>10}"


def _render_zygotes(zygotes: list[Any], pss_by_pid: dict[Any, Any]) -> list[str]:
    """One line per zygote: the template each generation's workers are forked from."""
    lines = []
    for z in zygotes:
        z = z if isinstance(z, dict) else {}
        pss = format_bytes(pss_by_pid.get(z["pid"]) if isinstance(z.get("pid"), int) else None)
        lines.append(
            f"zygote pid {_cell(z.get('pid'))} (generation {_cell(z.get('generation'))}): "
            f"{_cell(z.get('state'))}, up {format_duration(z.get('age_s'))}, {pss.strip()} PSS"
        )
    return ["", *lines] if lines else []


def _render_workers(workers: list[Any], pss_by_pid: dict[Any, Any]) -> list[str]:
    """Single-use workers: each serves one request, so there is no per-worker count."""
    lines = ["", f"workers ({len(workers)}):"]
    if not workers:
        return [*lines, "  (none)"]
    lines.append(_WORKER_ROW.format("PID", "STATE", "PEER", "REQ", "AGE", "PSS"))
    for w in workers:
        w = w if isinstance(w, dict) else {}
        lines.append(
            _WORKER_ROW.format(
                _cell(w.get("pid")),
                _cell(w.get("state")),
                _cell(w.get("peer"))[:28],
                _cell(w.get("req")),
                format_duration(w.get("age_s")),
                format_bytes(pss_by_pid.get(w["pid"]) if isinstance(w.get("pid"), int) else None),
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
