"""Fuzzing the configuration parser: whatever bytes are in the file,
`load_config` returns a Config or raises ConfigError, and `check_config` on
whatever loaded returns findings without raising."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlshd.config import KNOWN_KEYS, Config, ConfigError, ConfigKey, check_config, load_config
from tlshd.credentials import CredentialsError, load_credentials

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

SECTIONS = [*KNOWN_KEYS, "", "pool ", "authenticate.client.x", "\u00e9", "a]b", "[x]"]
KEYS = [*sorted({key for keys in KNOWN_KEYS.values() for key in keys}), "", "x", "=", " k"]
# Values that reach each typed reader's edge cases: signs, huge numbers,
# escapes (valid and invalid), list separators, paths, NULs and controls.
TRICKY_VALUES = [
    "",
    "0",
    "-1",
    "+5",
    "1" * 5000,  # more digits than int() converts by default
    "0x10",
    "99999999999999999999",
    "true",
    "TRUE",
    "yes",
    "\\",
    "\\q",
    "\\s\\n\\t\\r\\\\",
    "a\\;b;c;;",
    ";",
    "/run/x.sock",
    "/" + "p" * 200,
    "relative",
    "nobody",
    "root",
    "no body",
    "\x00",
    "a\x00b",
    "\x7f\x1b[0m",
    "\ud7ff\ue000\U0010ffff",
]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tlshd-fuzz-config-") as name:
        yield Path(name)


def load_bytes(directory: Path, data: bytes) -> Config | None:
    """Write `data` as a config file and load it; None if it was refused."""
    path = directory / "tlshd.conf"
    path.write_bytes(data)
    try:
        config = load_config(str(path))
    except ConfigError as err:
        assert str(err), "a ConfigError must say what is wrong"
        return None
    assert isinstance(config, Config)
    assert config.pool.min_workers <= config.pool.max_workers
    findings = check_config(config)
    assert all(f.severity in ("error", "warning") for f in findings)
    try:  # what the daemon does next with the paths it names
        load_credentials(config)
    except CredentialsError as err:
        assert str(err)
    return config


@st.composite
def keyfiles(draw: st.DrawFn) -> str:
    """Mostly-plausible GKeyFile text: sections, key=value lines, comments, junk."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["section", "pair", "pair", "pair", "comment", "junk"]))
        if kind == "section":
            lines.append(f"[{draw(st.sampled_from(SECTIONS) | st.text(max_size=12))}]")
        elif kind == "pair":
            key = draw(st.sampled_from(KEYS) | st.text(max_size=10))
            value = draw(st.sampled_from(TRICKY_VALUES) | st.text(max_size=40))
            spaces = draw(st.sampled_from(["", " ", "\t", "  "]))
            lines.append(f"{key}{spaces}={spaces}{value}")
        elif kind == "comment":
            lines.append("#" + draw(st.text(max_size=20)))
        else:
            lines.append(draw(st.text(max_size=60)))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\u2028"]))
    return newline.join(lines)


@SETTINGS
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(workdir: Path, data: bytes) -> None:
    load_bytes(workdir, data)


@SETTINGS
@given(st.text(max_size=2000))
def test_arbitrary_text(workdir: Path, text: str) -> None:
    load_bytes(workdir, text.encode("utf-8", errors="surrogatepass"))


@SETTINGS
@given(keyfiles())
def test_structured_keyfiles(workdir: Path, text: str) -> None:
    load_bytes(workdir, text.encode("utf-8", errors="surrogatepass"))


@settings(max_examples=100, deadline=None)
@given(
    section=st.sampled_from(sorted(KNOWN_KEYS)),
    value=st.sampled_from(TRICKY_VALUES) | st.text(max_size=80),
    data=st.data(),
)
def test_every_known_key_with_tricky_values(section: str, value: str, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(KNOWN_KEYS[section])))
    with tempfile.TemporaryDirectory(prefix="tlshd-fuzz-config-") as name:
        load_bytes(Path(name), f"[{section}]\n{key}={value}\n".encode("utf-8", "surrogatepass"))


# Hostile files the parser must refuse: ConfigError, with a message that
# starts with the file's name and says what is wrong (the fragment).
REFUSED = [
    (b"[pool]\nmax_workers=" + b"9" * 100_000 + b"\n", "[pool] max_workers: '999"),
    (b"[worker]\nhandshake_timeout_ms=" + b"1" * 4301 + b"\n", "is out of range"),
    (b"[debug]\nloglevel=-" + b"7" * 5000 + b"\n", "[debug] loglevel: '-777"),
    (b"[status]\nsocket=/" + b"s" * 1_000_000 + b"\n", "path is longer than 107 bytes"),
    (b"\x00" * 1000, ":1: '\\x00"),
    (b"[debug]\nloglevel=1\x00\n", "[debug] loglevel: value contains a NUL byte"),
    (b"[authenticate.client]\nx509.certificate=/etc/passwd\x00.pem\n", "contains a NUL byte"),
    (b"[worker]\nuser=a\x00b\n", "[worker] user: value contains a NUL byte"),
    (b"\xff\xfe[debug]\n", "not valid UTF-8 (byte offset 0)"),  # a UTF-16 BOM
    (b"[debug]\nloglevel=\xc3\x28\n", "not valid UTF-8 (byte offset 17)"),
    (b"\xef\xbb\xbf[debug]\nloglevel=1\n", ":1: '\\ufeff[debug]' is not a key=value pair"),
    (b"[debug\n", ":1: '[debug' is not a key=value pair"),
    (b"]debug[\n", ":1: ']debug[' is not a key=value pair"),
    (b"[[debug]]\n", ":1: '[[debug]]' is not a key=value pair"),
    (b"[debug]]\nloglevel=1\n", ":1: '[debug]]' is not a key=value pair"),
    (b"key=value\n", ":1: key 'key' appears before any [section]"),
    (b"[debug]\n=1\n", ":2: '=1' is not a key=value pair"),
    (b"[status]\nsocket=/a\\\n", "[status] socket: value ends with a lone backslash"),
]


@pytest.mark.parametrize(("data", "fragment"), REFUSED, ids=lambda v: repr(v[:24]))
def test_hostile_files_are_refused(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = tmp_path / "tlshd.conf"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message, message[:300]


_SERVER = "authenticate.server"
# Hostile files that parse, because each value is well-formed: the daemon
# starts, and `--check-config` reports each problem as an error on its key.
LOADED_WITH_ERRORS = [
    (b"[authenticate.server]\nx509.private_key=/" + b"k" * 5000 + b"\n",
     [ConfigKey(_SERVER, "x509.certificate"), ConfigKey(_SERVER, "x509.private_key")]),
    (b"[authenticate.server]\nx509.truststore=/etc/passwd\n",  # not PEM
     [ConfigKey(_SERVER, "x509.truststore")]),
    (b"[authenticate.client]\nx509.crl=/proc/self/status\n",
     [ConfigKey("authenticate.client", "x509.crl")]),
    # A serial out of range, a negative number, a name longer than a key description.
    (b"[authenticate]\nkeyrings=" + b";".join([b"0x" + b"f" * 5000, b"-1", b"x" * 9000]) + b"\n",
     [ConfigKey("authenticate", "keyrings")] * 3),
]  # fmt: skip


@pytest.mark.parametrize(("data", "keys"), LOADED_WITH_ERRORS, ids=lambda v: repr(v)[:24])
def test_hostile_values_are_errors(tmp_path: Path, data: bytes, keys: list[ConfigKey]) -> None:
    config = load_bytes(tmp_path, data)
    assert config is not None
    findings = check_config(config)
    assert [f.key for f in findings if f.severity == "error"] == keys, findings


def test_huge_section_name_is_an_unknown_section(tmp_path: Path) -> None:
    config = load_bytes(tmp_path, b"[" + b"x" * 10_000 + b"]\n")
    assert config is not None
    (warning,) = config.warnings
    assert warning.key == ConfigKey("x" * 10_000) and warning.message == "unknown section, ignored"


def test_not_a_regular_file(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ConfigError):
            load_config(str(path))
    assert isinstance(load_config("/dev/null"), Config)  # empty: all defaults
