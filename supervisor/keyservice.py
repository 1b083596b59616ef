"""The supervisor's side of tlshd.keys.KeyService: kernel keys for workers.

Workers run unprivileged and hold no keyrings, so every key a handshake needs
is asked of the supervisor (ops ``key_read``, ``psk_search``, ``add_cert``);
`SupervisorKeyService.handle_request` validates and answers those requests, and
the same object is a plain `KeyService` for in-process use.

Where PSKs are searched
    Each served keyring is searched on its own with KEYCTL_SEARCH, in this
    order: the keyring named in the request's ACCEPT, ``.nvme``, ``.nfs``,
    ``.nfsd``, the configured ``[authenticate] keyrings``, then the process and
    session keyrings.  Names are resolved again at every search (a cached
    serial is re-checked with KEYCTL_DESCRIBE, a miss re-reads /proc/keys), so
    ``.nfs``/``.nfsd``, which appear only when nfs.ko/nfsd.ko load, are found
    without a reload.

Why not upstream's session-keyring links
    Upstream links every served keyring into the *session* keyring and, per
    request, links and later unlinks the ACCEPT keyring there.  Under systemd
    that session keyring is shared by the daemon and all of its children, so
    concurrent handshakes race: one child's unlink removes a keyring another
    child is still searching.  And since possession follows the keyrings a
    process holds rather than its uid, a shared session keyring also hands
    every forked process possession of every served key.  Here nothing is ever
    linked into or unlinked from a shared keyring.

Why keyrings are still linked into the supervisor's *process* keyring
    Searching by serial alone is not enough.  Measured on Linux 6.18 (this
    project's test machine, as root):

    * a keyring made with ``keyctl newring`` in another session (perm
      3f010000: non-possessors may only view it): KEYCTL_SEARCH -> EACCES,
      KEYCTL_LINK -> EACCES.  Nothing can be done about such a keyring.
    * a keyring with ``.nvme``'s permissions (nvme_keyring_init grants the
      owner, root, everything but setattr) holding a key whose user bits are
      view+read only: KEYCTL_SEARCH of the ring by serial -> EACCES, because
      the search checks each key's *search* permission and, without
      possession, only the user bits apply.  After KEYCTL_LINK of the ring into
      our process keyring, the same search finds the key: possession gives
      the possessor bits.  A key added by add_key(2) with default permissions
      (what libnvme's ``nvme gen-tls-key --insert`` does) grants
      non-possessors only view, so this is the normal case for ``.nvme``.
    * KEYCTL_READ of a key by serial is allowed with user read permission, or
      with possession plus search (security/keys/keyctl.c: keyctl_read_key).

    So before a keyring is searched it is linked into KEY_SPEC_PROCESS_KEYRING.
    That keyring belongs to the supervisor process alone: it is not inherited
    by fork (a forked child starts with none, which tests/test_keyring.py
    checks) and no other process can name it; the supervisor is single-threaded,
    so its link set cannot race.  Links are never removed: the kernel's own
    ACCEPT-time link of the consumer keyring (tls_handshake_private_keyring)
    goes to the same process keyring and is not ours to undo, and a link to a
    keyring that dies is dropped by the key garbage collector.  If linking is
    refused, the keyring is still searched directly (keys with user search
    permission, such as the kernel-generated NVMe PSKs, are found that way).

    Workers must not share the supervisor's *session* keyring either: a forked
    worker should join a fresh anonymous session (tlshd.keyring.
    join_session_keyring(None)) before it drops privileges.

Peer certificates
    Upstream adds each verified peer certificate to root's *user* keyring and
    never removes it.  Here they go into the supervisor's process keyring with
    a timeout (KEYCTL_SET_TIMEOUT), and at most `max_peer_certs` are kept
    linked; the oldest link is dropped first.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import logging
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from tlshd import keyring as kr
from tlshd.keys import KeyMaterial, KeyServiceError
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

log = logging.getLogger("tlshd.keyservice")

KERNEL_KEYRINGS = (".nvme", ".nfs", ".nfsd")
PEER_CERT_TIMEOUT_S = 300
MAX_PEER_CERTS = 256
MAX_DESCRIPTION = 4095  # key descriptions are limited to a page, NUL included
MAX_CERT_DER = 64 * 1024
MAX_SERIAL = 2**31 - 1
MAX_LINK_MEMO = 1024  # forgetting a link only costs a redundant KEYCTL_LINK

# errno values a key lookup can legitimately end with; anything else is EIO.
_KEY_ERRNOS = frozenset(
    {errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED, errno.EKEYREJECTED, errno.EACCES}
)


@dataclass(frozen=True)
class RequestScope:
    """What one handshake's worker may ask for, derived from its ACCEPT."""

    allowed_serials: frozenset[int] = frozenset()
    keyring: int | None = None
    psk_search: bool = False

    @classmethod
    def from_params(cls, params: HandshakeParams) -> RequestScope:
        serials = {s for s in (*params.peer_identities, params.cert_serial, params.privkey_serial)}
        serials.discard(0)
        psk_server = params.message_type == MsgType.SERVERHELLO and params.auth_mode == AuthMode.PSK
        return cls(frozenset(serials), params.keyring or None, psk_server)


def _reply(
    ok: bool = False,
    err: int = 0,
    serial: int = 0,
    description: str = "",
    payload: bytes = b"",
) -> dict[str, Any]:
    return {
        "ok": ok,
        "errno": err,
        "serial": serial,
        "description": description,
        "payload_b64": base64.b64encode(payload).decode("ascii"),
    }


def _material_reply(material: KeyMaterial | None) -> dict[str, Any]:
    if material is None:
        return _reply(err=errno.ENOKEY)
    return _reply(True, 0, material.serial, material.description, material.payload)


def _is_serial(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_SERIAL


def _is_text(value: object, limit: int = MAX_DESCRIPTION) -> bool:
    return (
        type(value) is str
        and 0 < len(value.encode("utf-8", "surrogatepass")) <= limit
        and "\0" not in value
    )


class SupervisorKeyService:
    """Kernel keys on behalf of workers; implements tlshd.keys.KeyService."""

    def __init__(
        self,
        configured_keyrings: Sequence[str],
        *,
        key_type: str = "psk",
        kernel_keyrings: Sequence[str] = KERNEL_KEYRINGS,
        cert_timeout_s: int = PEER_CERT_TIMEOUT_S,
        max_peer_certs: int = MAX_PEER_CERTS,
    ) -> None:
        self.key_type = key_type
        self.keyring_names = tuple(dict.fromkeys([*kernel_keyrings, *configured_keyrings]))
        self.cert_timeout_s = cert_timeout_s
        self.max_peer_certs = max_peer_certs
        self._resolved: dict[str, int] = {}
        self._linked: set[int] = set()
        self._peer_certs: deque[int] = deque()

    # --- keyring resolution and possession ----------------------------------

    def _resolve(self, name: str) -> int | None:
        """Serial of keyring `name` now; a cached serial is re-checked first."""
        cached = self._resolved.get(name)
        if cached is not None:
            if kr.is_keyring_named(cached, name):
                return cached
            del self._resolved[name]
            self._linked.discard(cached)
        try:
            serial = kr.resolve_keyring(name)
        except kr.KeyringError as exc:
            log.warning("keyring %s: %s", name, exc.strerror)
            return None
        if serial is not None and serial > 0:
            self._resolved[name] = serial
        return serial

    def _possess(self, ring: int) -> None:
        """Link `ring` into our private process keyring so its keys are possessed."""
        if ring < 0 or ring in self._linked:
            return
        try:
            kr.link_key(ring, kr.KEY_SPEC_PROCESS_KEYRING)
        except kr.KeyringError as exc:
            log.debug("cannot link keyring %d into the process keyring: %s", ring, exc.strerror)
            return
        if len(self._linked) >= MAX_LINK_MEMO:
            self._linked.clear()
        self._linked.add(ring)

    def served_keyrings(self, request_keyring: int | None = None) -> list[int]:
        """Keyrings searched for PSKs, in order, each at most once."""
        rings: list[int] = []
        if request_keyring:
            rings.append(request_keyring)
        for name in self.keyring_names:
            serial = self._resolve(name)
            if serial is not None:
                rings.append(serial)
        rings += [kr.KEY_SPEC_PROCESS_KEYRING, kr.KEY_SPEC_SESSION_KEYRING]
        return list(dict.fromkeys(rings))

    def _possess_served(self, request_keyring: int | None = None) -> list[int]:
        rings = self.served_keyrings(request_keyring)
        for ring in rings:
            self._possess(ring)
        return rings

    # --- KeyService ----------------------------------------------------------

    def read_key(self, serial: int) -> KeyMaterial:
        """Payload and description of key `serial`; KeyServiceError on failure."""
        try:
            payload = self._read_possessed(serial)
            description = kr.describe_key(serial).description
        except kr.KeyringError as exc:
            err = exc.errno if exc.errno in _KEY_ERRNOS else errno.EIO
            raise KeyServiceError(str(exc), err) from None
        return KeyMaterial(serial, description.rsplit(";", 1)[-1], payload)

    def _read_possessed(self, serial: int) -> bytes:
        try:
            return kr.read_key(serial)
        except kr.KeyringError as exc:
            if exc.errno != errno.EACCES:
                raise
        # readable only by a possessor: take possession of the served keyrings
        self._possess_served()
        return kr.read_key(serial)

    def search_psk(self, identity: str, keyring: int | None) -> KeyMaterial | None:
        """The key of our key type described `identity` in the served keyrings, or None."""
        for ring in self._possess_served(keyring):
            try:
                serial = kr.search_keyring(ring, self.key_type, identity)
            except kr.KeyringError as exc:
                log.debug("search of keyring %d for %r: %s", ring, identity, exc.strerror)
                continue
            if serial is None:
                continue
            try:
                return self.read_key(serial)
            except KeyServiceError as exc:
                log.warning("PSK %r (key %d) found but unreadable: %s", identity, serial, exc)
        return None

    def add_peer_certificate(self, der: bytes, description: str) -> int:
        """Add a peer certificate as an expiring "asymmetric" key; its serial, or 0."""
        try:
            serial = kr.add_key("asymmetric", description, der, kr.KEY_SPEC_PROCESS_KEYRING)
        except kr.KeyringError as exc:
            log.debug("peer certificate %r not added: %s", description, exc.strerror)
            return 0
        try:
            kr.set_timeout(serial, self.cert_timeout_s)
        except kr.KeyringError as exc:
            log.debug("timeout on peer certificate key %d: %s", serial, exc.strerror)
        self._peer_certs.append(serial)
        self._trim_peer_certs()
        return serial

    def _trim_peer_certs(self) -> None:
        while len(self._peer_certs) > self.max_peer_certs:
            old = self._peer_certs.popleft()
            # the key may already have expired and been collected
            with contextlib.suppress(kr.KeyringError):
                kr.unlink_key(old, kr.KEY_SPEC_PROCESS_KEYRING)

    # --- worker requests ---------------------------------------------------------

    @staticmethod
    def check_request(op: object, args: object) -> str | None:
        """Why a worker request is malformed, or None if it is well-formed."""
        if not isinstance(args, dict):
            return "arguments are not an object"
        if op == "key_read":
            return None if _is_serial(args.get("serial")) else "bad serial"
        if op == "psk_search":
            if not _is_text(args.get("identity")):
                return "bad identity"
            ring = args.get("keyring")
            return None if ring is None or ring == 0 or _is_serial(ring) else "bad keyring"
        if op == "add_cert":
            if not _is_text(args.get("description")):
                return "bad description"
            der = args.get("der_b64")
            if type(der) is not str or not 0 < len(der) <= MAX_CERT_DER * 4 // 3 + 4:
                return "bad der_b64"
            try:
                base64.b64decode(der, validate=True)
            except (binascii.Error, ValueError):
                return "bad der_b64"
            return None
        return "unknown op"

    def handle_request(
        self,
        op: str,
        args: dict[str, Any],
        *,
        allowed_serials: Collection[int] = (),
        psk_search_allowed: bool = False,
        request_keyring: int | None = None,
    ) -> dict[str, Any]:
        """Answer one worker request with a ``key_reply`` body.

        Workers are untrusted.  A malformed request gets errno EINVAL (see
        `check_request`; the caller may kill the worker), a request outside
        the handshake's scope gets EACCES: ``key_read`` only for
        `allowed_serials` (the serials in that request's ACCEPT),
        ``psk_search`` only when `psk_search_allowed` (PSK server requests) and
        only in `request_keyring` besides the daemon's own keyrings.
        """
        problem = self.check_request(op, args)
        if problem is not None:
            log.warning("malformed %r key request from a worker: %s", op, problem)
            return _reply(err=errno.EINVAL)
        if op == "key_read":
            return self._handle_key_read(args["serial"], allowed_serials)
        if op == "psk_search":
            return self._handle_psk_search(args, psk_search_allowed, request_keyring)
        return self._handle_add_cert(args)

    def handle_for(self, scope: RequestScope, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """`handle_request` with the limits of one handshake's `RequestScope`."""
        return self.handle_request(
            op,
            args,
            allowed_serials=scope.allowed_serials,
            psk_search_allowed=scope.psk_search,
            request_keyring=scope.keyring,
        )

    def _handle_key_read(self, serial: int, allowed: Collection[int]) -> dict[str, Any]:
        if serial not in allowed:
            log.warning("worker asked for key %d, which its request did not name", serial)
            return _reply(err=errno.EACCES, serial=serial)
        try:
            return _material_reply(self.read_key(serial))
        except KeyServiceError as exc:
            return _reply(err=exc.errno, serial=serial)

    def _handle_psk_search(
        self, args: dict[str, Any], allowed: bool, request_keyring: int | None
    ) -> dict[str, Any]:
        ring = args.get("keyring") or None
        if not allowed:
            log.warning("worker asked for a PSK search outside a PSK server handshake")
            return _reply(err=errno.EACCES)
        if ring is not None and ring != request_keyring:
            log.warning("worker asked to search keyring %d, not its request's", ring)
            return _reply(err=errno.EACCES)
        return _material_reply(self.search_psk(args["identity"], ring))

    def _handle_add_cert(self, args: dict[str, Any]) -> dict[str, Any]:
        der = base64.b64decode(args["der_b64"], validate=True)
        serial = self.add_peer_certificate(der, args["description"])
        if serial == 0:
            return _reply(err=errno.EKEYREJECTED)
        return _reply(True, 0, serial, args["description"])
