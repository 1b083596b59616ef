"""Contexts prepared once per generation (workers/contexts.py), against real OpenSSL peers.

A prepared context serves the first handshake of a process and never a
second; the outcomes (cipher, verification, remote_auth, failures) are those
of a context built for the handshake; a fork gets its own copy, as each
single-use worker forked from the zygote does.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from tlshd.workers import contexts
from tlshd.workers.contexts import PreparedContext, Shape
from tlshd.workers.engine import HandshakeContext, perform_handshake

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import running_daemon
from tests.helpers.engines import accept_ktls
from tests.helpers.forked import run_in_child
from tests.peers import (
    FakeKeys,
    Pki,
    engine_context,
    loopback_listener,
    openssl_client,
    openssl_server,
)
from tests.test_engine_x509 import (
    SUITES,
    client_params,
    echo_through_reversing_server,
    s_server_args,
    server_params,
)
from tlshd.credentials import Credentials, RoleCredentials
from tlshd.ipc import X509_SERVER_PEER_ID
from tlshd.params import HandshakeResult
from tlshd.uapi import AuthMode, MsgType

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def prepared(monkeypatch: pytest.MonkeyPatch) -> dict[Shape, PreparedContext]:
    """This test's own table of prepared contexts, empty at the start."""
    table: dict[Shape, PreparedContext] = {}
    monkeypatch.setattr(contexts, "_prepared", table)
    return table


def server_handshake(
    pki: Pki, log_path: Path, ctx: HandshakeContext, client_args: list[str]
) -> tuple[HandshakeResult, str]:
    """Our server role against `openssl s_client`; (result, s_client's output)."""
    with loopback_listener() as listener, openssl_client(client_args, log_path, listener) as peer:
        result = perform_handshake(peer.sock, server_params(peer.sock), ctx)
        peer.sock.close()  # what the kernel consumer does after DONE
        peer.sock = None
        output = peer.wait_output("alert") if result.status else peer.output()
    return result, output


def client_handshake(
    pki: Pki, log_path: Path, ctx: HandshakeContext, peername: str = "localhost", **kw: object
) -> HandshakeResult:
    """Our client role against `openssl s_server -rev`; echoes data on success."""
    issued = kw.pop("issued", pki.server)
    extra = kw.pop("server_args", [])
    args = s_server_args(pki, SUITES[1], *extra, issued=issued)  # type: ignore[arg-type]
    with openssl_server(args, log_path) as peer:
        result = perform_handshake(peer.sock, client_params(peer.sock, peername, **kw), ctx)
        if result.status == 0:
            echo_through_reversing_server(peer.sock, ctx.install_ktls)  # type: ignore[arg-type]
    return result


def outcome(result: HandshakeResult) -> tuple[int, str | None, tuple[int, ...]]:
    return result.status, result.cipher if result.status == 0 else None, result.remote_auth


# ------------------------------------------------------------------ take once


def test_only_shapes_whose_material_loads_are_prepared(pki: Pki) -> None:
    with_cert = RoleCredentials(pki.client.cert_pem, pki.client.key_pem, pki.ca.cert_pem)
    assert set(contexts.prepare_contexts(Credentials(client=with_cert))) == {
        Shape.CLIENT_UNAUTH,
        Shape.CLIENT_X509,
    }  # no server certificate configured
    broken_key = RoleCredentials(pki.server.cert_pem, pki.other_server.key_pem, pki.ca.cert_pem)
    bad_trust = RoleCredentials(truststore_pem=b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    creds = Credentials(client=bad_trust, server=broken_key)
    assert contexts.prepare_contexts(creds) == ()
    assert contexts.prepared_shapes() == ()  # the earlier preparation is gone too


def test_server_prepared_context_serves_the_first_handshake_only(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    ctx, _capture, _ = engine_context(pki)
    contexts.prepare_contexts(ctx.credentials)
    entry = prepared[Shape.SERVER_X509]
    assert entry.state.secrets == {}
    args = ["-CAfile", str(pki.ca.cert_path)]
    first, _ = server_handshake(pki, tmp_path / "c1.log", ctx, args)
    assert first.status == 0, first.detail
    # the prepared context's callbacks fed its own TlsState with this handshake
    assert len(entry.state.secrets) == 2
    assert Shape.SERVER_X509 not in contexts.prepared_shapes()
    secrets_of_first = dict(entry.state.secrets)
    ctx2, _capture2, _ = engine_context(pki)
    second, _ = server_handshake(pki, tmp_path / "c2.log", ctx2, args)
    assert second.status == 0, second.detail
    assert entry.state.secrets == secrets_of_first  # a fresh context served the second


def test_client_prepared_context_serves_the_first_handshake_only(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    ctx, _capture, _ = engine_context(pki)
    contexts.prepare_contexts(ctx.credentials)
    entry = prepared[Shape.CLIENT_UNAUTH]
    first = client_handshake(pki, tmp_path / "s1.log", ctx)
    assert first.status == 0, first.detail
    assert len(entry.state.secrets) == 2
    assert entry.state.alerts_received == []
    secrets_of_first = dict(entry.state.secrets)
    ctx2, _capture2, _ = engine_context(pki)
    second = client_handshake(pki, tmp_path / "s2.log", ctx2)
    assert second.status == 0, second.detail
    assert entry.state.secrets == secrets_of_first
    # the server role's entry was not touched by client handshakes
    assert Shape.SERVER_X509 in contexts.prepared_shapes()
    assert prepared[Shape.SERVER_X509].state.secrets == {}


def test_credentials_other_than_the_prepared_ones_get_a_fresh_context(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    """A prepared context is for its generation's credentials only."""
    contexts.prepare_contexts(Credentials(client=RoleCredentials()))  # the system store
    entry = prepared[Shape.CLIENT_UNAUTH]
    ctx, _capture, _ = engine_context(pki)  # trusts the test CA
    result = client_handshake(pki, tmp_path / "s.log", ctx)
    assert result.status == 0, result.detail
    assert entry.state.secrets == {}


def test_a_fork_takes_its_own_copy(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    """As single-use workers forked from the zygote: each child uses the
    prepared context once, and the parent's copy stays pristine."""
    ctx, _capture, _ = engine_context(pki)
    contexts.prepare_contexts(ctx.credentials)
    entry = prepared[Shape.SERVER_X509]
    for round_ in range(2):
        with loopback_listener() as listener:
            log_path = tmp_path / f"c{round_}.log"
            with openssl_client(["-CAfile", str(pki.ca.cert_path)], log_path, listener) as peer:
                report = _in_child(lambda: _child_server_handshake(peer.sock, ctx, entry))
                peer.sock.close()
                peer.sock = None
        assert report == {"status": 0, "took_prepared": True, "still_prepared": False}
    assert entry.state.secrets == {}
    assert Shape.SERVER_X509 in contexts.prepared_shapes()


def _child_server_handshake(
    sock: socket.socket, ctx: HandshakeContext, entry: PreparedContext
) -> dict[str, object]:
    result = perform_handshake(sock, server_params(sock), ctx)
    return {
        "status": result.status,
        "took_prepared": len(entry.state.secrets) == 2,
        "still_prepared": Shape.SERVER_X509 in contexts.prepared_shapes(),
    }


def _in_child(job: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run `job` in a forked child; its JSON report."""
    return json.loads(run_in_child(lambda: json.dumps(job()).encode()))  # type: ignore[no-any-return]


# ----------------------------------------------- same outcome, prepared or not


def _run_both_ways(
    pki: Pki,
    tmp_path: Path,
    prepared: dict[Shape, PreparedContext],
    shape: Shape,
    run: Callable[[Path, HandshakeContext], HandshakeResult],
    **engine_kw: object,
) -> HandshakeResult:
    """`run` once with a prepared context, once without; the outcomes must agree."""
    results = []
    for with_prepared in (True, False):
        ctx, _capture, _ = engine_context(pki, **engine_kw)  # type: ignore[arg-type]
        prepared.clear()
        if with_prepared:
            assert shape in contexts.prepare_contexts(ctx.credentials)
        state_before = prepared.get(shape)
        result = run(tmp_path / f"{'prepared' if with_prepared else 'fresh'}.log", ctx)
        if with_prepared:
            assert state_before is not None
            assert shape not in contexts.prepared_shapes(), "the prepared context was not used"
        results.append(result)
    assert outcome(results[0]) == outcome(results[1])
    assert results[0].detail == results[1].detail
    return results[0]


@pytest.mark.parametrize(
    ("case", "peername", "expected"),
    [
        ("good", "localhost", ""),
        ("wrong-hostname", "wrong.example", "hostname mismatch"),
        ("wrong-ip", "127.0.0.2", "IP address mismatch"),
        ("unknown-ca", "localhost", "local issuer"),
        ("revoked", "localhost", "revoked"),
        ("system-store", "localhost", "local issuer"),
    ],
)
def test_client_unauth_outcomes_match(
    pki: Pki,
    tmp_path: Path,
    prepared: dict[Shape, PreparedContext],
    case: str,
    peername: str,
    expected: str,
) -> None:
    issued = {"unknown-ca": pki.other_server, "revoked": pki.revoked}.get(case, pki.server)
    trust = RoleCredentials(truststore_pem=pki.ca.cert_pem, crl_pem=pki.crl_pem)
    if case == "system-store":
        trust = RoleCredentials()  # the test CA is not in the system store

    def run(log_path: Path, ctx: HandshakeContext) -> HandshakeResult:
        return client_handshake(pki, log_path, ctx, peername, issued=issued)

    result = _run_both_ways(pki, tmp_path, prepared, Shape.CLIENT_UNAUTH, run, client=trust)
    if case == "good":
        assert result.status == 0 and result.cipher == SUITES[1]
    else:
        assert result.status == errno.EACCES
        assert expected in result.detail


def test_client_x509_mutual_outcome_matches(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    client = RoleCredentials(pki.client.cert_pem, pki.client.key_pem, pki.ca.cert_pem)
    verify_client = ["-Verify", "1", "-CAfile", str(pki.ca.cert_path)]

    def run(log_path: Path, ctx: HandshakeContext) -> HandshakeResult:
        return client_handshake(
            pki, log_path, ctx, auth_mode=AuthMode.X509, server_args=verify_client
        )

    result = _run_both_ways(pki, tmp_path, prepared, Shape.CLIENT_X509, run, client=client)
    assert result.status == 0, result.detail
    assert len(result.remote_auth) == 2  # leaf and CA, added to the keyring


def test_client_x509_accept_certificate_is_not_the_prepared_one(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    """ACCEPT's keyring certificate overrides the configured one, which the
    server would reject: only a context built for the request can succeed."""
    keys = FakeKeys()
    serials = {
        "cert_serial": keys.add("client cert", pki.client.cert_der),
        "privkey_serial": keys.add("client key", pki.client.key_der),
    }
    configured = RoleCredentials(
        pki.other_client.cert_pem, pki.other_client.key_pem, pki.ca.cert_pem
    )
    ctx, _capture, _ = engine_context(pki, keys=keys, client=configured)
    assert Shape.CLIENT_X509 in contexts.prepare_contexts(ctx.credentials)
    result = client_handshake(
        pki,
        tmp_path / "s.log",
        ctx,
        auth_mode=AuthMode.X509,
        server_args=["-Verify", "1", "-verify_return_error", "-CAfile", str(pki.ca.cert_path)],
        **serials,
    )
    assert result.status == 0, result.detail
    assert Shape.CLIENT_X509 in contexts.prepared_shapes()  # left for the configured case


@pytest.mark.parametrize("client_cert", ["none", "valid", "unknown-ca"])
def test_server_outcomes_match(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext], client_cert: str
) -> None:
    args = ["-CAfile", str(pki.ca.cert_path)]
    issued = {"valid": pki.client, "unknown-ca": pki.other_client}.get(client_cert)
    if issued is not None:
        args += ["-cert", str(issued.cert_path), "-key", str(issued.key_path)]
    outputs: list[str] = []

    def run(log_path: Path, ctx: HandshakeContext) -> HandshakeResult:
        result, output = server_handshake(pki, log_path, ctx, args)
        outputs.append(output)
        return result

    result = _run_both_ways(pki, tmp_path, prepared, Shape.SERVER_X509, run)
    if client_cert == "unknown-ca":
        assert result.status == errno.EACCES
        assert all("access denied" in output for output in outputs), outputs
    else:
        assert result.status == 0, result.detail
        expected = (X509_SERVER_PEER_ID,) * 2 if client_cert == "valid" else ()
        assert result.remote_auth == expected


def test_server_without_loadable_certificate_fails_as_before(
    pki: Pki, tmp_path: Path, prepared: dict[Shape, PreparedContext]
) -> None:
    """Nothing is prepared for a role whose key does not match its certificate;
    its handshakes still fail with EIO and an access_denied alert."""
    broken = RoleCredentials(pki.server.cert_pem, pki.other_server.key_pem, pki.ca.cert_pem)
    ctx, _capture, _ = engine_context(pki, server=broken)
    assert Shape.SERVER_X509 not in contexts.prepare_contexts(ctx.credentials)
    result, output = server_handshake(
        pki, tmp_path / "c.log", ctx, ["-CAfile", str(pki.ca.cert_path)]
    )
    assert result.status == errno.EIO
    assert "certificate and private key unusable" in result.detail
    assert "access denied" in output, output


# ------------------------------------------------------- through the zygote


def test_each_worker_takes_the_zygotes_prepared_context(
    pki: Pki, tmp_path: Path, openssl_bin: str
) -> None:
    """Fake kernel, real supervisor, zygote and workers: the zygote prepares
    the contexts, and every worker's handshake runs on its own copy."""
    credentials = Credentials(client=RoleCredentials(truststore_pem=pki.ca.cert_pem))
    with (
        FakeKernel() as kernel,
        running_daemon(
            kernel, perform_handshake, credentials=credentials, install_ktls=accept_ktls
        ) as daemon,
    ):
        for round_ in range(2):
            args = s_server_args(pki, SUITES[0])
            with openssl_server(args, tmp_path / f"s_server{round_}.log") as peer:
                request = kernel.submit(
                    peer.sock, MsgType.CLIENTHELLO, AuthMode.UNAUTH, peername="localhost"
                )
                assert request.wait_done(30) == (0, ())
        daemon.wait_for_log(f"succeeded, cipher {SUITES[0]}")
        prepared_lines = [
            line
            for line in daemon.log().splitlines()
            if "client unauthenticated context prepared by the zygote" in line
        ]
    assert len(prepared_lines) == 2, daemon.log()
    worker_pids = {line.split()[0] for line in prepared_lines}
    assert len(worker_pids) == 2  # single-use workers: one handshake each
