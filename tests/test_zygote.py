"""workers/zygote.py: the warm-ups the zygote runs before it forks workers."""

from __future__ import annotations

import logging

import pytest
from tlshd.supervisor.pool import Generation
from tlshd.workers.engine import perform_handshake
from tlshd.workers.zygote import warm_up_engine, warm_up_tls

from tests.peers import Pki
from tlshd import openssl_conf
from tlshd.config import Config
from tlshd.credentials import Credentials, RoleCredentials


def test_tls_warm_up_completes_a_handshake_in_memory() -> None:
    warm_up_tls()  # raises on failure; logs only if the handshake did not finish


def test_engine_warm_up_runs_both_roles_to_the_end(pki: Pki) -> None:
    server = RoleCredentials(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem)
    generation = Generation(1, Config(), Credentials(server=server), None)
    assert warm_up_engine(perform_handshake, generation)


def test_engine_warm_up_needs_a_server_certificate() -> None:
    generation = Generation(1, Config(), Credentials(), None)
    assert not warm_up_engine(perform_handshake, generation)


def test_ignored_openssl_config_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The NumTickets probe runs in the zygote now; its warning still reaches the log."""
    logger = logging.getLogger("tlshd")
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.WARNING, logger="tlshd")
    monkeypatch.setattr(openssl_conf, "tickets_disabled", lambda: False)
    openssl_conf.warn_if_tickets_enabled()
    assert "OpenSSL did not apply OPENSSL_CONF" in caplog.text
    caplog.clear()
    monkeypatch.setattr(openssl_conf, "tickets_disabled", lambda: True)
    openssl_conf.warn_if_tickets_enabled()
    assert caplog.text == ""
