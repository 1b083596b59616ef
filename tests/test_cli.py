"""The `tlshd` command line: exit codes, check-config, status client and rendering."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.certs import key_pem, make_key
from tests.test_credentials import Pki, write
from tlshd import cli, statusclient
from tlshd.config import Config

STATUS_DOC: dict[str, Any] = {
    "pid": 4242,
    "uptime_s": 3725.4,
    "generation": 3,
    "zygotes": [{"pid": 4245, "generation": 3, "state": "ready", "age_s": 3725.0}],
    "workers": [
        {
            "pid": 4243,
            "state": "busy",
            "peer": "nfs.example (192.0.2.7)",
            "req": 17,
            "age_s": 95.0,
        },
        {
            "pid": 4244,
            "state": "idle",
            "peer": None,
            "req": None,
            "age_s": 5,
        },
    ],
    "in_flight": 1,
    "queued": 0,
    "done": 120,
    "failed": 9,
    "counters": {"0": 111, "13": 7, "110": 2},
    "latency_ms": {
        "count": 120,
        "p50": 12.5,
        "p90": 40.0,
        "p99": 180.25,
        "max": 300.0,
        "buckets": [[10, 50], [50, 60], [250, 9], [None, 1]],
    },
    "memory": {
        "total_pss_bytes": 60 * 1024 * 1024,
        "complete": False,
        "processes": [
            {"pid": 4242, "pss_bytes": 35 * 1024 * 1024},
            {"pid": 4243, "pss_bytes": 25 * 1024 * 1024},
            {"pid": 4244, "pss_bytes": None},
        ],
    },
}


def run_tlshd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tlshd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )


# --- upstream options ---------------------------------------------------------------------


def test_help_goes_to_stderr_and_exits_0() -> None:
    proc = run_tlshd("-h")
    assert proc.returncode == 0
    assert proc.stderr.startswith("usage: tlshd [-chsv]")
    assert proc.stdout == ""


def test_version_goes_to_stdout_and_exits_0() -> None:
    proc = run_tlshd("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("tlshd 0.")
    for part in ("python tlshd", "pyOpenSSL ", "cryptography ", "OpenSSL "):
        assert part in proc.stdout


@pytest.mark.parametrize("args", [["-x"], ["--nope"], ["-c"], ["extra"], ["status", "--bogus"]])
def test_bad_usage_exits_1(args: list[str]) -> None:
    proc = run_tlshd(*args)
    assert proc.returncode == 1
    assert "usage: tlshd" in proc.stderr


def test_overlong_config_path_is_invalid() -> None:
    assert cli.main(["-c", "/" + "x" * 5000]) == 1


def test_module_import_does_not_load_openssl() -> None:
    code = (
        "import sys, tlshd.cli\n"
        "loaded = [m for m in sys.modules if m.startswith(('OpenSSL', 'cryptography'))]\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_openssl_conf_is_ensured_before_openssl_loads() -> None:
    code = (
        "import sys, tlshd.openssl_conf as o\n"
        "real = o.ensure_openssl_conf\n"
        "def spy():\n"
        "    print('ensured', o.openssl_loaded())\n"
        "    return real()\n"
        "o.ensure_openssl_conf = spy\n"
        "from tlshd.cli import main\n"
        "sys.exit(main(['-v']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ensured False\ntlshd ")


# --- run path -------------------------------------------------------------------------------


def test_bad_config_exits_1(tmp_path: Path) -> None:
    proc = run_tlshd("-s", "-c", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert f"{tmp_path}/missing: configuration file not found" in proc.stderr


def test_run_forks_the_zygote_then_hands_over_to_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config"
    path.write_text("[debug]\nloglevel=1\n[bogus]\n")
    calls: list[tuple[str, Config, object]] = []
    steps: list[str] = []
    first_zygote = object()
    fake_arbiter = types.ModuleType("tlshd.supervisor.arbiter")
    fake_arbiter.run_daemon = lambda p, c, f: calls.append((p, c, f)) or 7  # type: ignore[attr-defined]

    def fork_first_zygote(config: Config, **_kw: object) -> object:
        # The arbiter is only importable from here on: the zygote must be
        # forked before the supervisor imports its loop (supervisor/firstzygote.py).
        monkeypatch.setitem(sys.modules, "tlshd.supervisor.arbiter", fake_arbiter)
        steps.append("fork")
        return first_zygote

    fake_first = types.ModuleType("tlshd.supervisor.firstzygote")
    fake_first.fork_first_zygote = fork_first_zygote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tlshd.supervisor.firstzygote", fake_first)
    monkeypatch.delitem(sys.modules, "tlshd.supervisor.arbiter", raising=False)
    monkeypatch.setattr("tlshd.log.setup_logging", lambda **kw: None)
    # Both change the process for good: recorded here, tested in test_heap.py
    # and test_openssl_conf.py.
    monkeypatch.setattr("tlshd.heap.refuse_huge_pages", lambda: steps.append("no THP"))
    monkeypatch.setattr(
        "tlshd.openssl_conf.keep_system_libcrypto_out", lambda: steps.append("no _hashlib")
    )
    assert cli.main(["-s", "-c", str(path)]) == 7
    ((got_path, config, got_first),) = calls
    assert got_path == str(path) and got_first is first_zygote
    assert config.loglevel == 1 and config.warnings
    # Before the zygote (and the heap it shares) exists, and before it imports cryptography.
    assert steps == ["no THP", "no _hashlib", "fork"]


# --- check-config ----------------------------------------------------------------------------


def test_check_config_good_pki(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    proc = run_tlshd("--check-config", "-c", pki.config())
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == f"config OK: {tmp_path}/config\n"


def test_check_config_bad_pki(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    other = write(tmp_path / "other.key", key_pem(make_key()), 0o640)
    proc = run_tlshd("--check-config", "-c", pki.config(x509_private_key=other, extra="[x]\n"))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert f"warning: {tmp_path}/config: [x]: unknown section, ignored" in lines
    assert any(
        line.startswith(f"warning: {other}: [authenticate.server] x509.private_key: mode 0640")
        for line in lines
    )
    assert any(
        line.startswith(f"error: {other}: [authenticate.server] x509.private_key: does not match")
        for line in lines
    )
    assert "config OK" not in proc.stdout


def test_check_config_warnings_only_is_ok(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("[worker]\nuser=nobody\n[debug]\nverbose=1\n")
    proc = run_tlshd("--check-config", "-c", str(path))
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        f"warning: {path}:4: [debug] verbose: unknown key, ignored",
        f"config OK: {path}",
    ]


def test_check_config_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("[debug]\nloglevel=high\n")
    proc = run_tlshd("--check-config", "-c", str(path))
    assert proc.returncode == 1
    assert proc.stdout == f"error: {path}:2: [debug] loglevel: 'high' is not an integer\n"


# --- status ------------------------------------------------------------------------------------


class FakeStatusServer:
    """Answers each connection's request line with a canned reply, then closes."""

    def __init__(self, path: str, reply: bytes) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            request = b""
            while b"\n" not in request and (chunk := conn.recv(64)):
                request += chunk
            self.requests.append(request)
            conn.sendall(self.reply)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def status_server(tmp_path: Path) -> Iterator[FakeStatusServer]:
    server = FakeStatusServer(str(tmp_path / "status.sock"), json.dumps(STATUS_DOC).encode())
    yield server
    server.close()


def test_status_human(status_server: FakeStatusServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--socket", status_server.path]) == 0
    assert status_server.requests == [b"status\n"]
    out = capsys.readouterr().out
    assert "tlshd pid 4242, up 1h02m05s, config generation 3" in out
    assert "1 in flight, 0 queued, 120 done, 9 failed" in out
    row = next(line for line in out.splitlines() if "4243" in line)
    # the PSS column comes from the memory section
    for cell in ("busy", "nfs.example (192.0.2.7)", "17", "1m35s", "25.0 MiB"):
        assert cell in row
    assert "HANDSHAKES" not in out  # single-use workers: nothing to count per worker
    assert "zygote pid 4245 (generation 3): ready, up 1h02m05s" in out
    idle = next(line for line in out.splitlines() if "4244" in line)
    assert "idle" in idle and " - " in idle
    assert (
        "memory: 60.0 MiB PSS in 3 processes (some processes unreadable); supervisor 35.0 MiB"
        in out
    )
    assert "    0  ok" in out
    assert "   13  EACCES" in out
    assert "  110  ETIMEDOUT" in out
    assert "p50 12.5  p90 40.0  p99 180.2  max 300.0" in out
    assert "<= 50 ms       60  " + "#" * 40 in out
    assert "> last        1" in out


def test_status_json(status_server: FakeStatusServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--json", "--socket", status_server.path]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS_DOC


def test_status_socket_from_config(
    tmp_path: Path, status_server: FakeStatusServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config"
    config.write_text(f"[status]\nsocket = {status_server.path}\n")
    assert cli.main(["status", "-c", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == 4242


def test_status_no_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "none.sock")
    assert cli.main(["status", "--socket", missing]) == 1
    assert "no such socket (is tlshd running?)" in capsys.readouterr().err


def test_status_garbage_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = FakeStatusServer(str(tmp_path / "s.sock"), b"not json")
    try:
        assert cli.main(["status", "--socket", server.path]) == 1
    finally:
        server.close()
    assert "not JSON" in capsys.readouterr().err


def test_render_tolerates_sparse_document() -> None:
    text = statusclient.render_status({"pid": 1})
    assert "workers (0):" in text and "(none yet)" in text
    assert "latency (ms, 0 handshakes): p50 -" in text


def test_status_against_supervisor_status_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Contract check with the real server side, when it is present."""
    status = pytest.importorskip("tlshd.supervisor.status")
    selector = selectors.DefaultSelector()
    server = status.StatusServer(str(tmp_path / "run" / "s.sock"), selector, lambda: STATUS_DOC)
    assert server.open()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for key, events in selector.select(0.05):
                key.data(events)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        assert cli.main(["status", "--json", "--socket", server.path]) == 0
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert json.loads(capsys.readouterr().out) == STATUS_DOC
    assert not os.path.exists(server.path)


# --- option parsing (one parser for the daemon and `status`) ---------------------------------


def test_first_of_help_and_version_wins(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-h", "-v"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("usage: tlshd") and out.out == ""
    assert cli.main(["-s", "-v", "-h"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("tlshd ") and out.err == ""


def test_parse_options_names_values_and_last_repeat_wins() -> None:
    parsed = cli.parse_options(["-c", "a", "--json", "--config=b"], cli._STATUS_OPTS)
    assert parsed == {"config": "b", "json": True}
    with pytest.raises(cli.UsageError, match="unexpected argument 'x'"):
        cli.parse_options(["x"], cli._DAEMON_OPTS)
    with pytest.raises(cli.UsageError):
        cli.parse_options(["--json"], cli._DAEMON_OPTS)  # a status option only


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-sc", "f"], {"stderr": True, "config": "f"}),
        (["-cf"], {"config": "f"}),
        (["--conf", "f", "--std"], {"config": "f", "stderr": True}),
        (["--config=", "-s"], {"config": "", "stderr": True}),
        (["-s", "--"], {"stderr": True}),
        (["-c", "-s"], {"config": "-s"}),
    ],
)
def test_parse_options_gnu_forms(args: list[str], expected: dict[str, object]) -> None:
    assert cli.parse_options(args, cli._DAEMON_OPTS) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "option -x not recognized"),
        (["-c"], "option -c requires argument"),
        (["--config"], "option --config requires argument"),
        (["--help=yes"], "option --help must not have an argument"),
        (["--c"], "option --c not a unique prefix"),
        (["--nope"], "option --nope not recognized"),
        (["--", "x"], "unexpected argument 'x'"),
        (["-"], "unexpected argument '-'"),
    ],
)
def test_parse_options_errors_name_the_option(args: list[str], message: str) -> None:
    with pytest.raises(cli.UsageError) as err:
        cli.parse_options(args, cli._DAEMON_OPTS)
    assert str(err.value) == message


def test_cli_import_stays_off_gettext() -> None:
    # getopt/argparse import gettext: 0.15 s of start-up under emulation (benchmarks/README.md).
    # platform: keyring reads os.uname() instead (45 ms under emulation).
    code = (
        "import sys, tlshd.cli\nprint(sorted({'gettext', 'json', 'platform'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_status_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--help"]) == 0
    assert "tlshd status [--json]" in capsys.readouterr().err


def test_render_tolerates_mistyped_memory_and_pids() -> None:
    doc = {
        "pid": [1],
        "workers": [{"pid": {"x": 1}}, "junk"],
        "memory": {"processes": [{"pid": [2], "pss_bytes": 5}, 7], "total_pss_bytes": "x"},
    }
    text = statusclient.render_status(doc)
    assert "memory: - PSS in 2 processes; supervisor -" in text
    assert "workers (2):" in text


def test_status_and_install_files_leave_openssl_alone(tmp_path: Path) -> None:
    """Neither loads OpenSSL, so neither writes a private OpenSSL file."""
    code = (
        "import os, sys\n"
        "from tlshd.cli import main\n"
        f"main(['status', '--socket', {str(tmp_path / 'none.sock')!r}])\n"
        f"main(['install-files', '--root', {str(tmp_path / 'root')!r}])\n"
        "loaded = [m for m in sys.modules if m.startswith(('OpenSSL', 'cryptography'))]\n"
        "print(os.environ.get('OPENSSL_CONF'), loaded)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "TLSHD_OPENSSL_CONF")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.stdout.splitlines()[-1] == "None []", proc.stdout + proc.stderr
    assert (tmp_path / "root/etc/systemd/system/tlshd.service").is_file()
