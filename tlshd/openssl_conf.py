"""The daemon's OpenSSL configuration: the system's, plus NumTickets = 0.

TLS 1.3 session tickets cannot be switched off through pyOpenSSL or the cffi
bindings (SSL_CTX_set_num_tickets is not bound, and SSL_OP_NO_TICKET only turns
them into stateful tickets).  A ticket written by our server would consume TX
record numbers, and a kernel consumer that receives one treats it as an
unexpected handshake record.  OpenSSL's config file can set `NumTickets = 0`,
but it is read once, when the library initialises, i.e. at the first import of
cryptography or pyOpenSSL.  So `ensure_openssl_conf()` must run before those
imports: the CLI calls it first thing, tests/conftest.py at import time.

Pointing OPENSSL_CONF at a file of our own replaces the file OpenSSL would
otherwise read, and with it whatever the administrator configured there (a
FIPS provider, a crypto policy such as RHEL's, a minimum protocol or key
size).  So our file `.include`s that file first and then adds only
`NumTickets = 0`, to the same `system_default` section the system file uses
(OpenSSL reopens a section named again, and a later value of a key wins):
every other setting stays the administrator's.  The file OpenSSL would read
(`system_openssl_conf`) is $OPENSSL_CONF if the administrator set it, else
`openssl.cnf` in the OPENSSLDIR compiled into the OpenSSL that cryptography
uses.  The wheels on PyPI link their own OpenSSL, whose OPENSSLDIR is
/opt/pyca/cryptography/openssl: that file does not exist on a normal system,
so without $OPENSSL_CONF the wheel's OpenSSL reads no system file, with or
without us (docs/operations.md).

This module therefore imports nothing from OpenSSL or cryptography at module
level, and finds OPENSSLDIR without loading the library.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import mmap
import os
import re
import sys
from typing import Any

ENV_VAR = "OPENSSL_CONF"
# Set alongside OPENSSL_CONF so that a second call (or a forked worker) can tell
# that the file in OPENSSL_CONF is ours.
MARKER_VAR = "TLSHD_OPENSSL_CONF"

# What we add.  No NewSessionTickets: kernel consumers cannot use them (no
# resumption), and tickets our server wrote would shift the kTLS TX record sequence.
OVERRIDES = "NumTickets = 0\n"
# Our section names, used where the system file defines none of its own.
_INIT, _SSL, _DEFAULT = "tlshd_openssl_init", "tlshd_ssl_module", "tlshd_system_default"

# Modules whose import initialises OpenSSL (cryptography's Rust extension links it).
_OPENSSL_MODULES = ("OpenSSL", "cryptography.hazmat.bindings._rust")
# OpenSSL_version(OPENSSL_DIR) is this string, compiled into libcrypto.
_OPENSSLDIR_RE = re.compile(rb'OPENSSLDIR: "([^"\x00]*)"')
_OPENSSL_DIR = 4  # OpenSSL_version() type for OPENSSLDIR

_log = logging.getLogger("tlshd")
_probe_result: bool | None = None


def openssl_loaded() -> bool:
    """True once an import has initialised the wheel's OpenSSL."""
    return any(name in sys.modules for name in _OPENSSL_MODULES)


def keep_system_libcrypto_out() -> None:
    """Make hashlib and hmac use CPython's built-in hashes in every process of
    the daemon, so that none of them maps the system's libcrypto beside the
    OpenSSL that cryptography links.

    cryptography.x509 imports hashlib and hmac (SubjectKeyIdentifier hashes
    with SHA-1), and their `_hashlib` extension links the system libcrypto and
    initialises it on import: its config file, its default provider, every
    digest fetched once.  The PyPI wheels of cryptography link an OpenSSL of
    their own, so the zygote, and every worker forked from it, carried a second
    copy of the library that served nothing (2.6 MiB of the zygote's 16 MiB
    idle PSS in the 7.3 guest, benchmarks/README.md).  hashlib and hmac fall
    back to the built-in sha1/sha2/md5/blake2 when `_hashlib` cannot be
    imported, and a None in sys.modules makes that import fail (the Python
    reference, "The module cache").  Call it before anything imports hashlib;
    once `_hashlib` is loaded it changes nothing."""
    if "_hashlib" not in sys.modules:
        sys.modules["_hashlib"] = None  # type: ignore[assignment]


def ensure_openssl_conf() -> str:
    """Write our config to a private file and point OPENSSL_CONF at it.

    Idempotent: if OPENSSL_CONF already names our file, nothing changes.
    Returns the path.  Logs a warning if OpenSSL is already initialised, since
    the file can then no longer apply (the NST counter in the engine covers it).
    """
    current = os.environ.get(ENV_VAR)
    if current and os.environ.get(MARKER_VAR) == current and os.path.exists(current):
        return current
    if openssl_loaded():
        _log.warning(
            "OpenSSL was initialised before tlshd set %s; session tickets may not be disabled",
            ENV_VAR,
        )
    text = conf_text(system_openssl_conf())
    directory = _private_directory("tlshd-openssl-")
    path = os.path.join(directory, "openssl.cnf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.environ[ENV_VAR] = path
    os.environ[MARKER_VAR] = path
    return path


def _private_directory(prefix: str) -> str:
    """A new directory only we can enter (0700) under $TMPDIR or /tmp, as
    tempfile.mkdtemp makes one, without importing tempfile (shutil, random)."""
    parent = os.environ.get("TMPDIR") or "/tmp"
    for _ in range(100):
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused name for a private directory in {parent}")


# --- which file OpenSSL would read without us ---------------------------------------


def system_openssl_conf(environ: dict[str, str] | None = None) -> str | None:
    """The config file OpenSSL would load if we set nothing; None if there is none.

    $OPENSSL_CONF when set (and not ours), else OPENSSLDIR/openssl.cnf.
    """
    env = os.environ if environ is None else environ
    current = env.get(ENV_VAR)
    if current and env.get(MARKER_VAR) != current:
        # The administrator's.  OpenSSL skips a missing file; an .include of one
        # would fail our whole file, so it is left out too.
        return current if os.path.isfile(current) else None
    directory = openssldir()
    if directory is None:
        return None
    path = os.path.join(directory, "openssl.cnf")
    return path if os.path.isfile(path) else None


def openssldir() -> str | None:
    """OPENSSLDIR of the OpenSSL that cryptography uses, without initialising it.

    The PyPI wheels link OpenSSL statically into cryptography's Rust extension,
    whose binary holds the `OPENSSLDIR: "..."` string; a cryptography built
    against a shared libcrypto (a distribution's package) does not, and that
    libcrypto's OpenSSL_version(OPENSSL_DIR) says it (a plain getter: it does
    not initialise the library or read any config).
    """
    for binary in _cryptography_binaries():
        directory = openssldir_in_binary(binary)
        if directory is not None:
            return directory
    # Only for a cryptography built against a shared libcrypto (a distribution's
    # package); ctypes.util pulls in subprocess, shutil and tempfile, a tenth of
    # a second of the daemon's start-up under emulation, so not at module level.
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        libcrypto = ctypes.CDLL(name)
        libcrypto.OpenSSL_version.restype = ctypes.c_char_p
        libcrypto.OpenSSL_version.argtypes = [ctypes.c_int]
        text = libcrypto.OpenSSL_version(_OPENSSL_DIR) or b""
    except (OSError, AttributeError):
        return None
    match = _OPENSSLDIR_RE.search(text)
    return os.fsdecode(match.group(1)) if match else None


def _cryptography_binaries() -> list[str]:
    try:
        spec = importlib.util.find_spec("cryptography")  # does not import it
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []
    for package_dir in spec.submodule_search_locations:
        # Not glob: with fnmatch, 15 ms of start-up under emulation for one pattern.
        bindings = os.path.join(package_dir, "hazmat", "bindings")
        try:
            names = os.listdir(bindings)
        except OSError:
            continue
        found += sorted(
            os.path.join(bindings, name)
            for name in names
            if name.startswith("_rust") and name.endswith(".so")
        )
    return found


def openssldir_in_binary(path: str) -> str | None:
    """The OPENSSLDIR compiled into a binary (a statically linked OpenSSL), if any."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            match = _OPENSSLDIR_RE.search(data)
            found = bytes(match.group(1)) if match else None
    except (OSError, ValueError):
        return None
    return os.fsdecode(found) if found is not None else None


# --- our file ------------------------------------------------------------------------


def conf_text(system_path: str | None) -> str:
    """Our config: the system file included as it is, then NumTickets = 0 added to
    the `system_default` section it uses (or to sections of ours where it has none)."""
    header = "# Written by tlshd (tlshd/openssl_conf.py).\n"
    if system_path is None:
        return header + _own_chain(openssl_conf=True, ssl_conf=True, system_default=True)
    init, ssl, default = system_section_names(system_path)
    # After an include, OpenSSL's parser stays in the included file's last
    # section: every addition below names its section.
    text = f"{header}# The system configuration, unchanged:\n.include {system_path}\n\n"
    text += "# What tlshd adds:\n"
    if default is not None:
        return text + f"[{default}]\n{OVERRIDES}"
    if ssl is not None:
        return text + f"[{ssl}]\nsystem_default = {_DEFAULT}\n\n" + _own_chain(system_default=True)
    if init is not None:
        return (
            text
            + f"[{init}]\nssl_conf = {_SSL}\n\n"
            + _own_chain(ssl_conf=True, system_default=True)
        )
    return text + _own_chain(openssl_conf=True, ssl_conf=True, system_default=True)


def _own_chain(
    *, openssl_conf: bool = False, ssl_conf: bool = False, system_default: bool = False
) -> str:
    parts = []
    if openssl_conf:
        parts.append(f"[default]\nopenssl_conf = {_INIT}\n\n[{_INIT}]\nssl_conf = {_SSL}\n")
    if ssl_conf:
        parts.append(f"[{_SSL}]\nsystem_default = {_DEFAULT}\n")
    if system_default:
        parts.append(f"[{_DEFAULT}]\n{OVERRIDES}")
    return "\n".join(parts)


def system_section_names(path: str) -> tuple[str | None, str | None, str | None]:
    """(init section, ssl_conf section, system_default section) of an OpenSSL
    config file, following `.include`; None from the first link not defined.

    A small reader of OpenSSL's config syntax, enough for the three keys that
    chain the SSL defaults (`openssl_conf`, `ssl_conf`, `system_default`).
    """
    sections: dict[str, dict[str, str]] = {}
    _read_conf(path, sections, "default", depth=0)
    init = sections.get("default", {}).get("openssl_conf")
    ssl = sections.get(init, {}).get("ssl_conf") if init else None
    default = sections.get(ssl, {}).get("system_default") if ssl else None
    return init, ssl, default


_SECTION_RE = re.compile(r"^\[\s*([^\]]*?)\s*\]")
_INCLUDE_RE = re.compile(r"^\.include\s*=?\s*(.+?)\s*$")
_ASSIGN_RE = re.compile(r"^([^=\s]+)\s*=\s*(.*?)\s*$")
_MAX_INCLUDE_DEPTH = 8


def _read_conf(path: str, sections: dict[str, dict[str, str]], section: str, depth: int) -> str:
    """Add `path`'s assignments to `sections`; returns the section it ends in."""
    if depth > _MAX_INCLUDE_DEPTH:
        return section
    if os.path.isdir(path):  # an include directory: its *.cnf and *.conf files, sorted
        for name in sorted(os.listdir(path)):
            if name.endswith((".cnf", ".conf")):
                section = _read_conf(os.path.join(path, name), sections, section, depth + 1)
        return section
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return section
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if match := _SECTION_RE.match(line):
            section = match.group(1)
            sections.setdefault(section, {})
        elif match := _INCLUDE_RE.match(line):
            section = _read_conf(match.group(1).strip("\"'"), sections, section, depth + 1)
        elif match := _ASSIGN_RE.match(line):
            name, value = match.group(1), match.group(2).strip("\"'")
            target, _, key = name.rpartition("::")
            sections.setdefault(target or section, {})[key] = value
    return section


def tickets_disabled() -> bool:
    """Whether a TLS 1.3 server context in this process writes no NewSessionTicket.

    Runs one in-memory handshake (ephemeral P-256 key, no network) and counts
    NSTs; the result is cached because the config applies process-wide.
    """
    global _probe_result
    if _probe_result is None:
        _probe_result = _probe_tickets() == 0
    return _probe_result


def warn_if_tickets_enabled() -> None:
    """Our file includes the system's: if OpenSSL rejected it (a syntax error
    there voids the whole load), NumTickets = 0 is lost too; say so.  Run by
    the zygote, which loads OpenSSL anyway, not on the supervisor's start-up
    path (the probe is a whole in-memory handshake)."""
    from tlshd.log import log

    if not tickets_disabled():
        log.warning(
            "OpenSSL did not apply %s=%s (NumTickets = 0); check the system OpenSSL "
            "configuration it includes. Session tickets will be counted per handshake",
            ENV_VAR,
            os.environ.get(ENV_VAR),
        )


def throwaway_identity(common_name: str) -> tuple[Any, Any]:
    """A fresh P-256 key and a self-signed certificate valid for five minutes,
    for in-memory handshakes that only exercise OpenSSL (the NumTickets probe
    here, the zygote's warm-up)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(minutes=5))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _probe_tickets() -> int:
    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib

    key, cert = throwaway_identity("tlshd-ticket-probe")
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    server_ctx.use_certificate(cert)
    server_ctx.use_privatekey(key)
    server_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    written_nsts = [0]

    # A cffi callback: its types are the C signature given to ffi.callback.
    @ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)")
    def count_nst(write_p, _version, content_type, buf, length, _ssl, _arg):  # type: ignore[no-untyped-def]
        # content type 22 = handshake; message type 4 = NewSessionTicket
        if write_p and content_type == 22 and length and ffi.cast("unsigned char *", buf)[0] == 4:
            written_nsts[0] += 1

    lib.SSL_CTX_set_msg_callback(server_ctx._context, count_nst)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    for _ in range(10):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
    return written_nsts[0]
