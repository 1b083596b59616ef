"""End to end with the real TLS engine: fake kernel, real supervisor, real
unprivileged workers, `openssl s_server` as the remote peer."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from tlshd.supervisor.tlsmodule import tls_module_present
from tlshd.workers import ktls
from tlshd.workers.engine import perform_handshake

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import accept_ktls
from tests.peers import Pki, openssl_server
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.uapi import AuthMode, MsgType

pytestmark = [pytest.mark.peers, pytest.mark.timeout(120)]

SUITE = "TLS_AES_128_GCM_SHA256"


def server_args(pki: Pki) -> list[str]:
    return [
        "-cert",
        str(pki.server.cert_path),
        "-key",
        str(pki.server.key_path),
        "-tls1_3",
        "-ciphersuites",
        SUITE,
    ]


def client_credentials(pki: Pki) -> Credentials:
    return Credentials(client=RoleCredentials(truststore_pem=pki.ca.cert_pem))


def test_real_engine_clienthello_with_capturing_ktls(
    pki: Pki, tmp_path: Path, openssl_bin: str
) -> None:
    with (
        FakeKernel() as kernel,
        running_daemon(
            kernel, perform_handshake, credentials=client_credentials(pki), install_ktls=accept_ktls
        ) as daemon,
        openssl_server(server_args(pki), tmp_path / "s_server.log") as peer,
    ):
        request = kernel.submit(
            peer.sock, MsgType.CLIENTHELLO, AuthMode.UNAUTH, peername="localhost"
        )
        assert request.wait_done(30) == (0, ())
        daemon.wait_for_log(f"succeeded, cipher {SUITE}")
        assert "peer=localhost (127.0.0.1:" in daemon.log()


def test_real_engine_without_ktls_reports_eio(pki: Pki, tmp_path: Path, openssl_bin: str) -> None:
    if tls_module_present():
        pytest.skip("tls.ko is loaded here; the kTLS step would succeed")
    with (
        FakeKernel() as kernel,
        running_daemon(
            kernel,
            perform_handshake,
            credentials=client_credentials(pki),
            install_ktls=ktls.install_ktls,  # the real one: this kernel lacks tls.ko
        ) as daemon,
        openssl_server(server_args(pki), tmp_path / "s_server.log") as peer,
    ):
        request = kernel.submit(
            peer.sock, MsgType.CLIENTHELLO, AuthMode.UNAUTH, peername="localhost"
        )
        assert request.wait_done(30) == (errno.EIO, ())
        daemon.wait_for_log("handshake failed with EIO")
