"""Hostile configuration and credential files (issue 11 #9).

A certificate path that is a FIFO used to block the supervisor in open(), a
/dev/zero path ended in MemoryError, and a 50 MB config of repeated keys took
23 s and 2.5 GB.  Each is now refused at once, a reload keeps the old
configuration, and --check-config says it in a few lines.  A private key
readable by others is warned about at start and on reload.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import config_text, running_daemon, short_tmpdir
from tests.helpers.engines import Peer, gated_engine
from tests.peers import Pki
from tlshd.config import MAX_CONFIG_BYTES, MAX_CONFIG_WARNINGS, ConfigError, load_config
from tlshd.credentials import CredentialsError, load_credentials

pytestmark = pytest.mark.timeout(60)


def fifo(directory: Path) -> Path:
    path = directory / "cert.fifo"
    os.mkfifo(path)
    return path


def server_config(directory: Path, pki: Pki, **paths: object) -> Path:
    keys = {"x509.certificate": pki.server.cert_path, "x509.private_key": pki.server.key_path}
    keys.update({k.replace("x509_", "x509."): v for k, v in paths.items()})
    body = "".join(f"{k}={v}\n" for k, v in keys.items())
    path = directory / "config"
    path.write_text(f"[worker]\nuser=nobody\n[authenticate.server]\n{body}")
    return path


@pytest.mark.timeout(10)  # a blocking open() would hang here
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_credential_path_that_is_no_regular_file_is_refused(
    pki: Pki, tmp_path: Path, kind: str
) -> None:
    target = {"fifo": lambda: fifo(tmp_path), "dev-zero": lambda: "/dev/zero"}.get(
        kind, lambda: tmp_path
    )()
    config = load_config(str(server_config(tmp_path, pki, x509_certificate=target)))
    with pytest.raises(CredentialsError, match=r"is (not a regular file|a directory)"):
        load_credentials(config)


@pytest.mark.timeout(10)
def test_config_path_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(fifo(tmp_path)))


def test_oversized_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config"
    line = b"loglevel=1\n"
    path.write_bytes(b"[debug]\n" + line * (2 * MAX_CONFIG_BYTES // len(line)))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(str(path))


def test_thousands_of_repeated_keys_give_a_few_warnings(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("[worker]\nuser=nobody\n[debug]\n" + "loglevel=1\nodd=1\n" * 20000)
    config = load_config(str(path))
    assert len(config.warnings) == MAX_CONFIG_WARNINGS
    assert config.warnings[-1].message.endswith("more warnings not shown")
    proc = subprocess.run(
        [sys.executable, "-m", "tlshd", "--check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) <= MAX_CONFIG_WARNINGS + 1


def test_private_key_readable_by_others_is_warned_at_load(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "exposed.key"
    key.write_bytes(pki.server.key_path.read_bytes())
    key.chmod(0o644)
    config = load_config(str(server_config(tmp_path, pki, x509_private_key=key)))
    logger = logging.getLogger("tlshd")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        load_credentials(config)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert f"{key}: [authenticate.server] x509.private_key: mode 0644 lets group/other read " in (
        "".join(messages)
    )


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "exposed-key"])
def test_reload_keeps_the_old_config_and_never_blocks(pki: Pki, kind: str) -> None:
    directory = short_tmpdir()
    status = directory / "status.sock"
    base = config_text(status, timeout_ms=4000)
    with (
        FakeKernel() as kernel,
        running_daemon(kernel, gated_engine, config=base, directory=directory) as daemon,
    ):
        key = pki.server.key_path
        cert: object = pki.server.cert_path
        if kind == "fifo":
            cert = fifo(directory)
        elif kind == "dev-zero":
            cert = "/dev/zero"
        else:
            key = directory / "exposed.key"
            key.write_bytes(pki.server.key_path.read_bytes())
            key.chmod(0o640)
        daemon.config_path.write_text(
            config_text(status, timeout_ms=4100)
            + f"[authenticate.server]\nx509.certificate={cert}\nx509.private_key={key}\n"
        )
        daemon.signal(signal.SIGHUP)
        if kind == "exposed-key":
            daemon.wait_for(lambda d: d["generation"] == 2, what="generation 2")
            daemon.wait_for_log("mode 0640 lets group/other read the key")
            expected = b"4100\n"
        else:
            daemon.wait_for_log("reload failed; keeping the current configuration", timeout=10)
            assert "is not a regular file" in daemon.log()
            expected = b"4000\n"
        peer = Peer(kernel)  # the loop still serves, on the config it kept
        assert peer.release() == expected
        assert peer.request.wait_done(10) == (0, ())
        peer.close()
        assert daemon.exit_code is None
