"""SupervisorKeyService against this machine's real kernel keyrings.

"Foreign" keyrings are made by keyctl(1) in another session and kept alive by
that process, so this test process does not possess them: the situation of the
kernel's .nvme/.nfs/.nfsd keyrings and of keys inserted by nvme-cli.  The key
type is "user" because "psk" exists only with the nvme-keyring module.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tlshd.supervisor.keyservice import (
    KERNEL_KEYRINGS,
    RequestScope,
    SupervisorKeyService,
)

from tests.conftest import unique
from tests.helpers.certs import issue_cert
from tests.helpers.waiting import wait_until
from tlshd import keyring as kr
from tlshd.ipc import MAX_PSK_IDENTITIES, KeyReply, KeyRequest
from tlshd.keys import KeyService, KeyServiceError
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/proc/keys"), reason="kernel without KEYS"),
    pytest.mark.skipif(shutil.which("keyctl") is None, reason="keyctl not installed"),
]

NVME_RING_PERM = "0x1f1f0000"  # nvme_keyring_init: owner all but setattr, for both
DEFAULT_KEY_PERM = 0x3F010000  # add_key(2) default for "user": others may only view


def ring_contents(ring: int) -> list[int]:
    data = kr.read_key(ring)
    return list(struct.unpack(f"={len(data) // 4}i", data))


class Foreign:
    """A keyctl(1) process in its own anonymous session holding keyrings."""

    def __init__(self, tmp: Path, script: str) -> None:
        self.out = tmp / f"out-{uuid.uuid4().hex[:8]}"
        # sh -e stops at the first failing step, and the helper then exits
        body = f"exec > {self.out}.tmp; {script}; mv {self.out}.tmp {self.out}; exec sleep 60"
        self.proc = subprocess.Popen(
            ["keyctl", "session", "-", "sh", "-ec", body],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def written() -> bool:
            assert self.proc.poll() is None, "keyctl helper failed"
            return self.out.exists()

        wait_until(written, what="the keyctl helper's keyrings")
        self.values = dict(line.split("=", 1) for line in self.out.read_text().split())

    def __getitem__(self, name: str) -> int:
        return int(self.values[name])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def nvme_like_script(ring_name: str, *keys: tuple[str, str, str]) -> str:
    """A keyring with .nvme's permissions holding `keys` (var, description, payload)."""
    lines = [
        f"r=$(keyctl newring '{ring_name}' @s)",
        f"keyctl setperm $r {NVME_RING_PERM}",
        "echo ring=$r",
    ]
    for var, desc, payload in keys:
        lines.append(f"k=$(keyctl add user '{desc}' '{payload}' $r); echo {var}=$k")
    return "; ".join(lines)


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[Callable[[str], Foreign]]:
    made: list[Foreign] = []

    def make(script: str) -> Foreign:
        f = Foreign(tmp_path, script)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


@pytest.fixture
def services() -> Iterator[Callable[..., SupervisorKeyService]]:
    """Build services; afterwards undo their links into our process keyring."""
    made: list[SupervisorKeyService] = []

    def make(*args: Any, **kw: Any) -> SupervisorKeyService:
        kw.setdefault("key_type", "user")
        kw.setdefault("kernel_keyrings", ())
        svc = SupervisorKeyService(*args, **kw)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        for serial in [*svc._linked, *svc._peer_certs]:
            with contextlib.suppress(kr.KeyringError):
                kr.unlink_key(serial, kr.KEY_SPEC_PROCESS_KEYRING)


# --- the evidence the design rests on ----------------------------------------


def test_foreign_key_needs_possession(foreign: Callable[[str], Foreign]) -> None:
    name, ident = unique(), unique("NVMe0R01")
    f = foreign(nvme_like_script(name, ("key", ident, "s3cret")))
    assert kr.describe_key(f["key"]).perm == DEFAULT_KEY_PERM

    def search_in_fresh_process() -> int:
        pid = os.fork()
        if pid == 0:
            try:
                kr.search_keyring(f["ring"], "user", ident)
                os._exit(0)
            except kr.KeyringError as exc:
                os._exit(exc.errno or 1)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert search_in_fresh_process() == errno.EACCES


# --- search_psks --------------------------------------------------------------


def test_is_a_key_service() -> None:
    svc: KeyService = SupervisorKeyService([])
    assert isinstance(svc, SupervisorKeyService)
    assert SupervisorKeyService([]).key_type == "psk"
    assert SupervisorKeyService([]).keyring_names == KERNEL_KEYRINGS


def test_psk_type_absent_on_this_kernel_is_just_not_found() -> None:
    svc = SupervisorKeyService([])  # type "psk", .nvme/.nfs/.nfsd probably absent
    assert svc.search_psks([unique("NVMe0R01")], None) is None


def test_search_configured_keyring_by_name(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    name, ident = unique(), unique("NVMe0R01") + " nqn.host nqn.subsys"
    f = foreign(nvme_like_script(name, ("key", ident, "s3cret")))
    svc = services([name])
    found = svc.search_psks([ident], None)
    assert found is not None
    assert (found.serial, found.description, found.payload) == (f["key"], ident, b"s3cret")
    assert f["ring"] in ring_contents(kr.get_keyring_id(kr.KEY_SPEC_PROCESS_KEYRING))


def test_search_kernel_keyring_names(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    fake_nvme, ident = unique("nvme"), unique("NVMe1R02")
    f = foreign(nvme_like_script(fake_nvme, ("key", ident, "k")))
    svc = services([], kernel_keyrings=(fake_nvme,))
    found = svc.search_psks([ident], None)
    assert found is not None and found.serial == f["key"]


def test_configured_keyring_given_by_serial(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    ident = unique("NVMe0R01")
    f = foreign(nvme_like_script(unique(), ("key", ident, "k")))
    for spec in (str(f["ring"]), hex(f["ring"])):
        found = services([spec]).search_psks([ident], None)
        assert found is not None and found.serial == f["key"]


def test_keyring_created_after_construction_is_found(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    name, ident = unique("nfsd"), unique("id")
    svc = services([], kernel_keyrings=(name,))
    assert svc.search_psks([ident], None) is None  # the module is not "loaded" yet
    f = foreign(nvme_like_script(name, ("key", ident, "late")))
    found = svc.search_psks([ident], None)
    assert found is not None and found.payload == b"late" and found.serial == f["key"]


def test_recreated_keyring_is_found_again(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    name, ident = unique("nfs"), unique("id")
    first = foreign(nvme_like_script(name, ("key", ident, "one")))
    svc = services([name])
    assert svc.search_psks([ident], None).payload == b"one"  # type: ignore[union-attr]
    first.stop()
    # our process-keyring link keeps the old ring alive: revoke it, as a module
    # unload does (nvme_keyring_exit revokes .nvme)
    kr.revoke_key(first["ring"])
    second = foreign(nvme_like_script(name, ("key", ident, "two")))
    found = svc.search_psks([ident], None)
    assert found is not None and (found.serial, found.payload) == (second["key"], b"two")


def test_request_keyring_is_searched_first(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    ident = unique("id")
    configured = foreign(nvme_like_script(unique(), ("key", ident, "configured")))
    request = foreign(nvme_like_script(unique(), ("key", ident, "request")))
    svc = services([str(configured["ring"])])
    assert svc.search_psks([ident], None).payload == b"configured"  # type: ignore[union-attr]
    found = svc.search_psks([ident], request["ring"])
    assert found is not None and found.serial == request["key"]


def test_search_misses(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    ident = unique("id")
    served = foreign(nvme_like_script(unique(), ("key", ident, "x")))
    unserved_ident = unique("id")
    foreign(nvme_like_script(unique(), ("key", unserved_ident, "y")))
    svc = services([str(served["ring"]), unique("absent-ring")])
    assert svc.search_psks([ident + "-other"], None) is None
    assert svc.search_psks([unserved_ident], None) is None  # only served keyrings


def test_process_keyring_is_not_searched(
    scratch: int, services: Callable[..., SupervisorKeyService]
) -> None:
    """The process keyring collects the ACCEPT keyrings of past requests (the
    kernel links each there); searching it would hand one request's keys to
    every other request."""
    ident = unique("id")
    kr.add_key("user", ident, b"someone else's", scratch)
    assert services([]).search_psks([ident], None) is None


# --- the ACCEPT keyring (HANDSHAKE_A_ACCEPT_KEYRING, Linux 6.17) ---------------


def test_accept_keyring_serves_its_request_only(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    """A PSK that lives only in a request's keyring is found for that request;
    later requests, with another keyring or none, do not find it, even after
    the keyring was linked into our process keyring (as the kernel links it at
    ACCEPT time and as we link it to possess its keys)."""
    ident = unique("NVMe0R01")
    ring = foreign(nvme_like_script(unique(), ("key", ident, "tenant psk")))
    other = foreign(nvme_like_script(unique()))
    svc = services([])

    mine = RequestScope(keyring=ring["ring"], psk_search=True)
    reply = svc.answer(mine, psk_search(ident, keyring=ring["ring"]))
    assert (reply.ok, reply.serial, reply.payload) == (True, ring["key"], b"tenant psk")
    assert ring["ring"] in ring_contents(kr.resolve_keyring("@p"))

    no_keyring = svc.answer(RequestScope(psk_search=True), psk_search(ident))
    assert (no_keyring.ok, no_keyring.errno) == (False, errno.ENOKEY)
    other_scope = RequestScope(keyring=other["ring"], psk_search=True)
    own_ring = svc.answer(other_scope, psk_search(ident, keyring=other["ring"]))
    assert (own_ring.ok, own_ring.errno) == (False, errno.ENOKEY)
    borrowed = svc.answer(
        RequestScope(keyring=other["ring"], psk_search=True),
        psk_search(ident, keyring=ring["ring"]),
    )
    assert (borrowed.ok, borrowed.errno) == (False, errno.EACCES)


def test_key_read_possesses_the_accept_keyring(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    """Client role (nvme connect --keyring): ACCEPT names the key by serial and
    its keyring; the key grants non-possessors only view, so reading it needs
    possession of that keyring, which is not a served one."""
    ring = foreign(nvme_like_script(unique(), ("key", unique("NVMe0R01"), "host psk")))
    assert kr.describe_key(ring["key"]).perm == DEFAULT_KEY_PERM
    svc = services([])
    without = svc.answer(RequestScope(frozenset({ring["key"]})), key_read(ring["key"]))
    assert (without.ok, without.errno) == (False, errno.EACCES)
    scope = RequestScope(frozenset({ring["key"]}), keyring=ring["ring"])
    reply = svc.answer(scope, key_read(ring["key"]))
    assert (reply.ok, reply.payload) == (True, b"host psk")


def test_served_keyrings_order(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    a, b = unique(), unique()
    fa, fb = foreign(nvme_like_script(a)), foreign(nvme_like_script(b))
    svc = services([b, a, b], kernel_keyrings=(a,))
    assert svc.served_keyrings(12345) == [
        12345,
        fa["ring"],
        fb["ring"],
        kr.KEY_SPEC_SESSION_KEYRING,
    ]


# --- read_key -----------------------------------------------------------------


def test_read_key(scratch: int, services: Callable[..., SupervisorKeyService]) -> None:
    serial = kr.add_key("user", "prefix;NVMe0R01 h s", b"\x00\x01payload", scratch)
    material = services([]).read_key(serial)
    assert material.serial == serial
    assert material.payload == b"\x00\x01payload"
    assert material.description == "NVMe0R01 h s"  # the text after the last ';'


@pytest.mark.parametrize("case", ["missing", "revoked", "foreign"])
def test_read_key_errors(
    case: str,
    scratch: int,
    foreign: Callable[[str], Foreign],
    services: Callable[..., SupervisorKeyService],
) -> None:
    if case == "missing":
        serial, expected = 0x7FFFFFF0, errno.ENOKEY
    elif case == "revoked":
        serial, expected = kr.add_key("user", unique(), b"x", scratch), errno.EKEYREVOKED
        kr.revoke_key(serial)
    else:  # a key in a keyring the daemon does not serve, readable only by possessors
        f = foreign("r=$(keyctl newring x @s); k=$(keyctl add user k v $r); echo key=$k")
        serial, expected = f["key"], errno.EACCES
    with pytest.raises(KeyServiceError) as info:
        services([]).read_key(serial)
    assert info.value.errno == expected
    assert str(serial) in str(info.value)


def test_read_key_in_served_keyring_takes_possession(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    name = unique()
    f = foreign(nvme_like_script(name, ("key", "peer-identity", "psk-bytes")))
    # others may only view the key: KEYCTL_READ needs possession
    assert kr.describe_key(f["key"]).perm == DEFAULT_KEY_PERM
    svc = services([name])
    assert svc.read_key(f["key"]).payload == b"psk-bytes"


# --- peer certificates ------------------------------------------------------


@pytest.fixture(scope="module")
def cert_der() -> bytes:
    """A self-signed RSA peer certificate in DER, the form the kernel's
    "asymmetric" key type takes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return issue_cert("peer.example", key).public_bytes(serialization.Encoding.DER)


def proc_keys_timeout(serial: int) -> str:
    for line in Path("/proc/keys").read_text().splitlines():
        fields = line.split()
        if int(fields[0], 16) == serial:
            return fields[3]
    raise AssertionError(f"key {serial} not in /proc/keys")


def asymmetric_supported(cert: bytes) -> bool:
    try:
        serial = kr.add_key("asymmetric", unique(), cert, kr.KEY_SPEC_PROCESS_KEYRING)
    except kr.KeyringError:
        return False
    kr.unlink_key(serial, kr.KEY_SPEC_PROCESS_KEYRING)
    return True


def test_add_peer_certificate(
    cert_der: bytes, services: Callable[..., SupervisorKeyService]
) -> None:
    if not asymmetric_supported(cert_der):
        pytest.skip("no asymmetric key type / X.509 parser in this kernel")
    svc = services([])
    serial = svc.add_peer_certificate(cert_der, unique("peer"))
    assert serial > 0
    assert kr.describe_key(serial).type == "asymmetric"
    assert serial in ring_contents(kr.get_keyring_id(kr.KEY_SPEC_PROCESS_KEYRING))
    user_ring = kr.get_keyring_id(kr.KEY_SPEC_USER_KEYRING)
    assert serial not in ring_contents(user_ring)  # upstream's leak
    assert proc_keys_timeout(serial) != "perm"  # it expires


def test_peer_certificates_are_capped(
    cert_der: bytes, services: Callable[..., SupervisorKeyService]
) -> None:
    if not asymmetric_supported(cert_der):
        pytest.skip("no asymmetric key type / X.509 parser in this kernel")
    svc = services([], max_peer_certs=2)
    serials = [svc.add_peer_certificate(cert_der, unique("peer")) for _ in range(3)]
    assert all(serials)
    linked = ring_contents(kr.get_keyring_id(kr.KEY_SPEC_PROCESS_KEYRING))
    assert serials[0] not in linked
    assert serials[1] in linked and serials[2] in linked


def test_bad_certificate_gives_zero(services: Callable[..., SupervisorKeyService]) -> None:
    assert services([]).add_peer_certificate(b"\x30\x03not-a-cert", unique("peer")) == 0


# --- answer: worker requests within their request's scope ------------------


def key_read(serial: int) -> KeyRequest:
    return KeyRequest("key_read", serial=serial)


def psk_search(*identities: str, keyring: int | None = None) -> KeyRequest:
    return KeyRequest("psk_search", identities=identities, keyring=keyring)


def test_key_read_of_allowed_serial(
    scratch: int, services: Callable[..., SupervisorKeyService]
) -> None:
    serial = kr.add_key("user", "x;ident", b"material", scratch)
    reply = services([]).answer(RequestScope(frozenset({serial})), key_read(serial))
    assert reply == KeyReply(True, 0, serial, "ident", b"material")
    assert reply.to_message(3)["payload_b64"] == base64.b64encode(b"material").decode()


def test_key_read_of_other_serial_is_refused(
    scratch: int, services: Callable[..., SupervisorKeyService]
) -> None:
    secret = kr.add_key("user", unique(), b"not-yours", scratch)
    svc = services([])
    for allowed in (frozenset(), frozenset({secret + 1})):
        reply = svc.answer(RequestScope(allowed), key_read(secret))
        assert reply.ok is False and reply.errno == errno.EACCES
        assert reply.payload == b""


def test_key_read_error_is_reported(services: Callable[..., SupervisorKeyService]) -> None:
    reply = services([]).answer(RequestScope(frozenset({0x7FFFFFF0})), key_read(0x7FFFFFF0))
    assert (reply.ok, reply.errno) == (False, errno.ENOKEY)


def test_psk_search_requests(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    ident = unique("id")
    req = foreign(nvme_like_script(unique(), ("key", ident, "psk")))
    other = foreign(nvme_like_script(unique()))
    svc = services([])
    search = psk_search(ident, keyring=req["ring"])

    refused = svc.answer(RequestScope(keyring=req["ring"]), search)
    assert refused.errno == errno.EACCES  # not a PSK server request

    wrong_ring = svc.answer(RequestScope(keyring=other["ring"], psk_search=True), search)
    assert wrong_ring.errno == errno.EACCES

    ok = svc.answer(RequestScope(keyring=req["ring"], psk_search=True), search)
    assert ok.ok is True and ok.serial == req["key"] and ok.payload == b"psk"

    missing = svc.answer(RequestScope(psk_search=True), psk_search(ident + "x"))
    assert (missing.ok, missing.errno) == (False, errno.ENOKEY)


def test_psk_search_finds_the_first_offered_identity_that_exists(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    first, second = unique("id1"), unique("id2")
    ring = foreign(nvme_like_script(unique(), ("a", first, "one"), ("b", second, "two")))
    svc = services([])
    scope = RequestScope(keyring=ring["ring"], psk_search=True)
    reply = svc.answer(scope, psk_search(unique("absent"), second, first, keyring=ring["ring"]))
    assert (reply.serial, reply.payload) == (ring["b"], b"two")


def test_only_one_psk_search_per_request(
    foreign: Callable[[str], Foreign], services: Callable[..., SupervisorKeyService]
) -> None:
    """A compromised worker commits to the identities it reports with its first
    search; it cannot go on to look up others (issue 11 #4)."""
    offered, other = unique("offered"), unique("not-offered")
    ring = foreign(nvme_like_script(unique(), ("a", offered, "one"), ("b", other, "two")))
    svc = services([])
    scope = RequestScope(keyring=ring["ring"], psk_search=True)
    assert svc.answer(scope, psk_search(offered, keyring=ring["ring"])).payload == b"one"
    again = svc.answer(scope, psk_search(other, keyring=ring["ring"]))
    assert (again.ok, again.errno, again.payload) == (False, errno.EACCES, b"")
    # the next request has a scope of its own
    fresh = RequestScope(keyring=ring["ring"], psk_search=True)
    assert svc.answer(fresh, psk_search(other, keyring=ring["ring"])).payload == b"two"


def test_psk_search_reads_proc_keys_once_and_caps_lookups(
    monkeypatch: pytest.MonkeyPatch, services: Callable[..., SupervisorKeyService]
) -> None:
    """1,400 offered identities cost one /proc/keys scan and at most
    MAX_PSK_IDENTITIES lookups per keyring (issue 11 #8)."""
    scans: list[int] = []
    searched: list[str] = []
    real_iter, real_search = kr.iter_proc_keys, kr.search_keyring

    def counting_iter(*args: Any) -> Any:
        scans.append(1)
        return real_iter(*args)

    def counting_search(ring: int, key_type: str, description: str, dest: int = 0) -> Any:
        searched.append(description)
        return real_search(ring, key_type, description, dest)

    monkeypatch.setattr(kr, "iter_proc_keys", counting_iter)
    monkeypatch.setattr(kr, "search_keyring", counting_search)
    svc = services([unique("missing-ring"), unique("missing-ring")])
    identities = [unique(f"id{i}") for i in range(1400)]
    assert svc.search_psks(identities, None) is None
    assert len(scans) == 1
    assert set(searched) == set(identities[:MAX_PSK_IDENTITIES])


def test_add_cert_request(cert_der: bytes, services: Callable[..., SupervisorKeyService]) -> None:
    svc = services([])
    bad = svc.answer(RequestScope(), KeyRequest("add_cert", der=b"junk", description="peer"))
    assert (bad.ok, bad.errno) == (False, errno.EKEYREJECTED)
    if not asymmetric_supported(cert_der):
        pytest.skip("no asymmetric key type / X.509 parser in this kernel")
    ok = svc.answer(RequestScope(), KeyRequest("add_cert", der=cert_der, description="peer"))
    assert ok.ok is True and ok.serial > 0 and ok.description == "peer"


# --- RequestScope -------------------------------------------------------------


def test_scope_of_psk_server_request() -> None:
    params = HandshakeParams(
        sockfd=5,
        message_type=MsgType.SERVERHELLO,
        auth_mode=AuthMode.PSK,
        keyring=77,
        peer_identities=(0,),
    )
    assert RequestScope.from_params(params) == RequestScope(frozenset(), 77, True)


def test_scope_of_client_requests() -> None:
    psk = HandshakeParams(
        sockfd=5, message_type=MsgType.CLIENTHELLO, auth_mode=AuthMode.PSK, peer_identities=(9,)
    )
    assert RequestScope.from_params(psk) == RequestScope(frozenset({9}), None, False)
    x509 = HandshakeParams(
        sockfd=5,
        message_type=MsgType.CLIENTHELLO,
        auth_mode=AuthMode.X509,
        cert_serial=11,
        privkey_serial=12,
        keyring=0,
    )
    assert RequestScope.from_params(x509) == RequestScope(frozenset({11, 12}), None, False)


def test_answer_applies_the_scope(
    scratch: int, services: Callable[..., SupervisorKeyService]
) -> None:
    serial = kr.add_key("user", unique(), b"v", scratch)
    svc = services([])
    assert svc.answer(RequestScope(frozenset({serial})), key_read(serial)).ok
    refused = svc.answer(RequestScope(), key_read(serial))
    assert refused.errno == errno.EACCES
    psk = svc.answer(RequestScope(psk_search=True), psk_search(unique()))
    assert psk.errno == errno.ENOKEY
