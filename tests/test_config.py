"""Config parsing (GKeyFile dialect), validation, search order and keyrings."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import tlshd.config
from tlshd.config import (
    DEFAULT_STATUS_SOCKET,
    KNOWN_KEYS,
    Config,
    ConfigError,
    ConfigKey,
    Finding,
    check_config,
    find_config_path,
    load_config,
)
from tlshd.keyring import keyring_entry_problem, keyring_serial

REAL_DEFAULT_WORKER_USER = tlshd.config._default_worker_user

# As shipped by ktls-utils: everything but [debug] commented out.
UPSTREAM_SHIPPED = """\
#
# ktls-utils tlshd configuration file
#
[debug]
loglevel=0
tls=0
nl=0

[authenticate]
#keyrings= <keyring>;<keyring>;<keyring>

[authenticate.client]
#x509.truststore= <pathname>
#x509.crl= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>

[authenticate.server]
#x509.truststore= <pathname>
#x509.crl= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
"""

# The minimal config of the Docker Hardened Image guide (dhi-ktls-utils-guide.md).
DHI_MINIMAL = """\
[debug]
loglevel = 0
tls = 0
nl = 0

[authenticate]
keyrings =
"""

# An NFS server with mTLS, as a site would write it.
NFS_SERVER = """\
[debug]
loglevel=1
tls=3
delay_done = 2

[authenticate]
keyrings=.nfsd;site-keys;12345

[authenticate.client]
x509.truststore=/etc/pki/tls/certs/site-ca.pem

[authenticate.server]
x509.truststore= /etc/pki/tls/certs/site-ca.pem
x509.crl= /etc/pki/tls/crl/site.crl
x509.certificate= /etc/pki/tls/certs/nfs.example.pem
x509.private_key= /etc/pki/tls/private/nfs.example.key
x509.pq.certificate= /etc/pki/tls/certs/nfs-mldsa.pem
x509.pq.private_key= /etc/pki/tls/private/nfs-mldsa.key
"""

# ktls-utils 0.7-0.9 used [main].
HISTORICAL = """\
[main]
debug=1
tlsdebug=2
nl_debug=3
keyrings=.nvme;mine
"""


def write(tmp_path: Path, text: str, name: str = "config") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


# --- upstream files work unchanged --------------------------------------------------------


def test_upstream_shipped_file(tmp_path: Path) -> None:
    config = load(tmp_path, UPSTREAM_SHIPPED)
    assert config == Config(path=str(tmp_path / "config"))
    assert config.warnings == ()


def test_dhi_minimal_config(tmp_path: Path) -> None:
    config = load(tmp_path, DHI_MINIMAL)
    assert config.keyrings == ()
    assert config.loglevel == config.tls_debug == config.nl_debug == 0
    assert config.warnings == ()


def test_nfs_server_config(tmp_path: Path) -> None:
    config = load(tmp_path, NFS_SERVER)
    assert (config.loglevel, config.tls_debug, config.nl_debug, config.delay_done) == (1, 3, 0, 2)
    assert config.keyrings == (".nfsd", "site-keys", "12345")
    assert config.client.truststore == "/etc/pki/tls/certs/site-ca.pem"
    assert config.client.certificate is None
    server = config.server
    assert server.truststore == "/etc/pki/tls/certs/site-ca.pem"
    assert server.crl == "/etc/pki/tls/crl/site.crl"
    assert server.certificate == "/etc/pki/tls/certs/nfs.example.pem"
    assert server.private_key == "/etc/pki/tls/private/nfs.example.key"
    assert server.pq_certificate == "/etc/pki/tls/certs/nfs-mldsa.pem"
    assert server.pq_private_key == "/etc/pki/tls/private/nfs-mldsa.key"
    assert config.warnings == ()


def test_historical_main_section(tmp_path: Path) -> None:
    config = load(tmp_path, HISTORICAL)
    assert (config.loglevel, config.tls_debug, config.nl_debug) == (1, 2, 3)
    assert config.keyrings == (".nvme", "mine")
    assert [w.key for w in config.warnings] == [
        ConfigKey("main", "debug"),
        ConfigKey("main", "tlsdebug"),
        ConfigKey("main", "nl_debug"),
        ConfigKey("main", "keyrings"),
    ]
    assert config.warnings[1].message == "historical key; use [debug] tls"
    assert str(config.warnings[1]) == (
        f"warning: {tmp_path}/config:{config.warnings[1].line}: [main] tlsdebug: "
        "historical key; use [debug] tls"
    )


def test_new_keys_win_over_historical(tmp_path: Path) -> None:
    config = load(tmp_path, HISTORICAL + "[debug]\nloglevel=0\n[authenticate]\nkeyrings=x\n")
    assert config.loglevel == 0 and config.tls_debug == 2
    assert config.keyrings == ("x",)
    shadowed = [w.key for w in config.warnings if "ignored: the new key" in w.message]
    assert shadowed == [ConfigKey("main", "debug"), ConfigKey("main", "keyrings")]


def test_misspelt_authentication_section_of_0_10(tmp_path: Path) -> None:
    config = load(tmp_path, "[authentication]\nkeyrings=a;b\n")
    assert config.keyrings == ("a", "b")
    (warning,) = config.warnings
    assert warning.key == ConfigKey("authentication", "keyrings") and warning.line == 2
    assert warning.message.startswith("misspelt section")


# --- GKeyFile dialect ------------------------------------------------------------------


def test_keys_are_case_sensitive(tmp_path: Path) -> None:
    config = load(tmp_path, "[debug]\nLogLevel=1\n")
    assert config.loglevel == 0
    assert config.warnings == (
        Finding("warning", f"{tmp_path}/config", ConfigKey("debug", "LogLevel"),
                "unknown key, ignored", line=2),
    )  # fmt: skip


def test_semicolon_is_not_a_comment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[authenticate]\nkeyrings = a ; b;;c\\;d;\n"
        "[authenticate.client]\nx509.certificate = /x;y.pem\n",
    )
    assert config.keyrings == ("a", "b", "c;d")
    assert config.client.certificate == "/x;y.pem"


def test_escapes_and_whitespace(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "  # indented comment\n"
        "[authenticate.client]\n"
        "   x509.certificate   =   /a\\sb\\\\c.pem   \n"
        "x509.truststore=\\s/lead\n",
    )
    assert config.client.certificate == "/a b\\c.pem"
    assert config.client.truststore == " /lead"


def test_repeated_group_merges_and_last_key_wins(tmp_path: Path) -> None:
    config = load(tmp_path, "[debug]\nloglevel=1\n[pool]\n[debug]\ntls=2\nloglevel=3\n")
    assert (config.loglevel, config.tls_debug) == (3, 2)
    (warning,) = config.warnings
    assert (warning.key, warning.line) == (ConfigKey("debug", "loglevel"), 6)
    assert warning.message == "set again; line 2 is overridden"


def test_empty_path_means_unset(tmp_path: Path) -> None:
    config = load(tmp_path, "[authenticate.server]\nx509.truststore=\n")
    assert config.server.truststore is None


def test_unknown_sections_and_keys_warn(tmp_path: Path) -> None:
    config = load(tmp_path, "[debug]\nverbose=1\n[authenticate.server]\nx509.foo=1\n[extra]\na=b\n")
    path = f"{tmp_path}/config"
    assert [str(w) for w in config.warnings] == [
        f"warning: {path}:2: [debug] verbose: unknown key, ignored",
        f"warning: {path}:4: [authenticate.server] x509.foo: unknown key, ignored",
        f"warning: {path}: [extra]: unknown section, ignored",
    ]


# --- our sections -------------------------------------------------------------------------


def test_our_sections(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[pool]\nmin_workers=1\nmax_workers=4\nmax_queued=9\nmax_handshakes=10\n"
        "[worker]\nuser=tlshd\ndrop_privileges=false\nhandshake_timeout_ms=2500\n"
        "[status]\nsocket=/tmp/t.sock\n",
    )
    assert (config.pool.min_workers, config.pool.max_workers) == (1, 4)
    assert config.pool.max_queued == 9
    (obsolete,) = [w for w in config.warnings if w.key == ConfigKey("pool", "max_handshakes")]
    assert "obsolete" in obsolete.message
    assert config.worker.user == "tlshd"
    assert config.worker.drop_privileges is False
    assert config.worker.handshake_timeout_ms == 2500
    assert config.status_socket == "/tmp/t.sock"


def documented_defaults() -> dict[tuple[str, str], str]:
    """{(section, key): default} from the key tables of docs/configuration.md,
    whose second column ends in ", DEFAULT"."""
    defaults = {}
    sections: list[str] = []
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("#"):
            sections = re.findall(r"`\[([a-z.]+)\]`", line) if line.startswith("### ") else []
            continue
        row = re.match(r"^\| `([a-z0-9_.]+)` \| ([^|]*), ([^,|]+) \|", line)
        for section in sections if row else ():
            defaults[(section, row[1])] = row[3].strip().strip("`")
    return defaults


def default_as_loaded(config: Config, section: str, key: str) -> object:
    """What `load_config` made of `[section] key` when the file does not set it."""
    if section == "debug":
        return getattr(config, {"loglevel": "loglevel", "tls": "tls_debug", "nl": "nl_debug"}
                       .get(key, key))  # fmt: skip
    if section == "authenticate":
        return config.keyrings
    if section.startswith("authenticate."):
        role = config.role(section.split(".")[1])
        return getattr(role, key.removeprefix("x509.").replace(".", "_"))
    if section == "status":
        return config.status_socket
    return getattr(getattr(config, section), key)


def parse_documented(text: str) -> object:
    words = {"unset": None, "empty": (), "true": True, "false": False}
    if text in words:
        return words[text]
    return int(text) if text.isdigit() else text


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    """An empty file gives every key the default that docs/configuration.md states,
    and every key the parser knows (less the historical spellings) is documented."""
    documented = documented_defaults()
    current = {(section, key) for section, keys in KNOWN_KEYS.items() for key in keys}
    historical = {
        (section, key) for section, key in current if section in ("main", "authentication")
    }
    assert set(documented) == current - historical
    config = load(tmp_path, "")
    for (section, key), text in documented.items():
        assert default_as_loaded(config, section, key) == parse_documented(text), (section, key)
    assert config.status_socket == DEFAULT_STATUS_SOCKET


# --- errors name the file, section and key ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[debug]\nloglevel=yes\n", "config:2: [debug] loglevel: 'yes' is not an integer"),
        ("[debug]\ndelay_done=-1\n", "[debug] delay_done: -1 is out of range"),
        ("[main]\ntlsdebug=1x\n", "[main] tlsdebug: '1x' is not an integer"),
        ("[pool]\nmin_workers=0\n", "[pool] min_workers: 0 is out of range (1..1024)"),
        ("[pool]\nmin_workers=5\nmax_workers=4\n", "[pool] min_workers (5) is greater than"),
        ("[pool]\nmax_queued=0\n", "[pool] max_queued: 0 is out of range"),
        ("[worker]\nhandshake_timeout_ms=99\n", "out of range (100..60000)"),
        ("[worker]\nhandshake_timeout_ms=60001\n", "out of range (100..60000)"),
        ("[worker]\ndrop_privileges=maybe\n", "[worker] drop_privileges: 'maybe' is not true"),
        ("[worker]\nuser=a b\n", "[worker] user: 'a b' is not a user name"),
        ("[status]\nsocket=rel.sock\n", "[status] socket: 'rel.sock' must be an absolute path"),
        ("[status]\nsocket=/" + "x" * 120 + "\n", "longer than 107 bytes"),
        ("[authenticate.client]\nx509.crl=a\\qb\n", "x509.crl: invalid escape sequence \\q"),
        ("loglevel=1\n", "config:1: key 'loglevel' appears before any [section]"),
        ("[debug]\nloglevel\n", "config:2: 'loglevel' is not a key=value pair"),
        ("[debug\n", "config:1: '[debug' is not a key=value pair"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(str(tmp_path / "config"))
    assert fragment in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope: configuration file not found"):
        load_config(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_config(str(tmp_path))
    (tmp_path / "bin").write_bytes(b"[debug]\n\xff\n")
    with pytest.raises(ConfigError, match=r"bin: not valid UTF-8"):
        load_config(str(tmp_path / "bin"))


def test_boolean_spellings(tmp_path: Path) -> None:
    for word, value in (("true", True), ("0", False), ("False", False), ("1", True)):
        config = load(tmp_path, f"[worker]\ndrop_privileges={word}\n")
        assert config.worker.drop_privileges is value


# --- search order -----------------------------------------------------------------------


def test_explicit_path_wins(tmp_path: Path) -> None:
    legacy = write(tmp_path, "", "tlshd.conf")
    assert find_config_path("/x/y", legacy, "/p") == "/x/y"


def test_legacy_path_used_with_notice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    legacy = write(tmp_path, "", "tlshd.conf")
    primary = str(tmp_path / "tlshd" / "config")
    logger = logging.getLogger("tlshd")
    logger.propagate, old = True, logger.propagate
    try:
        with caplog.at_level(logging.INFO, logger="tlshd"):
            assert find_config_path(None, legacy, primary) == legacy
    finally:
        logger.propagate = old
    assert f"Please relocate {legacy} to {primary}" in caplog.text


def test_primary_path_when_no_legacy(tmp_path: Path) -> None:
    primary = str(tmp_path / "config")
    assert find_config_path(None, str(tmp_path / "tlshd.conf"), primary) == primary


# --- keyrings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "serial", "ok"),
    [
        (".nvme", None, True),
        ("site-keys", None, True),
        ("12345", 12345, True),
        ("0x1f", 31, True),
        ("0", 0, False),
        ("99999999999", 99999999999, False),
        ("-3", None, False),
        ("0xzz", None, False),
        ("two words", None, False),
        ("tab\there", None, False),
    ],
)
def test_keyring_entries(entry: str, serial: int | None, ok: bool) -> None:
    assert keyring_serial(entry) == serial
    assert (keyring_entry_problem(entry) is None) is ok


def test_check_config_flags_bad_keyrings_and_warnings(tmp_path: Path) -> None:
    config = load(tmp_path, "[authenticate]\nkeyrings=good;-3\n[debug]\nodd=1\n")
    findings = check_config(config)
    path = str(tmp_path / "config")
    assert [(f.severity, f.file, f.line, f.key) for f in findings] == [
        ("warning", path, 4, ConfigKey("debug", "odd")),
        ("error", path, None, ConfigKey("authenticate", "keyrings")),
    ]
    assert "'-3'" in findings[1].message


def test_check_config_unknown_user(tmp_path: Path) -> None:
    findings = check_config(load(tmp_path, "[worker]\nuser=no-such-user-tlshd\n"))
    assert [(f.severity, f.key) for f in findings] == [("error", ConfigKey("worker", "user"))]


def test_check_config_root_workers_warn(tmp_path: Path) -> None:
    findings = check_config(load(tmp_path, "[worker]\ndrop_privileges=false\n"))
    assert [(f.severity, f.key) for f in findings] == [
        ("warning", ConfigKey("worker", "drop_privileges"))
    ]


# --- shipped example and documentation --------------------------------------------------

REPO = Path(__file__).parent.parent


def test_example_config_loads_cleanly() -> None:
    config = load_config(str(REPO / "etc" / "config.example"))
    assert config.warnings == ()
    defaults = Config(path=config.path)
    assert (config.pool, config.worker, config.status_socket) == (
        defaults.pool,
        defaults.worker,
        defaults.status_socket,
    )


def test_every_key_is_documented() -> None:
    from tlshd.config import KNOWN_KEYS

    doc = (REPO / "docs" / "configuration.md").read_text()
    for section, keys in KNOWN_KEYS.items():
        assert f"[{section}]" in doc, section
        for key in keys:
            assert f"`{key}`" in doc or f"[{section}] {key}`" in doc, (section, key)


# --- the worker account (issue 11 #2) ---------------------------------------------------


def _accounts(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make pwd.getpwnam know exactly `names` (root's entry stands in for each),
    and undo conftest's pinning of the default account."""
    import pwd

    import tlshd.config

    monkeypatch.setattr(tlshd.config, "_default_worker_user", REAL_DEFAULT_WORKER_USER)

    real = pwd.getpwnam("root")

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name in names:
            return real
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)


def test_workers_default_to_an_account_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _accounts(monkeypatch, "tlshd", "nobody")
    config = load(tmp_path, "")
    assert config.worker.user == "tlshd"
    assert not [w for w in config.warnings if "[worker] user" in w]


def test_missing_worker_account_falls_back_to_nobody_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _accounts(monkeypatch, "nobody")
    config = load(tmp_path, "")
    assert config.worker.user == "nobody"
    (warning,) = [w for w in config.warnings if w.key == ConfigKey("worker", "user")]
    assert "'tlshd' does not exist" in warning.message and "useradd --system" in warning.message
    finding = [f for f in check_config(config) if f.key == ConfigKey("worker", "user")]
    assert [f.severity for f in finding] == ["warning"]


def test_an_explicit_worker_user_never_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _accounts(monkeypatch, "nobody")
    config = load(tmp_path, "[worker]\nuser=tlshd\n")
    assert config.worker.user == "tlshd"
    assert [(f.severity, f.key) for f in check_config(config)] == [
        ("error", ConfigKey("worker", "user"))
    ]
