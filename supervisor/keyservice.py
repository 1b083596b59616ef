"""The supervisor's side of tlshd.keys.KeyService: kernel keys for workers.

Workers run unprivileged and hold no keyrings, so every key a handshake needs
is asked of the supervisor (ops ``key_read``, ``psk_search``, ``add_cert``);
`SupervisorKeyService.handle_request` validates and answers those requests, and
the same object is a plain `KeyService` for in-process use.

Where PSKs are searched
    Each served keyring is searched on its own with KEYCTL_SEARCH, in this
    order: the keyring named in the request's ACCEPT, ``.nvme``, ``.nfs``,
    ``.nfsd``, the configured ``[authenticate] keyrings``, then the session
    keyring.  Names are resolved again at every search (a cached
    serial is re-checked with KEYCTL_DESCRIBE, a miss re-reads /proc/keys), so
    ``.nfs``/``.nfsd``, which appear only when nfs.ko/nfsd.ko load, are found
    without a reload.

The ACCEPT keyring belongs to its request alone
    Since Linux 6.17 ACCEPT names the consumer's keyring (HANDSHAKE_A_ACCEPT_
    KEYRING: ``nvme connect --keyring``, an nvmet port keyring).  A request's
    worker may search that keyring (RequestScope.keyring); no other request
    may.  The kernel links every such keyring into the accepting process's
    *process* keyring (tls_handshake_private_keyring), and so do we to possess
    its keys, and KEYCTL_SEARCH descends into linked keyrings: so the process
    keyring, which collects the keyrings of every request ever accepted, is
    never searched.  Before 6.17 the kernel links the consumer keyring
    without naming it; such a keyring must be listed in ``keyrings=``, as
    upstream requires.

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

import contextlib
import errno
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from tlshd import keyring as kr
from tlshd.ipc import MAX_PSK_IDENTITIES, KeyReply, KeyRequest
from tlshd.keys import KeyMaterial, KeyServiceError
from tlshd.params import HandshakeParams
from tlshd.uapi import AuthMode, MsgType

log = logging.getLogger("tlshd.keyservice")

KERNEL_KEYRINGS = (".nvme", ".nfs", ".nfsd")
PEER_CERT_TIMEOUT_S = 300
MAX_PEER_CERTS = 256
MAX_LINK_MEMO = 1024  # forgetting a link only costs a redundant KEYCTL_LINK

# errno values a key lookup can legitimately end with; anything else is EIO.
_KEY_ERRNOS = frozenset(
    {errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED, errno.EKEYREJECTED, errno.EACCES}
)


@dataclass
class RequestScope:
    """What one handshake's worker may ask for, derived from its ACCEPT.

    Threat model: the worker parses peer data and may be compromised; then it
    can send any well-formed key request.  Key material must only reach it as
    far as the request it serves needs:

    * ``key_read`` only of the serials the kernel named in this ACCEPT;
    * ``psk_search`` only in a PSK *server* request, only in this request's
      keyring besides the daemon's own, and only ONCE per request, for at
      most MAX_PSK_IDENTITIES identities: the ones the peer's ClientHello
      offered.  The supervisor never sees the ClientHello (the worker reads
      it off the socket), so it cannot check that list; the once-per-request
      rule makes the worker commit to it before it learns anything, and bounds
      what a compromised worker can look up with one request to what a
      ClientHello of MAX_PSK_IDENTITIES identities would have found.  With
      single-use workers, a worker never serves a second request.

    One scope lives as long as its request (the arbiter keeps it on the
    Request), so `psk_searched` counts across the worker's requests.
    """

    allowed_serials: frozenset[int] = frozenset()
    keyring: int | None = None
    psk_search: bool = False
    psk_searched: bool = False

    @classmethod
    def from_params(cls, params: HandshakeParams) -> RequestScope:
        serials = {s for s in (*params.peer_identities, params.cert_serial, params.privkey_serial)}
        serials.discard(0)
        psk_server = params.message_type == MsgType.SERVERHELLO and params.auth_mode == AuthMode.PSK
        return cls(frozenset(serials), params.keyring or None, psk_server)


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

    def _resolve_all(self) -> dict[str, int]:
        """Serials of the served keyrings now, by name, reading /proc/keys at most once.

        A cached serial is re-checked with KEYCTL_DESCRIBE; names not (or no
        longer) resolved are looked up together in one pass over /proc/keys,
        since the kernel's keyrings may appear at any time (.nfs/.nfsd when
        their modules load).  Specs that are not plain names (@u, serials) go
        through kr.resolve_keyring."""
        resolved: dict[str, int] = {}
        by_name: list[str] = []
        for name in self.keyring_names:
            cached = self._resolved.get(name)
            if cached is not None:
                if kr.is_keyring_named(cached, name):
                    resolved[name] = cached
                    continue
                del self._resolved[name]
                self._linked.discard(cached)
            if name in kr.SPECIAL_KEYRINGS or kr.parse_serial(name) is not None:
                serial = self._resolve_spec(name)
                if serial is not None:
                    resolved[name] = serial
            else:
                by_name.append(name)
        if by_name:
            found = self._find_keyrings(by_name)
            self._resolved.update(found)
            resolved.update(found)
        return resolved

    @staticmethod
    def _resolve_spec(name: str) -> int | None:
        try:
            return kr.resolve_keyring(name)
        except kr.KeyringError as exc:
            log.warning("keyring %s: %s", name, exc.strerror)
            return None

    @staticmethod
    def _find_keyrings(names: Sequence[str]) -> dict[str, int]:
        """One pass over /proc/keys: the first listed keyring of each name,
        confirmed with KEYCTL_DESCRIBE (as kr.find_keyring_by_name)."""
        wanted = set(names)
        found: dict[str, int] = {}
        try:
            for key in kr.iter_proc_keys():
                name = key.description
                if (
                    key.type == "keyring"
                    and name in wanted
                    and name not in found
                    and kr.is_keyring_named(key.serial, name)
                ):
                    found[name] = key.serial
        except kr.KeyringError as exc:
            log.warning("cannot list keyrings: %s", exc.strerror)
        return found

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
        """Keyrings searched for PSKs, in order, each at most once.

        Not the process keyring: it holds links to the ACCEPT keyrings of all
        past requests (see the module docstring)."""
        rings: list[int] = []
        if request_keyring:
            rings.append(request_keyring)
        resolved = self._resolve_all()
        rings += [resolved[name] for name in self.keyring_names if name in resolved]
        rings.append(kr.KEY_SPEC_SESSION_KEYRING)
        return list(dict.fromkeys(rings))

    def _possess_served(self, request_keyring: int | None = None) -> list[int]:
        rings = self.served_keyrings(request_keyring)
        for ring in rings:
            self._possess(ring)
        return rings

    # --- KeyService ----------------------------------------------------------

    def read_key(self, serial: int, request_keyring: int | None = None) -> KeyMaterial:
        """Payload and description of key `serial`; KeyServiceError on failure.

        `request_keyring`, the ACCEPT's keyring, is possessed too if reading
        needs possession (a key only its possessor may read, in that keyring)."""
        try:
            payload = self._read_possessed(serial, request_keyring)
            description = kr.describe_key(serial).description
        except kr.KeyringError as exc:
            err = exc.errno if exc.errno in _KEY_ERRNOS else errno.EIO
            raise KeyServiceError(str(exc), err) from None
        return KeyMaterial(serial, description.rsplit(";", 1)[-1], payload)

    def _read_possessed(self, serial: int, request_keyring: int | None) -> bytes:
        try:
            return kr.read_key(serial)
        except kr.KeyringError as exc:
            if exc.errno != errno.EACCES:
                raise
        # readable only by a possessor: take possession of the served keyrings
        self._possess_served(request_keyring)
        return kr.read_key(serial)

    def search_psks(self, identities: Sequence[str], keyring: int | None) -> KeyMaterial | None:
        """The key of the first of `identities` (at most MAX_PSK_IDENTITIES of
        them) found in the served keyrings, or None.  The keyrings are resolved
        once for all of them."""
        rings = self._possess_served(keyring)
        for identity in identities[:MAX_PSK_IDENTITIES]:
            for ring in rings:
                try:
                    serial = kr.search_keyring(ring, self.key_type, identity)
                except kr.KeyringError as exc:
                    log.debug("search of keyring %d for %r: %s", ring, identity, exc.strerror)
                    continue
                if serial is None:
                    continue
                try:
                    return self.read_key(serial, keyring)
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

    def answer(self, scope: RequestScope, request: KeyRequest) -> KeyReply:
        """Answer one (already validated, tlshd.ipc.KeyRequest.from_message)
        worker request within its handshake's `scope`; refusals get EACCES."""
        if request.op == "key_read":
            return self._answer_key_read(request.serial, scope)
        if request.op == "psk_search":
            return self._answer_psk_search(request, scope)
        if request.op == "add_cert":
            return self._answer_add_cert(request)
        return KeyReply.failure(errno.EINVAL)

    def _answer_key_read(self, serial: int, scope: RequestScope) -> KeyReply:
        if serial not in scope.allowed_serials:
            log.warning("worker asked for key %d, which its request did not name", serial)
            return KeyReply.failure(errno.EACCES, serial)
        try:
            return KeyReply.of(self.read_key(serial, scope.keyring))
        except KeyServiceError as exc:
            return KeyReply.failure(exc.errno, serial)

    def _answer_psk_search(self, request: KeyRequest, scope: RequestScope) -> KeyReply:
        if not scope.psk_search:
            log.warning("worker asked for a PSK search outside a PSK server handshake")
            return KeyReply.failure(errno.EACCES)
        if scope.psk_searched:
            log.warning("worker asked for a second PSK search in one request")
            return KeyReply.failure(errno.EACCES)
        if request.keyring is not None and request.keyring != scope.keyring:
            log.warning("worker asked to search keyring %d, not its request's", request.keyring)
            return KeyReply.failure(errno.EACCES)
        scope.psk_searched = True
        return KeyReply.of(self.search_psks(request.identities, request.keyring))

    def _answer_add_cert(self, request: KeyRequest) -> KeyReply:
        serial = self.add_peer_certificate(request.der, request.description)
        if serial == 0:
            return KeyReply.failure(errno.EKEYREJECTED)
        return KeyReply(True, 0, serial, request.description)
