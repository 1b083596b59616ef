"""Post-quantum interop on the forky image (OpenSSL 3.6, GnuTLS 3.8.13).

One boot runs guest/pq_scenario.py: ``--check-config`` of a config with
ML-DSA pairs beside the classic ones, the engine (real kTLS) against
``openssl s_client``/``s_server`` and ``gnutls-cli``/``gnutls-serv``, and an
NFS ``xprtsec=mtls`` mount with ML-DSA certificates on both ends (our daemon
both sides).  Run: ``pytest -m lab tests/lab/test_pq.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.lab.scenario_runs import results_dir, scenario_or_fail
from tests.lab.vm import GuestResult, run_guest

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]
IMAGE = "forky"
SCRIPT = "#!/bin/sh\nexec /opt/tlshd/bin/python /lab/run/pq_scenario.py\n"
HYBRID = "X25519MLKEM768"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> GuestResult:
    out = results_dir(f"pq-{IMAGE}", tmp_path_factory)
    return run_guest(SCRIPT, timeout=900, results_dir=out, image=IMAGE)


@pytest.fixture(scope="module")
def sc(run: GuestResult) -> dict[str, Any]:
    return scenario_or_fail(run, "pq")


def test_check_config_accepts_the_pq_pairs(sc: dict[str, Any]) -> None:
    assert sc["check_config"]["rc"] == 0, sc["check_config"]["output"]


def test_server_with_openssl_3_6(sc: dict[str, Any]) -> None:
    r = sc["server_vs_openssl"]
    assert r["status"] == 0, r
    assert r["group"] == HYBRID, r
    assert "mldsa" in r["peer_output"].lower().replace("-", ""), r["peer_output"]


def test_client_with_openssl_3_6(sc: dict[str, Any]) -> None:
    r = sc["client_vs_openssl"]
    assert r["status"] == 0, r  # verified the ML-DSA server chain
    assert r["group"] == HYBRID, r


# GnuTLS 3.8.13 as Debian forky builds it has neither ML-DSA nor, by default,
# the ML-KEM hybrid (measured 2026-11-29): these tests pin that down, so that
# a GnuTLS that gains them shows up here and the docs get updated.
CLASSIC_GROUPS = {"x25519", "secp256r1"}


def test_server_with_gnutls_gives_it_the_classic_certificate(sc: dict[str, Any]) -> None:
    """gnutls-cli without ML-DSA signature schemes: classic certificate, status 0."""
    r = sc["server_vs_gnutls_classic"]
    assert r["status"] == 0, r
    assert r["group"] in CLASSIC_GROUPS, r
    assert "ECDSA-SECP256R1-SHA256" in r["peer_output"], r["peer_output"]


def test_client_with_gnutls(sc: dict[str, Any]) -> None:
    r = sc["client_vs_gnutls_classic"]
    assert r["status"] == 0, r
    assert r["group"] in CLASSIC_GROUPS, r


def test_gnutls_3_8_13_offers_ml_dsa_it_cannot_verify(sc: dict[str, Any]) -> None:
    """With its default priority gnutls-cli lists ML-DSA in signature_algorithms,
    is given the ML-DSA certificate, and fails to verify it; gnutls-serv cannot
    load one at all.  Hence the warning in docs/configuration.md (x509.pq.*)."""
    r = sc["server_vs_gnutls"]
    assert r["status"] != 0, r
    assert "signature verification has failed" in r["peer_output"], r["peer_output"]
    serv = sc["client_vs_gnutls"]
    assert "signature algorithm is not supported" in serv.get("error", ""), serv


def test_nfs_mtls_mount_with_ml_dsa_on_both_ends(sc: dict[str, Any]) -> None:
    m = sc["nfs_mtls"]
    assert m["ok"], m
    lines = sc["peer_cert_log"]
    assert any("ML-DSA server" in ln and "MLDSA65PublicKey" in ln for ln in lines), lines
    assert any("ML-DSA client" in ln and "MLDSA65PublicKey" in ln for ln in lines), lines
