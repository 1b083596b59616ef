"""The `tlshd` command: upstream's `-c -h -s -v`, plus `--check-config`, `status`
and `install-files` (man page: man/tlshd.8).

    tlshd [-s] [-c FILE]            run the daemon in the foreground
    tlshd --check-config [-c FILE]  validate the config and every PEM file it names
    tlshd -v | -h
    tlshd status [--json] [--socket PATH] [-c FILE]   (tlshd/statusclient.py)
    tlshd install-files [--root DIR]                  (tlshd/install.py)

One option table and one parser (`parse_options`) serve every form.
Exit codes: 0 success; 1 usage error, bad configuration, check-config errors,
an unreachable status socket, or a file install-files cannot write.  As
upstream, `-h` prints usage to stderr and exits 0.  Unlike upstream, `-v`
prints to stdout (so scripts can capture it) and names the Python TLS stack,
since that is what decides the TLS behaviour.

This module imports nothing that loads OpenSSL: `main` must first let
`tlshd.openssl_conf` point OPENSSL_CONF at the daemon's own file, because
OpenSSL reads it once, when the first import of cryptography/pyOpenSSL
initialises the library.  `status` and `install-files` never load OpenSSL,
so they skip it (and write no private OpenSSL file).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import tlshd
from tlshd.config import (
    ConfigError,
    find_config_path,
    load_config,
)

USAGE = (
    "usage: tlshd [-chsv] [--check-config]\n"
    "       tlshd status [--json] [--socket PATH] [-c FILE]\n"
    "       tlshd install-files [--root DIR]\n"
)
PATH_MAX = 4096

# (short spelling, long spelling, name, takes a value): every command's options.
_OPTION_TABLE = (
    ("-c", "--config", "config", True),
    ("-h", "--help", "help", False),
    ("-s", "--stderr", "stderr", False),
    ("-v", "--version", "version", False),
    (None, "--check-config", "check_config", False),
    ("-j", "--json", "json", False),
    (None, "--socket", "socket", True),
    (None, "--root", "root", True),
)
# Option spelling -> (name, takes a value).
_OPTIONS: dict[str, tuple[str, bool]] = {
    spelling: (name, takes_value)
    for short, long, name, takes_value in _OPTION_TABLE
    for spelling in (short, long)
    if spelling is not None
}
_LONG_SPELLINGS = tuple(long[2:] for _short, long, _name, _takes in _OPTION_TABLE)
# The options each command takes, by name.
_DAEMON_OPTS = frozenset({"config", "help", "stderr", "version", "check_config"})
_STATUS_OPTS = frozenset({"config", "help", "json", "socket"})
_INSTALL_OPTS = frozenset({"help", "root"})

log = logging.getLogger("tlshd")


class UsageError(Exception):
    """A command line that does not parse; the message says what is wrong."""


def _subcommand_options(
    args: Sequence[str], allowed: frozenset[str], command: str
) -> dict[str, str | bool] | int:
    """A subcommand's options, or its exit status when there is nothing more
    to do (a usage error: 2; --help: 0)."""
    try:
        parsed = parse_options(args, allowed)
    except UsageError as err:
        return _usage_error(f"{command}: {err}")
    if parsed.get("help"):
        sys.stderr.write(USAGE)
        return 0
    return parsed


def parse_options(args: Sequence[str], allowed: frozenset[str]) -> dict[str, str | bool]:
    """GNU-style options: {name: value or True}, in command-line order.

    Short options cluster (`-sc FILE`, `-cFILE`), long ones take `--opt=value`
    or `--opt value` and may be abbreviated to a unique prefix, `--` ends the
    options.  A repeated option keeps its last value; a positional argument is
    an error.  (Not getopt: it imports gettext, 0.15 s of start-up under
    emulation, on the path to READY.)
    """
    parsed: dict[str, str | bool] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            if rest:
                raise UsageError(f"unexpected argument {rest[0]!r}")
            break
        if arg.startswith("--"):
            _parse_long(arg[2:], rest, allowed, parsed)
        elif arg.startswith("-") and arg != "-":
            _parse_short_cluster(arg[1:], rest, allowed, parsed)
        else:
            raise UsageError(f"unexpected argument {arg!r}")
    return parsed


def _parse_long(
    text: str, rest: list[str], allowed: frozenset[str], parsed: dict[str, str | bool]
) -> None:
    spelling, has_value, value = text.partition("=")
    matches = [long for long in _LONG_SPELLINGS if long.startswith(spelling) and
               _OPTIONS["--" + long][0] in allowed]  # fmt: skip
    if spelling in matches:
        matches = [spelling]
    if not matches:
        raise UsageError(f"option --{spelling} not recognized")
    if len(matches) > 1:
        raise UsageError(f"option --{spelling} not a unique prefix")
    name, takes_value = _OPTIONS["--" + matches[0]]
    if not takes_value:
        if has_value:
            raise UsageError(f"option --{matches[0]} must not have an argument")
        parsed[name] = True
        return
    if not has_value:
        if not rest:
            raise UsageError(f"option --{matches[0]} requires argument")
        value = rest.pop(0)
    parsed.pop(name, None)  # keep command-line order of the last occurrence
    parsed[name] = value


def _parse_short_cluster(
    letters: str, rest: list[str], allowed: frozenset[str], parsed: dict[str, str | bool]
) -> None:
    for index, letter in enumerate(letters):
        option = _OPTIONS.get("-" + letter)
        if option is None or option[0] not in allowed:
            raise UsageError(f"option -{letter} not recognized")
        name, takes_value = option
        if not takes_value:
            parsed[name] = True
            continue
        value = letters[index + 1 :]
        if not value:
            if not rest:
                raise UsageError(f"option -{letter} requires argument")
            value = rest.pop(0)
        parsed.pop(name, None)
        parsed[name] = value
        return


def _string(parsed: dict[str, str | bool], name: str) -> str | None:
    """The value of an option that takes one, or None if it was not given."""
    value = parsed.get(name)
    return value if isinstance(value, str) else None


def _first_of(parsed: dict[str, str | bool], *names: str) -> str | None:
    """Which of `names` came first on the command line (`-v -h` prints the version)."""
    return next((name for name in parsed if name in names), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tlshd` console script and `python -m tlshd`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _COMMANDS:
        return _COMMANDS[args[0]](args[1:])
    _ensure_openssl_conf()
    try:
        parsed = parse_options(args, _DAEMON_OPTS)
    except UsageError as err:
        return _usage_error(str(err))
    first = _first_of(parsed, "help", "version")
    if first == "help":
        sys.stderr.write(USAGE)
        return 0
    if first == "version":
        print(version_string())
        return 0
    config_arg = _string(parsed, "config")
    if config_arg is not None and (not config_arg or len(os.fsencode(config_arg)) >= PATH_MAX):
        sys.stderr.write("tlshd: Invalid config file\n")
        return 1
    if parsed.get("check_config"):
        return check_config_main(config_arg)
    return run_main(config_arg, bool(parsed.get("stderr")))


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
    # First, while the heap is still small (tlshd/heap.py says why).
    from tlshd.heap import refuse_huge_pages

    refuse_huge_pages()
    from tlshd.log import set_debug, setup_logging

    setup_logging(to_stderr=to_stderr, debug=False)
    log.info("tlshd %s starting", tlshd.__version__)
    # Before the zygote imports cryptography (tlshd/openssl_conf.py says why).
    from tlshd.openssl_conf import keep_system_libcrypto_out

    keep_system_libcrypto_out()
    # The OpenSSL bindings are checked, and the PEM files parsed, by the zygote:
    # the supervisor never loads OpenSSL or cryptography (workers/zygote.py).
    path = find_config_path(config_arg)
    try:
        config = load_config(path)
    except ConfigError as err:
        log.error("%s", err)
        return 1
    for warning in config.warnings:
        log.warning("%s", warning)
    set_debug(config.loglevel != 0)
    # The first zygote is forked before the supervisor imports its loop, so
    # that the two start-ups overlap (supervisor/firstzygote.py says why).
    try:
        from tlshd.pemfiles import CredentialsError
        from tlshd.supervisor.firstzygote import fork_first_zygote
        from tlshd.supervisor.tlsmodule import probe_kernel_caps
    except ImportError as err:
        log.error("cannot start the supervisor: %s", err)
        return 1
    try:
        first_zygote = fork_first_zygote(config, prepare_kernel=probe_kernel_caps)
    except CredentialsError as err:
        log.error("%s", err)
        return 1
    except OSError as err:
        log.error("cannot fork the zygote: %s", err.strerror or err)
        return 1
    try:
        from tlshd.supervisor.arbiter import run_daemon
    except ImportError as err:
        log.error("cannot start the supervisor: %s", err)
        first_zygote.abandon()
        return 1
    return run_daemon(path, config, first_zygote)


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


def status_main(args: Sequence[str]) -> int:
    """`tlshd status`: ask the running daemon for its state and print it."""
    from tlshd.statusclient import (
        StatusError,
        fetch_status,
        render_status,
        status_socket_from_config,
    )

    parsed = _subcommand_options(args, _STATUS_OPTS, "status")
    if isinstance(parsed, int):
        return parsed
    _setup_tool_logging()
    try:
        path = _string(parsed, "socket") or status_socket_from_config(_string(parsed, "config"))
        document = fetch_status(path)
    except (StatusError, ConfigError) as err:
        sys.stderr.write(f"tlshd status: {err}\n")
        return 1
    if parsed.get("json"):
        import json

        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render_status(document))
    return 0


# --- install-files -------------------------------------------------------------------


def install_main(args: Sequence[str]) -> int:
    """`tlshd install-files`: the unit, example config and man pages out of the wheel."""
    from tlshd.install import InstallError, install_files

    parsed = _subcommand_options(args, _INSTALL_OPTS, "install-files")
    if isinstance(parsed, int):
        return parsed
    root = _string(parsed, "root") or "/"
    try:
        for line in install_files(root):
            print(line)
    except InstallError as err:
        sys.stderr.write(f"tlshd install-files: {err}\n")
        return 1
    if root == "/":
        print("next: systemctl daemon-reload && systemctl enable --now tlshd")
    return 0


# Commands that take the first argument; everything else is the daemon's options.
_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "status": status_main,
    "install-files": install_main,
}
