"""Server identity checks for the client role: PEERNAME against the certificate.

The check runs inside the handshake (X509_VERIFY_PARAM_set1_host/_ip), so a
mismatch aborts before our Finished, like GnuTLS's verify_peers3 upstream.  An
IP literal must match an IP SAN: upstream dropped reverse-DNS conversion of IP
peer names as insecure (ktls-utils issue #22).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from tlshd.workers.tlsctx import X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS


@dataclass(frozen=True)
class PeerName:
    """A peer name as the kernel gave it, classified."""

    text: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None

    @property
    def is_dns(self) -> bool:
        return self.ip is None


class PeerNameError(ValueError):
    pass


def parse_peername(name: str) -> PeerName:
    """Classify `name` as an IP literal ("[::1]" and "fe80::1%eth0" included) or a DNS name."""
    text = name.strip()
    if not text:
        raise PeerNameError("empty peer name")
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    candidate = candidate.split("%", 1)[0]
    try:
        return PeerName(text, ipaddress.ip_address(candidate))
    except ValueError:
        pass
    dns = text.rstrip(".")
    if not dns or any(c.isspace() or c in "/\\@" for c in dns):
        raise PeerNameError(f"peer name {name!r} is neither a host name nor an IP address")
    return PeerName(dns, None)


def expect_peer(conn: SSL.Connection, peer: PeerName) -> None:
    """Make OpenSSL check the server certificate against `peer` and send SNI for DNS names.

    SNI must not carry IP literals (RFC 6066 §3).
    """
    param = lib.SSL_get0_param(conn._ssl)
    if param == ffi.NULL:
        raise PeerNameError("SSL_get0_param returned NULL")
    if peer.ip is None:
        encoded = peer.text.encode("idna") if not peer.text.isascii() else peer.text.encode()
        lib.X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        ok = lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
        conn.set_tlsext_host_name(encoded)
    else:
        packed = peer.ip.packed
        ok = lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise PeerNameError(f"OpenSSL rejected the peer name {peer.text!r}")
