"""Kernel-side and test-side helpers of the handshake netlink codec.

The daemon only decodes ACCEPT replies and READY notifications as they come
off its socket (tlshd/netlink.py); these build what the kernel sends, or
decode a whole datagram in one call, for the fake kernel and the codec tests.
"""

from __future__ import annotations

from tlshd import netlink as nl
from tlshd.params import HandshakeParams
from tlshd.uapi import HANDSHAKE_FAMILY_VERSION, AcceptAttr, HandlerClass, HandshakeCmd


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    return list(nl.iter_attrs(data))


def decode_accept_reply(data: bytes, family_id: int | None = None) -> HandshakeParams:
    """Decode one ACCEPT reply message (netlink header included)."""
    messages = nl.parse_messages(data)
    if len(messages) != 1:
        raise nl.NetlinkDecodeError(f"expected one ACCEPT reply, got {len(messages)} messages")
    return nl.decode_accept_message(messages[0], family_id)


def encode_ready(family_id: int, handler_class: int = HandlerClass.TLSHD) -> bytes:
    """A READY notification as the kernel multicasts it (seq 0, portid 0)."""
    attrs = nl.encode_u32(AcceptAttr.HANDLER_CLASS, handler_class)
    return nl.encode_genl(
        family_id, HandshakeCmd.READY, HANDSHAKE_FAMILY_VERSION, 0, attrs, flags=0
    )
