"""tlshd/openssl_conf.py: the system OpenSSL configuration stays in force; we add NumTickets = 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tlshd import openssl_conf

ROOT = Path(__file__).resolve().parent.parent
MARKER_SUITE = "TLS_CHACHA20_POLY1305_SHA256"  # the only TLS 1.3 suite the "admin" allows

# Debian's shape: the SSL defaults chained from the init section.
DEBIAN_LIKE = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_module
[ssl_module]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = {suite}
NumTickets = 3
"""
# RHEL's shape: system_default's body is an included crypto-policy file.
RHEL_LIKE = """\
openssl_conf = default_modules
[ default_modules ]
ssl_conf = ssl_module
[ ssl_module ]
system_default = crypto_policy
[ crypto_policy ]
.include = {policy}
"""
POLICY = "Ciphersuites = {suite}\nNumTickets = 3\n"
# Providers only: no SSL section of its own (ours is chained to its init section).
INIT_ONLY = """\
openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
default = default_sect
[default_sect]
activate = 1
"""

PROBE = """
    import json, os
    {ensure}
    from OpenSSL import SSL
    from tlshd.openssl_conf import tickets_disabled
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD))
    suites = [c for c in conn.get_cipher_list() if c.startswith("TLS_")]
    print(json.dumps({{"suites": suites, "no_tickets": tickets_disabled(),
                      "conf": open(os.environ["OPENSSL_CONF"]).read()}}))
"""


def _probe(admin_conf: Path | None, ensure: bool = True) -> dict:
    """A fresh process as the daemon starts: the admin's $OPENSSL_CONF, then ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "TLSHD_OPENSSL_CONF")}
    if admin_conf is not None:
        env["OPENSSL_CONF"] = str(admin_conf)
    env["PYTHONPATH"] = str(ROOT)
    code = textwrap.dedent(
        PROBE.format(
            ensure="from tlshd.openssl_conf import ensure_openssl_conf; ensure_openssl_conf()"
            if ensure
            else ""
        )
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _write_admin_conf(tmp_path: Path, shape: str) -> Path:
    policy = tmp_path / "policy.config"
    policy.write_text(POLICY.format(suite=MARKER_SUITE))
    conf = tmp_path / "openssl.cnf"
    conf.write_text(shape.format(suite=MARKER_SUITE, policy=policy))
    return conf


@pytest.mark.parametrize("shape", [DEBIAN_LIKE, RHEL_LIKE], ids=["debian", "rhel"])
def test_admin_settings_stay_and_tickets_go(tmp_path: Path, shape: str) -> None:
    conf = _write_admin_conf(tmp_path, shape)
    without_us = _probe(conf, ensure=False)
    # the admin's file alone: their suite list, and their 3 tickets
    assert without_us["suites"] == [MARKER_SUITE] and not without_us["no_tickets"]
    with_us = _probe(conf)
    assert with_us["suites"] == [MARKER_SUITE], with_us["conf"]
    assert with_us["no_tickets"], with_us["conf"]
    assert f".include {conf}\n" in with_us["conf"]


def test_init_section_without_ssl_defaults_gets_ours(tmp_path: Path) -> None:
    conf = tmp_path / "openssl.cnf"
    conf.write_text(INIT_ONLY)
    result = _probe(conf)
    assert result["no_tickets"], result["conf"]
    assert len(result["suites"]) == 3  # OpenSSL's defaults: nothing else changed
    assert "[openssl_init]\nssl_conf = tlshd_ssl_module" in result["conf"]


def test_without_a_system_file_ours_stands_alone() -> None:
    text = openssl_conf.conf_text(None)
    assert ".include" not in text and "NumTickets = 0" in text


def test_a_missing_admin_file_is_not_included(tmp_path: Path) -> None:
    env = {"OPENSSL_CONF": str(tmp_path / "missing.cnf")}
    assert openssl_conf.system_openssl_conf(env) is None
    env = {"OPENSSL_CONF": "/run/x/openssl.cnf", "TLSHD_OPENSSL_CONF": "/run/x/openssl.cnf"}
    assert openssl_conf.system_openssl_conf(env) != "/run/x/openssl.cnf"  # ours, not the admin's


def test_openssldir_is_read_from_the_binary_without_loading_it(tmp_path: Path) -> None:
    fake = tmp_path / "_rust.abi3.so"
    fake.write_bytes(b"\x7fELF" + b"\0" * 100 + b'OPENSSLDIR: "/etc/pki/tls"\0more')
    assert openssl_conf.openssldir_in_binary(str(fake)) == "/etc/pki/tls"
    fake.write_bytes(b"\x7fELF no such string")
    assert openssl_conf.openssldir_in_binary(str(fake)) is None


def test_openssldir_agrees_with_the_loaded_library() -> None:
    code = (
        "import sys; from tlshd.openssl_conf import openssldir; before = openssldir()\n"
        "from OpenSSL import SSL\n"
        "print(before); print(SSL.OpenSSL_version(SSL.OPENSSL_DIR).decode())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    before, reported = proc.stdout.splitlines()
    assert reported == f'OPENSSLDIR: "{before}"'


def test_section_reader_follows_includes_and_directories(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-ssl.cnf").write_text(
        "[ my_init ]\nssl_conf = my_ssl\n[my_ssl]\nsystem_default = my_defaults # trailing\n"
    )
    main = tmp_path / "openssl.cnf"
    main.write_text(f"# comment\nopenssl_conf = my_init\n.include {tmp_path / 'conf.d'}\n")
    assert openssl_conf.system_section_names(str(main)) == ("my_init", "my_ssl", "my_defaults")
    text = openssl_conf.conf_text(str(main))
    assert text.endswith("[my_defaults]\nNumTickets = 0\n")


LIBCRYPTO_PROBE = """
import sys
{keep}
from tlshd.workers import zygote
from tlshd.workers.engine import perform_handshake  # what the zygote imports
zygote.warm_up_tls()  # a certificate built and a handshake run through cryptography
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
import hashlib
key = ec.generate_private_key(ec.SECP256R1()).public_key()
ski = x509.SubjectKeyIdentifier.from_public_key(key)  # the SHA-1 that needs hashlib
print(sys.modules.get("_hashlib") is not None, len(ski.digest), hashlib.sha256(b"").hexdigest()[:8])
"""


@pytest.mark.parametrize("keep_out", [True, False], ids=["kept-out", "control"])
def test_system_libcrypto_stays_out_and_hashes_still_work(keep_out: bool) -> None:
    """cryptography.x509 imports hashlib; kept out, `_hashlib` (and the system
    libcrypto it links) never loads, and the built-in hashes serve instead."""
    code = textwrap.dedent(
        LIBCRYPTO_PROBE.format(
            keep="from tlshd.openssl_conf import keep_system_libcrypto_out\n"
            "keep_system_libcrypto_out()"
            if keep_out
            else ""
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    hashlib_loaded, digest_size, sha256 = proc.stdout.split()
    assert (digest_size, sha256) == ("20", "e3b0c442")
    assert hashlib_loaded == str(not keep_out)
