"""TLS 1.3 external PSK (NVMe/TCP) through cryptography's cffi bindings.

pyOpenSSL has no PSK API, so the session callbacks are installed with
`OpenSSL._util.lib`.  OpenSSL describes an external PSK as an SSL_SESSION whose
cipher fixes the PSK's hash; SSL_SESSION_new is not bound, so a session is
taken from a throw-away client connection on memory BIOs that has written one
ClientHello, then given our key, cipher and version.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from tlshd.workers.tlsctx import ALERT_UNKNOWN_PSK_IDENTITY, TlsState, install_servername_callback

from tlshd.keys import KeyMaterial

TLS1_3_VERSION = 0x0304

# IANA code points of the suites a PSK session may name (RFC 8446 B.4)
_SUITE_IDS = {
    "TLS_AES_128_GCM_SHA256": b"\x13\x01",
    "TLS_AES_256_GCM_SHA384": b"\x13\x02",
}

# Offered suites per PSK hash.  Like upstream's psk_sha256/psk_sha384 lists, but
# without CHACHA20 in the SHA-384 list: its hash is SHA-256, so offering it with
# a SHA-384 PSK only invites a server to pick it and skip the PSK.  CHACHA20 is
# also left out of the SHA-256 list, as upstream does: NVMe/TCP (TP 8011) names
# only the AES-GCM suites, and AES-128-CCM is kept for parity with upstream.
PSK_SUITES = {
    "sha256": ("TLS_AES_128_GCM_SHA256", "TLS_AES_128_CCM_SHA256"),
    "sha384": ("TLS_AES_256_GCM_SHA384",),
}
# Server side.  OpenSSL picks the suite before it looks at the PSK extension and
# then skips a PSK whose hash differs from the suite's, so with client preference
# a client listing a SHA-384 suite first would lose its SHA-256 PSK.  Server
# preference in this order picks a SHA-256 suite whenever the client offers one
# and AES-256-GCM only for clients offering no SHA-256 suite (upstream tlshd's
# psk_sha384 list: AES-256-GCM, CHACHA20).  Limitation: a client offering both
# hashes with a SHA-384 PSK gets no PSK handshake.
SERVER_PSK_SUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)
# The cipher stored in the PSK session; only its hash matters to OpenSSL.
_SESSION_SUITE = {"sha256": "TLS_AES_128_GCM_SHA256", "sha384": "TLS_AES_256_GCM_SHA384"}

# "NVMe<version><R|G><hmac> <hostnqn> <subnqn>[ <digest>]" (NVMe TCP transport spec 3.6.1.3)
_NVME_IDENTITY = re.compile(r"NVMe(?P<version>[0-9])(?P<kind>[RG])(?P<hmac>[0-9]{2}) ")
_NVME_HMAC = {"01": "sha256", "02": "sha384"}


class PskError(Exception):
    """A PSK cannot be used as given (status EIO: no handshake is attempted)."""


@dataclass(frozen=True)
class Psk:
    serial: int
    identity: bytes
    key: bytes
    hash_name: str  # "sha256" | "sha384"


def identity_hash(identity: str, key_len: int) -> str:
    """The PSK hash: from an NVMe identity's hmac field, else from the key length.

    An NVMe identity with an hmac other than 01/02 is rejected (PskError), as
    upstream rejects it ("invalid key identity"); a non-NVMe identity with a
    48-byte key is taken as SHA-384, otherwise SHA-256.
    """
    if identity.startswith("NVMe"):
        match = _NVME_IDENTITY.match(identity)
        if match is None:
            raise PskError(f"invalid NVMe key identity {identity!r}")
        try:
            return _NVME_HMAC[match["hmac"]]
        except KeyError:
            raise PskError(
                f"NVMe key identity {identity!r} names unsupported hmac {match['hmac']}"
            ) from None
    return "sha384" if key_len == 48 else "sha256"


def psk_from_key(material: KeyMaterial) -> Psk:
    """Build a Psk from a keyring key (description = identity, payload = raw key)."""
    if not material.payload:
        raise PskError(f"PSK key {material.serial:#x} is empty")
    if not material.description:
        raise PskError(f"PSK key {material.serial:#x} has no description (identity)")
    hash_name = identity_hash(material.description, len(material.payload))
    return Psk(material.serial, material.description.encode(), material.payload, hash_name)


def suites_for(hash_name: str) -> tuple[str, ...]:
    return PSK_SUITES[hash_name]


def new_psk_session(key: bytes, hash_name: str) -> Any:
    """An owned `SSL_SESSION *` carrying `key` for TLS 1.3 with the hash's suite."""
    scratch = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    scratch.set_connect_state()
    # after the ClientHello is written (WantRead), the session object exists
    with contextlib.suppress(SSL.WantReadError):
        scratch.do_handshake()
    session = lib.SSL_get1_session(scratch._ssl)
    if session == ffi.NULL:
        raise PskError("OpenSSL created no session object")
    cipher = lib.SSL_CIPHER_find(scratch._ssl, _SUITE_IDS[_SESSION_SUITE[hash_name]])
    ok = (
        cipher != ffi.NULL
        and lib.SSL_SESSION_set1_master_key(session, key, len(key)) == 1
        and lib.SSL_SESSION_set_cipher(session, cipher) == 1
        and lib.SSL_SESSION_set_protocol_version(session, TLS1_3_VERSION) == 1
    )
    if not ok:
        lib.SSL_SESSION_free(session)
        raise PskError("cannot set up the PSK session")
    return session


def install_client_psk(ctx: SSL.Context, state: TlsState, psk: Psk) -> None:
    """Offer `psk` in every ClientHello (OpenSSL offers one external PSK per hello)."""
    identity_buf = ffi.new("unsigned char[]", psk.identity)
    state.keepalive.append(identity_buf)

    # A cffi callback: its types are the C signature given to ffi.callback.
    @ffi.callback("int(SSL *, EVP_MD *, unsigned char **, size_t *, SSL_SESSION **)")
    def use_session(_ssl, _md, id_out, idlen_out, sess_out):  # type: ignore[no-untyped-def]
        try:
            session = new_psk_session(psk.key, psk.hash_name)
        except Exception:
            return 0  # OpenSSL aborts the handshake with internal_error
        id_out[0] = identity_buf
        idlen_out[0] = len(psk.identity)
        sess_out[0] = session  # OpenSSL takes ownership
        state.psk_serial = psk.serial
        return 1

    state.keepalive.append(use_session)
    lib.SSL_CTX_set_psk_use_session_callback(ctx._context, use_session)


# ClientHello layout (RFC 8446 §4.1.2) and the pre_shared_key extension (§4.2.11)
EXT_PRE_SHARED_KEY = 41
_HANDSHAKE_HEADER = 4  # msg_type, uint24 length
_RANDOM_AND_VERSION = 2 + 32


def offered_identities(client_hello: bytes) -> list[bytes]:
    """The PSK identities a ClientHello handshake message offers, in order.

    [] when it has no pre_shared_key extension or is malformed (OpenSSL then
    rejects it anyway)."""
    try:
        view = memoryview(client_hello)
        pos = _HANDSHAKE_HEADER + _RANDOM_AND_VERSION
        _, pos = _vector(view, pos, 1)  # legacy_session_id
        _, pos = _vector(view, pos, 2)  # cipher_suites
        _, pos = _vector(view, pos, 1)  # legacy_compression_methods
        extensions, _ = _vector(view, pos, 2)
        pos = 0
        while pos < len(extensions):
            (ext_type,) = struct.unpack_from("!H", extensions, pos)
            data, pos = _vector(extensions, pos + 2, 2)
            if ext_type == EXT_PRE_SHARED_KEY:
                return _identities(data)
    except (struct.error, ValueError):
        pass
    return []


def _vector(view: memoryview, pos: int, length_size: int) -> tuple[memoryview, int]:
    """The opaque vector at `pos` with a `length_size`-byte length, and the position after it."""
    if pos + length_size > len(view):
        raise ValueError("truncated")
    length = int.from_bytes(view[pos : pos + length_size], "big")
    start = pos + length_size
    if start + length > len(view):
        raise ValueError("truncated")
    return view[start : start + length], start + length


def _identities(extension: memoryview) -> list[bytes]:
    listing, _ = _vector(extension, 0, 2)  # identities<7..2^16-1>
    found: list[bytes] = []
    pos = 0
    while pos < len(listing):
        identity, pos = _vector(listing, pos, 2)
        pos += 4  # obfuscated_ticket_age
        found.append(bytes(identity))
    return found


def install_server_psk(
    ctx: SSL.Context,
    state: TlsState,
    search: Callable[[Sequence[str]], KeyMaterial | None],
) -> None:
    """Serve the PSK of the first offered identity that `search` finds; abort
    with unknown_psk_identity (RFC 8446 §4.2.11) when the client offered
    identities and none is known.

    `search` is asked once per handshake, with every identity the ClientHello
    offered (the supervisor allows one search per request, see
    supervisor/keyservice.RequestScope); OpenSSL then calls back per identity
    and is given the session only for the one found."""
    found: list[KeyMaterial | None] = []

    def lookup(identity: str) -> KeyMaterial | None:
        if not found:
            offered = offered_identities(state.client_hello or b"")
            texts = [text for text in map(_utf8, offered) if text is not None]
            found.append(search(texts or [identity]))
        material = found[0]
        return material if material is not None and material.description == identity else None

    # A cffi callback: its types are the C signature given to ffi.callback.
    @ffi.callback("int(SSL *, unsigned char *, size_t, SSL_SESSION **)")
    def find_session(_ssl, identity, identity_len, sess_out):  # type: ignore[no-untyped-def]
        sess_out[0] = ffi.NULL
        state.psk_identities_seen += 1
        try:
            text = bytes(ffi.buffer(identity, identity_len)).decode("utf-8")
            material = lookup(text)
            if material is None:
                return 1  # not ours: OpenSSL tries the next identity
            psk = psk_from_key(material)
            sess_out[0] = new_psk_session(psk.key, psk.hash_name)
        except Exception:
            return 1  # an unusable key is treated like an unknown one
        state.psk_serial = psk.serial
        return 1

    def decide_alert() -> int | None:
        if state.psk_identities_seen and state.psk_serial is None:
            return ALERT_UNKNOWN_PSK_IDENTITY
        return None

    state.keepalive.append(find_session)
    lib.SSL_CTX_set_psk_find_session_callback(ctx._context, find_session)
    install_servername_callback(ctx, state, decide_alert)


def _utf8(identity: bytes) -> str | None:
    try:
        return identity.decode("utf-8")
    except UnicodeDecodeError:
        return None
