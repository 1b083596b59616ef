"""Configuration: upstream's tlshd.conf(5) keys plus our own sections.

The file format is GLib's GKeyFile, which upstream parses with
g_key_file_load_from_file(); we read it with our own small parser rather than
configparser, because GKeyFile differs in ways that matter for an existing
upstream file: keys are case-sensitive, only `#` starts a comment, `;` is the
list separator (never a comment), values support `\\s \\n \\t \\r \\\\`
escapes, a repeated group is merged and a repeated key keeps its last value.

`load_config` is pure: it returns a new immutable `Config` or raises
`ConfigError`, so a reload can build the next generation and swap it in only
when it loaded.  Nothing in this module imports OpenSSL or cryptography, so the
CLI can import it before `tlshd.openssl_conf` has set OPENSSL_CONF;
`check_config` imports `tlshd.credentials` lazily for the PKI checks.

Deliberate differences from upstream (see docs/configuration.md):
  * an integer key with a bad value is an error (upstream silently uses 0);
  * unknown sections and keys are reported as warnings (upstream ignores them);
  * list entries are stripped of surrounding whitespace (`a; b` is "a", "b").
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from tlshd.keyring import keyring_entry_problem

LEGACY_CONFIG_PATH = "/etc/tlshd.conf"
CONFIG_PATH = "/etc/tlshd/config"
DEFAULT_STATUS_SOCKET = "/run/tlshd/status.sock"

# Longest sun_path a Unix socket address may carry (108 bytes with the NUL).
_SUN_PATH_MAX = 107

log = logging.getLogger("tlshd")

# Files the daemon reads are capped, so a hostile or mistaken path (a 50 MB
# file of repeated keys, a log file) cannot freeze the main loop or exhaust
# memory.  Upstream's shipped config is under 1 KiB; Debian's whole system
# CA bundle is about 220 KB, and a CRL of a large CA some MB.
MAX_CONFIG_BYTES = 1 << 20
MAX_PEM_BYTES = 32 << 20
# Warnings kept per load: a file with thousands of repeated or unknown keys
# is said to be one in a few lines, not in thousands.
MAX_CONFIG_WARNINGS = 50


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class ConfigKey:
    """A key of the configuration file, or a whole section when `name` is None."""

    section: str
    name: str | None = None

    def __str__(self) -> str:
        return f"[{self.section}] {self.name}" if self.name else f"[{self.section}]"


def locate(file: str, line: int | None = None, key: ConfigKey | None = None) -> str:
    """`file[:line][: [section] key]`: how every message names the place at fault."""
    where = f"{file}:{line}" if line is not None else file
    return f"{where}: {key}" if key is not None else where


@dataclass(frozen=True)
class Finding:
    """A problem found in the configuration, as data until it is printed or logged.

    `file` is the file at fault: the config file, or a PEM file that a key
    names; `key` is the config key or section concerned and `line` the line of
    the config file, where known.
    """

    severity: Severity
    file: str
    key: ConfigKey | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.severity}: {locate(self.file, self.line, self.key)}: {self.message}"


_DEV_NULL = os.makedev(1, 3)


class FileProblem(Exception):
    """A configured file cannot be read; the message says why (no path)."""


def read_bounded(path: str, limit: int) -> bytes:
    """The contents of the regular file `path`, at most `limit` bytes.

    Opened with O_NONBLOCK, so a FIFO (or a device) named as a certificate or
    config path cannot block the supervisor in open(); anything but a regular
    file is refused before a byte is read (/dev/zero would never end), except
    /dev/null, which reads as empty.  Raises FileProblem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileProblem("file not found") from None
    except OSError as err:
        raise FileProblem(f"cannot open: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            raise FileProblem("is a directory")
        if stat.S_ISCHR(mode) and st.st_rdev == _DEV_NULL:
            return b""  # `-c /dev/null`: run on the defaults
        if not stat.S_ISREG(mode):
            raise FileProblem("is not a regular file (a FIFO, socket or device)")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise FileProblem(f"cannot read: {err.strerror}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise FileProblem(f"is larger than {limit} bytes")
    return b"".join(chunks)


@dataclass(frozen=True)
class RoleConfig:
    """`[authenticate.client]` or `[authenticate.server]`."""

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    pq_certificate: str | None = None
    pq_private_key: str | None = None


@dataclass(frozen=True)
class PoolConfig:
    """`[pool]` (ours)."""

    # Forked, idle single-use workers kept in reserve, so a hand-off never
    # waits for a fork: two, for both halves of a loopback connection; the
    # zygote forks more as requests come (idle PSS is what the reserve costs).
    min_workers: int = 2
    # Live single-use workers at most.  Concurrency is bounded by memory, not
    # by a small pool: a 64-mount loopback burst is 128 handshakes (a client
    # and a server half each), and no half may wait behind the other.
    max_workers: int = 192
    # Accepted requests waiting for a worker at most; beyond them the
    # supervisor stops ACCEPTing and requests stay pending in the kernel.
    max_queued: int = 256
    # Handshakes one worker process serves, each in a thread of its own.  1
    # (the default) is the design of issue 10: one process per handshake.
    # More is the alternative that issue asks to be measured where
    # single-use workers miss its targets (benchmarks/README.md): fewer forks
    # and copy-on-write faults, but co-hosted handshakes share an address
    # space and die together when one overruns (workers/host.py).
    handshakes_per_worker: int = 1


# Workers run under an account of their own.  Any process of the worker's uid
# may signal or ptrace it, so a shared account such as `nobody` lets every
# other service running as nobody kill each worker before it is ready.
DEFAULT_WORKER_USER = "tlshd"
# Used, with a warning, only when [worker] user is not set and the default
# account does not exist.
FALLBACK_WORKER_USER = "nobody"
CREATE_WORKER_USER = (
    "useradd --system --user-group --no-create-home --home-dir /nonexistent "
    f"--shell /usr/sbin/nologin {DEFAULT_WORKER_USER}"
)


@dataclass(frozen=True)
class WorkerConfig:
    """`[worker]` (ours)."""

    user: str = DEFAULT_WORKER_USER
    drop_privileges: bool = True
    # Deadline of a request whose consumer neither sends TIMEOUT nor has a
    # known timer (supervisor/broker.py knows the sunrpc client's 10 s and
    # nfsd's 5 s; NVMe sends TIMEOUT).
    handshake_timeout_ms: int = 10000


@dataclass(frozen=True)
class Config:
    path: str | None = None
    loglevel: int = 0
    tls_debug: int = 0
    nl_debug: int = 0
    delay_done: int = 0
    keyrings: tuple[str, ...] = ()
    client: RoleConfig = field(default_factory=RoleConfig)
    server: RoleConfig = field(default_factory=RoleConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    status_socket: str = DEFAULT_STATUS_SOCKET
    warnings: tuple[Finding, ...] = ()

    def role(self, name: str) -> RoleConfig:
        """The RoleConfig for "client" or "server"."""
        if name == "client":
            return self.client
        if name == "server":
            return self.server
        raise ValueError(f"unknown role {name!r}")


# --- GKeyFile reader -----------------------------------------------------------


@dataclass(frozen=True)
class RawValue:
    """A key's value as written (escapes not yet resolved) and where."""

    text: str
    lineno: int


_GROUP_RE = re.compile(r"^\[([^\[\]\x00-\x1f]+)\]\s*$")
_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def parse_keyfile(text: str, path: str) -> tuple[dict[str, dict[str, RawValue]], list[Finding]]:
    """Parse GKeyFile text into {group: {key: RawValue}} plus duplicate-key warnings.

    Raises ConfigError (naming `path` and the line) on a syntax error.
    """
    groups: dict[str, dict[str, RawValue]] = {}
    warnings: list[Finding] = []
    current: dict[str, RawValue] | None = None
    current_name = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        group = _GROUP_RE.match(stripped)
        if group:
            current_name = group.group(1)
            # GKeyFile merges a repeated group into the first one.
            current = groups.setdefault(current_name, {})
            continue
        key, sep, value = stripped.partition("=")
        key = key.rstrip()
        if not sep or not key:
            raise ConfigError(
                f"{path}:{lineno}: {stripped!r} is not a key=value pair, [group] or # comment"
            )
        if current is None:
            raise ConfigError(f"{path}:{lineno}: key {key!r} appears before any [section]")
        if key in current:
            warnings.append(
                Finding(
                    "warning",
                    path,
                    ConfigKey(current_name, key),
                    f"set again; line {current[key].lineno} is overridden",
                    lineno,
                )
            )
        current[key] = RawValue(value.lstrip(), lineno)
    return groups, warnings


def _unescape(raw: str, where: str) -> str:
    out: list[str] = []
    chars = iter(raw)
    for ch in chars:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(chars, None)
        if nxt is None:
            raise ConfigError(f"{where}: value ends with a lone backslash")
        if nxt not in _ESCAPES:
            raise ConfigError(f"{where}: invalid escape sequence \\{nxt}")
        out.append(_ESCAPES[nxt])
    return "".join(out)


def _split_list(raw: str) -> Iterator[str]:
    """Split on `;` not preceded by a backslash; `\\;` yields a literal `;`."""
    item: list[str] = []
    chars = iter(raw)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            item.append(";" if nxt == ";" else ch + nxt)
        elif ch == ";":
            yield "".join(item)
            item = []
        else:
            item.append(ch)
    if item:
        yield "".join(item)


_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_INT_MAX_DIGITS = 18  # every bound below fits; longer numbers are out of range
_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


class _Reader:
    """Typed access to a parsed key file."""

    def __init__(self, path: str, groups: dict[str, dict[str, RawValue]]) -> None:
        self.path = path
        self.groups = groups

    def line(self, section: str, key: str) -> int | None:
        raw = self.groups.get(section, {}).get(key)
        return raw.lineno if raw else None

    def where(self, section: str, key: str) -> str:
        return locate(self.path, self.line(section, key), ConfigKey(section, key))

    def warning(self, section: str, key: str | None, message: str) -> Finding:
        line = self.line(section, key) if key is not None else None
        return Finding("warning", self.path, ConfigKey(section, key), message, line)

    def raw(self, section: str, key: str) -> RawValue | None:
        value = self.groups.get(section, {}).get(key)
        if value is not None and "\0" in value.text:
            # No path, user or keyring name can hold one (open() would raise ValueError).
            raise ConfigError(f"{self.where(section, key)}: value contains a NUL byte")
        return value

    def has(self, section: str, key: str) -> bool:
        return key in self.groups.get(section, {})

    def string(self, section: str, key: str) -> str | None:
        raw = self.raw(section, key)
        if raw is None:
            return None
        return _unescape(raw.text, self.where(section, key))

    def path_value(self, section: str, key: str) -> str | None:
        """A file name; an empty value means "not set", as upstream treats it."""
        value = self.string(section, key)
        return value or None

    def integer(self, section: str, key: str, default: int, lo: int, hi: int) -> int:
        text = self.string(section, key)
        if text is None:
            return default
        text = text.strip()
        if not _INT_RE.match(text):
            raise ConfigError(f"{self.where(section, key)}: {text!r} is not an integer")
        if len(text.lstrip("+-").lstrip("0")) > _INT_MAX_DIGITS:
            # int() refuses more than sys.get_int_max_str_digits() digits anyway.
            raise ConfigError(f"{self.where(section, key)}: {text[:20]!r}... is out of range")
        value = int(text)
        if not lo <= value <= hi:
            raise ConfigError(f"{self.where(section, key)}: {value} is out of range ({lo}..{hi})")
        return value

    def boolean(self, section: str, key: str, default: bool) -> bool:
        text = self.string(section, key)
        if text is None:
            return default
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"{self.where(section, key)}: {text!r} is not true or false")

    def string_list(self, section: str, key: str) -> tuple[str, ...] | None:
        raw = self.raw(section, key)
        if raw is None:
            return None
        where = self.where(section, key)
        items = (_unescape(item, where).strip() for item in _split_list(raw.text))
        return tuple(item for item in items if item)


# --- schema ---------------------------------------------------------------------

# Every key of an [authenticate.*] section names a file: key -> RoleConfig field.
ROLE_FILE_KEYS = {
    "x509.truststore": "truststore",
    "x509.crl": "crl",
    "x509.certificate": "certificate",
    "x509.private_key": "private_key",
    "x509.pq.certificate": "pq_certificate",
    "x509.pq.private_key": "pq_private_key",
}

# Keys of earlier releases of this daemon that mean nothing any more: said so
# in their warning rather than "unknown".
OBSOLETE_KEYS: dict[tuple[str, str], str] = {
    ("pool", "max_handshakes"): "obsolete (every worker serves one handshake), ignored",
    ("pool", "max_rss_mib"): "obsolete (every worker serves one handshake), ignored",
}

KNOWN_KEYS: dict[str, frozenset[str]] = {
    "debug": frozenset({"loglevel", "tls", "nl", "delay_done"}),
    "authenticate": frozenset({"keyrings"}),
    "authenticate.client": frozenset(ROLE_FILE_KEYS),
    "authenticate.server": frozenset(ROLE_FILE_KEYS),
    "pool": frozenset({"min_workers", "max_workers", "max_queued", "handshakes_per_worker"}),
    "worker": frozenset({"user", "drop_privileges", "handshake_timeout_ms"}),
    "status": frozenset({"socket"}),
    # Historical upstream spellings, mapped with a warning.
    "main": frozenset({"debug", "tlsdebug", "nl_debug", "keyrings"}),
    "authentication": frozenset({"keyrings"}),
}

# ktls-utils 0.7-0.9 `[main]` key -> today's (section, key).
_LEGACY_MAIN = {
    "debug": ("debug", "loglevel"),
    "tlsdebug": ("debug", "tls"),
    "nl_debug": ("debug", "nl"),
    "keyrings": ("authenticate", "keyrings"),
}

_INT_ANY = (-(2**31), 2**31 - 1)  # a C int, like g_key_file_get_integer
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


def _legacy_source(reader: _Reader, section: str, key: str) -> tuple[str, str]:
    """Where to read `[section] key` from: today's spelling, or a historical one."""
    if reader.has(section, key):
        return section, key
    for old_key, (new_section, new_key) in _LEGACY_MAIN.items():
        if (new_section, new_key) == (section, key) and reader.has("main", old_key):
            return "main", old_key
    if (section, key) == ("authenticate", "keyrings") and reader.has("authentication", key):
        return "authentication", key
    return section, key


def _legacy_warnings(reader: _Reader) -> list[Finding]:
    warnings = []
    for old_key, (new_section, new_key) in _LEGACY_MAIN.items():
        if reader.has("main", old_key):
            shadowed = (
                " (ignored: the new key is also set)" if reader.has(new_section, new_key) else ""
            )
            new = ConfigKey(new_section, new_key)
            warnings.append(reader.warning("main", old_key, f"historical key; use {new}{shadowed}"))
    if reader.has("authentication", "keyrings"):
        shadowed = (
            " (ignored: the new key is also set)" if reader.has("authenticate", "keyrings") else ""
        )
        warnings.append(
            reader.warning(
                "authentication",
                "keyrings",
                f"misspelt section (ktls-utils 0.10); use [authenticate] keyrings{shadowed}",
            )
        )
    return warnings


def _debug_int(reader: _Reader, key: str, lo: int = _INT_ANY[0]) -> int:
    section, name = _legacy_source(reader, "debug", key)
    return reader.integer(section, name, 0, lo, _INT_ANY[1])


def _read_role(reader: _Reader, section: str) -> RoleConfig:
    values = {attr: reader.path_value(section, key) for key, attr in ROLE_FILE_KEYS.items()}
    return RoleConfig(**values)


def _read_pool(reader: _Reader) -> PoolConfig:
    d = PoolConfig()
    pool = PoolConfig(
        min_workers=reader.integer("pool", "min_workers", d.min_workers, 1, 1024),
        max_workers=reader.integer("pool", "max_workers", d.max_workers, 1, 4096),
        max_queued=reader.integer("pool", "max_queued", d.max_queued, 1, 65536),
        handshakes_per_worker=reader.integer(
            "pool", "handshakes_per_worker", d.handshakes_per_worker, 1, 64
        ),
    )
    if pool.min_workers > pool.max_workers:
        raise ConfigError(
            f"{reader.path}: [pool] min_workers ({pool.min_workers}) is greater than "
            f"max_workers ({pool.max_workers})"
        )
    return pool


def _read_worker(reader: _Reader) -> WorkerConfig:
    d = WorkerConfig()
    user = reader.string("worker", "user")
    if user is not None:
        user = user.strip()
        if not _USER_RE.match(user):
            raise ConfigError(f"{reader.where('worker', 'user')}: {user!r} is not a user name")
    return WorkerConfig(
        user=user or _default_worker_user(),
        drop_privileges=reader.boolean("worker", "drop_privileges", d.drop_privileges),
        handshake_timeout_ms=reader.integer(
            "worker", "handshake_timeout_ms", d.handshake_timeout_ms, 100, 60000
        ),
    )


def _default_worker_user() -> str:
    import pwd

    try:
        pwd.getpwnam(DEFAULT_WORKER_USER)
    except KeyError:
        return FALLBACK_WORKER_USER
    return DEFAULT_WORKER_USER


def _worker_user_warnings(reader: _Reader, worker: WorkerConfig) -> list[Finding]:
    """The fallback to `nobody` is said at every start and reload."""
    if reader.string("worker", "user") or not worker.drop_privileges:
        return []
    if worker.user != FALLBACK_WORKER_USER:
        return []
    return [
        reader.warning(
            "worker",
            "user",
            f"the account {DEFAULT_WORKER_USER!r} does not exist, "
            f"so workers run as {FALLBACK_WORKER_USER!r}, which other processes may share "
            f"(and so kill or trace the workers); create it with: {CREATE_WORKER_USER}",
        )
    ]


def _read_status_socket(reader: _Reader) -> str:
    value = reader.string("status", "socket")
    if value is None:
        return DEFAULT_STATUS_SOCKET
    value = value.strip()
    where = reader.where("status", "socket")
    if not value.startswith("/"):
        raise ConfigError(f"{where}: {value!r} must be an absolute path")
    if len(os.fsencode(value)) > _SUN_PATH_MAX:
        raise ConfigError(f"{where}: path is longer than {_SUN_PATH_MAX} bytes")
    return value


def _unknown_warnings(reader: _Reader) -> list[Finding]:
    warnings = []
    for section, keys in reader.groups.items():
        known = KNOWN_KEYS.get(section)
        if known is None:
            warnings.append(reader.warning(section, None, "unknown section, ignored"))
            continue
        warnings.extend(
            reader.warning(section, key, OBSOLETE_KEYS.get((section, key), "unknown key, ignored"))
            for key in keys
            if key not in known
        )
    return warnings


def _read_file(path: str) -> str:
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES)
    except FileProblem as problem:
        if str(problem) == "file not found":
            raise ConfigError(f"{path}: configuration file not found") from None
        raise ConfigError(f"{path}: configuration file: {problem}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None


def load_config(path: str) -> Config:
    """Read and validate the configuration file at `path`.

    Returns a new Config; raises ConfigError (naming the file, section and key)
    if the file is missing, unreadable, malformed or has an invalid value.
    Unknown sections/keys and historical spellings become `Config.warnings`.
    """
    groups, warnings = parse_keyfile(_read_file(path), path)
    reader = _Reader(path, groups)
    keyrings_section, keyrings_key = _legacy_source(reader, "authenticate", "keyrings")
    config = Config(
        path=path,
        loglevel=_debug_int(reader, "loglevel"),
        tls_debug=_debug_int(reader, "tls"),
        nl_debug=_debug_int(reader, "nl"),
        delay_done=_debug_int(reader, "delay_done", lo=0),
        keyrings=reader.string_list(keyrings_section, keyrings_key) or (),
        client=_read_role(reader, "authenticate.client"),
        server=_read_role(reader, "authenticate.server"),
        pool=_read_pool(reader),
        worker=_read_worker(reader),
        status_socket=_read_status_socket(reader),
        warnings=(),
    )
    warnings += _legacy_warnings(reader) + _unknown_warnings(reader)
    warnings += _worker_user_warnings(reader, config.worker)
    if len(warnings) > MAX_CONFIG_WARNINGS:
        more = len(warnings) - MAX_CONFIG_WARNINGS + 1
        warnings[MAX_CONFIG_WARNINGS - 1 :] = [
            Finding("warning", path, None, f"{more} more warnings not shown")
        ]
    return replace(config, warnings=tuple(warnings))


# --- search order -----------------------------------------------------------------


def find_config_path(
    explicit: str | None,
    legacy_path: str = LEGACY_CONFIG_PATH,
    primary_path: str = CONFIG_PATH,
) -> str:
    """The configuration file to load, in upstream's search order.

    `-c FILE` wins (and must then load).  Otherwise the legacy /etc/tlshd.conf
    is used if it exists, with a nudge to move it; else /etc/tlshd/config.
    Unlike upstream, an existing but broken legacy file is not skipped in
    favour of the new path: it fails to load, loudly.
    """
    if explicit is not None:
        return explicit
    if os.path.lexists(legacy_path):
        log.warning("Please relocate %s to %s", legacy_path, primary_path)
        return legacy_path
    return primary_path


# --- check-config -------------------------------------------------------------------


def check_config(config: Config) -> list[Finding]:
    """Cross-check the whole configuration: keys, keyrings, users and every
    certificate, key, trust store and CRL.  Never raises; returns findings."""
    from tlshd.credentials import check_credentials

    path = config.path or "<config>"
    findings = list(config.warnings)
    findings += _check_keyrings(config, path)
    findings += _check_worker(config, path)
    findings += check_credentials(config)
    return findings


def _check_keyrings(config: Config, path: str) -> list[Finding]:
    findings = []
    for entry in config.keyrings:
        problem = keyring_entry_problem(entry)
        if problem:
            findings.append(
                Finding(
                    "error",
                    path,
                    ConfigKey("authenticate", "keyrings"),
                    f"{problem}: not a name or serial",
                )
            )
    return findings


def _check_worker(config: Config, path: str) -> list[Finding]:
    import pwd

    worker = config.worker
    if not worker.drop_privileges:
        return [
            Finding(
                "warning",
                path,
                ConfigKey("worker", "drop_privileges"),
                "false: workers keep root privileges while parsing peer data",
            )
        ]
    try:
        pwd.getpwnam(worker.user)
    except KeyError:
        return [
            Finding("error", path, ConfigKey("worker", "user"), f"no such user {worker.user!r}")
        ]
    return []
