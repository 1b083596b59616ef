"""workers/psk.py: NVMe identity parsing, suite selection, PSK session objects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tlshd.workers import psk
from tlshd.workers.ktls import SUITES

from tlshd.keys import KeyMaterial

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100"
SUBNQN = "nqn.2014-08.org.example:sub"


@pytest.mark.parametrize(
    ("identity", "key_len", "expected"),
    [
        (f"NVMe0R01 {HOSTNQN} {SUBNQN}", 32, "sha256"),
        (f"NVMe0R02 {HOSTNQN} {SUBNQN}", 48, "sha384"),
        (f"NVMe1G02 {HOSTNQN} {SUBNQN} digest==", 48, "sha384"),
        (f"NVMe1R01 {HOSTNQN} {SUBNQN} digest==", 32, "sha256"),
        # what Linux 7.3 derives for nvme connect --concat (tests/lab/test_concat.py):
        # generated, and a base64 digest with '/', '+' and '='
        (f"NVMe1G01 {HOSTNQN} {SUBNQN} kArsMMUmtI8We9FAnXHCl1J/LRFkPR9OPk/IDizwxIU=", 32, "sha256"),
        (f"NVMe1G02 {HOSTNQN} {SUBNQN} +Md5yVvgYf0ggjXc+ken6EGcK3Bc2SL/cCDv/JVCvMk=", 48, "sha384"),
        ("plain identity", 32, "sha256"),
        ("plain identity", 48, "sha384"),
        ("plain identity", 16, "sha256"),
        ("nvme0R02 lower-case is not NVMe", 32, "sha256"),
    ],
)
def test_identity_hash(identity: str, key_len: int, expected: str) -> None:
    assert psk.identity_hash(identity, key_len) == expected


@pytest.mark.parametrize(
    "identity",
    [
        f"NVMe0R03 {HOSTNQN} {SUBNQN}",  # hmac 03 is not defined
        f"NVMe0R00 {HOSTNQN} {SUBNQN}",
        f"NVMe0X01 {HOSTNQN} {SUBNQN}",  # neither R nor G
        "NVMe0R01",  # no NQNs
        "NVMeXR01 host sub",
        "NVMe",
    ],
)
def test_invalid_nvme_identities(identity: str) -> None:
    with pytest.raises(psk.PskError):
        psk.identity_hash(identity, 32)


def test_nvme_hmac_wins_over_key_length() -> None:
    # the identity states the hash; the key length does not override it
    assert psk.identity_hash(f"NVMe0R02 {HOSTNQN} {SUBNQN}", 32) == "sha384"


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_suites_match_psk_hash(hash_name: str) -> None:
    suites = psk.suites_for(hash_name)
    assert suites
    assert all(SUITES[s].hash_name == hash_name for s in suites)
    assert "TLS_CHACHA20_POLY1305_SHA256" not in suites


def test_suite_lists() -> None:
    assert psk.suites_for("sha384") == ("TLS_AES_256_GCM_SHA384",)
    assert psk.suites_for("sha256")[0] == "TLS_AES_128_GCM_SHA256"


def test_psk_from_key() -> None:
    key = psk.psk_from_key(KeyMaterial(7, f"NVMe0R02 {HOSTNQN} {SUBNQN}", b"k" * 48))
    assert (key.serial, key.hash_name, key.key) == (7, "sha384", b"k" * 48)
    assert key.identity.startswith(b"NVMe0R02 ")
    for bad in (KeyMaterial(8, "id", b""), KeyMaterial(9, "", b"k" * 32)):
        with pytest.raises(psk.PskError):
            psk.psk_from_key(bad)


@given(st.text(min_size=1, max_size=80), st.sampled_from([16, 32, 48, 64]))
def test_identity_hash_total(identity: str, key_len: int) -> None:
    """Any identity either yields a supported hash or a PskError, never anything else."""
    try:
        assert psk.identity_hash(identity, key_len) in psk.PSK_SUITES
    except psk.PskError:
        assert identity.startswith("NVMe")


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_new_psk_session(hash_name: str) -> None:
    from OpenSSL._util import ffi, lib

    session = psk.new_psk_session(b"s" * 32, hash_name)
    try:
        assert session != ffi.NULL
        out = ffi.new("unsigned char[]", 64)
        n = lib.SSL_SESSION_get_master_key(session, out, 64)
        assert bytes(ffi.buffer(out, n)) == b"s" * 32
    finally:
        lib.SSL_SESSION_free(session)


# --- offered identities, from the raw ClientHello (issue 11 #4, #8) -----------


def test_offered_identities_in_order() -> None:
    from tlshd.workers.psk import offered_identities

    from tests.helpers.clienthello import client_hello

    identities = [b"NVMe0R01 host sub", b"", b"x" * 3000, b"\xff"]
    assert offered_identities(client_hello(identities)) == identities


def test_offered_identities_of_junk_is_empty() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from tlshd.workers.psk import offered_identities

    from tests.helpers.clienthello import client_hello

    hello = client_hello([b"a", b"b"])

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, len(hello)), st.binary(max_size=8))
    def check(cut: int, junk: bytes) -> None:
        found = offered_identities(hello[:cut] + junk)
        assert isinstance(found, list) and all(isinstance(i, bytes) for i in found)

    check()
