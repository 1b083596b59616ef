"""tlshd/openssl_conf.py and tlshd/selfcheck.py: start-up guarantees of the engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlshd import openssl_conf, selfcheck

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FILES = ["engine.py", "tlsctx.py", "psk.py", "verify.py", "ktls.py"]


def test_conftest_applied_our_config() -> None:
    path = os.environ["OPENSSL_CONF"]
    assert os.environ[openssl_conf.MARKER_VAR] == path
    text = Path(path).read_text()
    assert re.search(r"^NumTickets = 0$", text, re.M)
    assert oct(Path(path).stat().st_mode & 0o777) == oct(0o600)
    assert openssl_conf.ensure_openssl_conf() == path  # idempotent


def test_tickets_disabled_in_this_process() -> None:
    assert openssl_conf.tickets_disabled()


def _run(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def _clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", openssl_conf.MARKER_VAR)
    }


@pytest.mark.parametrize(("order", "expected"), [("conf-first", "True"), ("import-first", "False")])
def test_config_must_precede_openssl_import(order: str, expected: str) -> None:
    """The probe can fail: importing OpenSSL first leaves OpenSSL's 2 tickets on."""
    steps = ["ensure_openssl_conf()", "import OpenSSL"]
    if order == "import-first":
        steps.reverse()
    code = f"""
        from tlshd.openssl_conf import ensure_openssl_conf, tickets_disabled
        {steps[0]}
        {steps[1]}
        print(tickets_disabled())
    """
    assert _run(code, _clean_env()) == expected


@pytest.mark.peers
def test_engine_counts_tickets_when_config_did_not_apply(tmp_path: Path) -> None:
    """Without NumTickets=0 OpenSSL's server writes 2 tickets in do_handshake; the
    msg-callback counter must then become the TX sequence number, or the real
    peer would reject our first record."""
    code = f"""
        import OpenSSL  # initialise OpenSSL before any config: tickets stay on
        from pathlib import Path
        from tests.ktls_oracle import RecordLayer, read_application_data
        from tests.peers import engine_context, loopback_listener, make_pki, openssl_client
        from tlshd.params import HandshakeParams
        from tlshd.workers.engine import perform_handshake

        tmp = Path({str(tmp_path)!r})
        pki = make_pki(tmp)
        listener = loopback_listener()
        args = ["-quiet", "-CAfile", str(pki.ca.cert_path)]
        with openssl_client(args, tmp / "c.log", listener) as peer:
            ctx, capture, _ = engine_context(pki)
            params = HandshakeParams(sockfd=peer.sock.fileno(), message_type=2, auth_mode=3)
            result = perform_handshake(peer.sock, params, ctx)
            assert result.status == 0, result.detail
            tx, rx = (RecordLayer(x) for x in capture.calls[0])
            peer.sock.sendall(tx.seal(b"after two tickets\\n"))
            peer.wait_output("after two tickets")
            print(tx.info.seq)
    """
    assert _run(code, _clean_env()) == "2"


def test_check_bindings_complete_here() -> None:
    assert selfcheck.check_bindings() == []


def test_required_bindings_cover_the_engine() -> None:
    used: set[str] = set()
    for name in ENGINE_FILES:
        source = (ROOT / "workers" / name).read_text()
        used |= set(re.findall(r"\blib\.(\w+)", source))
    assert used, "the grep found nothing: file layout changed?"
    assert used <= set(selfcheck.REQUIRED_BINDINGS), used - set(selfcheck.REQUIRED_BINDINGS)


def test_require_bindings_names_missing_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        selfcheck, "REQUIRED_BINDINGS", (*selfcheck.REQUIRED_BINDINGS, "SSL_no_such_binding")
    )
    assert selfcheck.check_bindings() == ["SSL_no_such_binding"]
    with pytest.raises(SystemExit) as info:
        selfcheck.require_bindings()
    message = str(info.value.code)
    assert "SSL_no_such_binding" in message
    assert "pyOpenSSL" in message and "cryptography" in message
    assert re.search(r"pyOpenSSL \d+\.\d+", message)


def test_require_bindings_passes_here() -> None:
    selfcheck.require_bindings()
