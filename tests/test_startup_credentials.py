"""Start-up without cryptography in the supervisor: it reads the configured PEM
files, and the zygote parses them (tlshd/pemfiles.py, workers/zygote.py)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import config_text, running_daemon, short_tmpdir, start_daemon
from tests.helpers.engines import Peer, fake_ktls
from tests.peers import Pki
from tlshd.params import HandshakeParams, HandshakeResult


def test_the_supervisors_modules_load_neither_openssl_nor_cryptography() -> None:
    code = (
        "import sys\n"
        "import tlshd.cli, tlshd.pemfiles, tlshd.supervisor.arbiter, tlshd.supervisor.tlsmodule\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "loaded = sorted(roots & {'OpenSSL', 'cryptography'})\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def server_config(directory: Path, certificate: Path, private_key: Path) -> str:
    return config_text(
        directory / "status.sock",
        extra=(
            f"[authenticate.server]\nx509.certificate={certificate}\n"
            f"x509.private_key={private_key}\n"
        ),
    )


def credentials_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Succeeds only if the worker holds the server certificate the zygote parsed."""
    chain = ctx.credentials.server.cert_chain_pem
    if not (chain and chain.startswith(b"-----BEGIN CERTIFICATE-----")):
        return HandshakeResult(status=errno.ENOKEY, detail=f"no parsed certificate: {chain!r}")
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE-CIPHER")


def test_the_zygote_parses_the_files_the_supervisor_read(kernel: FakeKernel, pki: Pki) -> None:
    directory = short_tmpdir()
    config = server_config(directory, pki.server.cert_path, pki.server.key_path)
    with running_daemon(
        kernel, credentials_engine, config=config, directory=directory, read_pem_files=True
    ):
        peer = Peer(kernel)
        assert peer.request.wait_done(20) == (0, ())


def test_the_zygote_forked_before_the_arbiter_serves_generation_1(
    kernel: FakeKernel, pki: Pki
) -> None:
    directory = short_tmpdir()
    config = server_config(directory, pki.server.cert_path, pki.server.key_path)
    with running_daemon(
        kernel, credentials_engine, config=config, directory=directory, first_zygote=True
    ) as daemon:
        assert Peer(kernel).request.wait_done(20) == (0, ())
        status = daemon.wait_for(
            lambda d: any(w["pid"] and w["state"] == "idle" for w in d["workers"]),
            what="a spare worker",
        )
        (zygote,) = status["zygotes"]
        assert zygote["generation"] == 1 and zygote["state"] == "ready"
        # Its workers are its children: it was not replaced by a second fork.
        spare_pids = [w["pid"] for w in status["workers"] if w["pid"] and w["state"] == "idle"]
        assert all(psutil.Process(pid).ppid() == zygote["pid"] for pid in spare_pids)
        assert daemon.log().count("spawned zygote") == 1


def caps_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Succeeds only if this worker inherited "the kernel caps TX records"."""
    from tlshd.workers import kernelcaps

    if not kernelcaps.caps_tx_records():
        return HandshakeResult(status=errno.EOPNOTSUPP, detail="no kernel caps inherited")
    fake_ktls(sock, ctx)
    return HandshakeResult(status=0, cipher="FAKE-CIPHER")


def record_caps_as_root() -> None:
    from tlshd.workers import kernelcaps

    # As root, like the real probe: the zygote has not dropped privileges yet.
    kernelcaps.record_caps_tx_records(os.geteuid() == 0)


def test_the_first_zygote_probes_the_kernel_for_its_workers(kernel: FakeKernel) -> None:
    # The supervisor probes the kernel after the first zygote was forked
    # (supervisor/firstzygote.py), so that zygote probes it itself.
    with running_daemon(
        kernel, caps_engine, first_zygote=True, zygote_prepare_kernel=record_caps_as_root
    ):
        assert Peer(kernel).request.wait_done(20) == (0, ())


def test_a_pem_file_that_does_not_parse_stops_the_daemon_naming_it(
    kernel: FakeKernel, pki: Pki
) -> None:
    directory = short_tmpdir()
    broken = directory / "server.pem"
    broken.write_text("this is no certificate\n")
    config = server_config(directory, broken, pki.server.key_path)
    daemon = start_daemon(
        kernel,
        credentials_engine,
        config=config,
        directory=directory,
        read_pem_files=True,
        wait_ready=False,
    )
    assert daemon.wait() == 1
    log = daemon.log()
    assert f"{broken}: [authenticate.server] x509.certificate: no PEM CERTIFICATE block" in log
    assert "serving handshakes" not in log


def test_an_unreadable_pem_file_stops_the_daemon_before_the_zygote(pki: Pki) -> None:
    directory = short_tmpdir()
    missing = directory / "missing.key"
    config = directory / "tlshd.conf"
    config.write_text(server_config(directory, pki.server.cert_path, missing))
    proc = subprocess.run(
        [sys.executable, "-m", "tlshd", "-s", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"{missing}: [authenticate.server] x509.private_key: file not found" in proc.stderr
    assert "zygote" not in proc.stderr
