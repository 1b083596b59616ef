"""The kernel channel: the `handshake` generic-netlink family.

Two netlink sockets, on purpose:

* the *notify* socket joins the `tlshd` multicast group and is only ever read
  non-blocking from the supervisor's poll loop (READY notifications);
* the *command* socket carries ACCEPT/DONE/GETFAMILY/GETPOLICY requests and
  their replies, blocking with a timeout, so a multicast notification can never
  be mistaken for (or interleave with) a reply.

The codec is hand-written, bounds-checked struct code rather than pyroute2's
message classes: every length in a reply is untrusted, and a single
`NetlinkDecodeError` (a ValueError) is the only exception the decoders raise.
pyroute2 is not imported here at all; the tests use it as an independent
oracle for the byte layout.

Wire layout (include/uapi/linux/netlink.h, genetlink.h), all host-endian:
  nlmsghdr  = u32 len, u16 type, u16 flags, u32 seq, u32 portid   (16 bytes)
  genlmsghdr = u8 cmd, u8 version, u16 reserved                    (4 bytes)
  nlattr    = u16 len, u16 type, payload, padded to 4 bytes
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict, TypeVar

from tlshd.params import HandshakeParams
from tlshd.uapi import (
    GENL_ID_CTRL,
    HANDSHAKE_FAMILY_NAME,
    HANDSHAKE_FAMILY_VERSION,
    HANDSHAKE_MCGRP_TLSHD,
    MAX_ERRNO,
    MAX_REMOTE_AUTH,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    SOL_NETLINK,
    AcceptAttr,
    DoneAttr,
    HandlerClass,
    HandshakeCmd,
    X509Attr,
)

log = logging.getLogger("tlshd.netlink")

_T = TypeVar("_T")

# include/uapi/linux/netlink.h
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NETLINK_CAP_ACK = 10
NLA_TYPE_MASK = 0x3FFF
NLA_F_NESTED = 0x8000

# include/uapi/linux/genetlink.h (the nlctrl family)
CTRL_CMD_GETFAMILY = 3
CTRL_CMD_GETPOLICY = 10
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_POLICY = 8
CTRL_ATTR_OP_POLICY = 9
CTRL_ATTR_OP = 10
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
CTRL_ATTR_POLICY_DO = 1
CTRL_VERSION = 2

_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")

RECV_BUFSIZE = 65536  # the kernel caps netlink dump skbs at 32 KiB
COMMAND_TIMEOUT_S = 5.0
MAX_NOTIFY_DATAGRAMS = 1024  # per read_notifications() call; the rest wait for the next poll
# Attributes the DONE op has known since v6.5, used when GETPOLICY is unavailable.
DEFAULT_DONE_MAXATTR = int(DoneAttr.REMOTE_AUTH)

FAMILY_MISSING_HINT = (
    f"the kernel has no '{HANDSHAKE_FAMILY_NAME}' generic netlink family with a "
    f"'{HANDSHAKE_MCGRP_TLSHD}' multicast group: "
    "tlshd needs Linux >= 6.5 with net/handshake and CONFIG_TLS"
)


class NetlinkDecodeError(ValueError):
    """Malformed netlink input.  `sockfd` is set when an ACCEPT reply was broken
    after a well-formed SOCKFD attribute: that fd was installed and must be failed."""

    def __init__(self, message: str, sockfd: int | None = None) -> None:
        super().__init__(message)
        self.sockfd = sockfd


class NetlinkError(OSError):
    """The kernel answered a request with NLMSG_ERROR; `extack` is its text, if any."""

    def __init__(self, err: int, what: str, extack: str | None = None) -> None:
        detail = f"{what}: {os.strerror(err)}"
        if extack:
            detail += f" ({extack})"
        super().__init__(err, detail)
        self.extack = extack


class HandshakeFamilyMissing(NetlinkError):
    """This kernel cannot upcall TLS handshakes."""

    def __init__(self, extack: str | None = None) -> None:
        OSError.__init__(self, errno.ENOENT, FAMILY_MISSING_HINT)
        self.extack = extack


# --------------------------------------------------------------------------
# Low-level TLV codec


@dataclass(frozen=True)
class NetlinkMessage:
    """One parsed netlink message; `payload` follows the 16-byte header."""

    type: int
    flags: int
    seq: int
    portid: int
    payload: bytes


def _align4(length: int) -> int:
    return (length + 3) & ~3


def encode_attr(attr_type: int, payload: bytes) -> bytes:
    """One nlattr, padded to 4 bytes."""
    length = _NLATTR.size + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"netlink attribute {attr_type} too long")
    return _NLATTR.pack(length, attr_type) + payload + b"\0" * (_align4(length) - length)


def encode_u32(attr_type: int, value: int) -> bytes:
    return encode_attr(attr_type, _U32.pack(value))


def encode_s32(attr_type: int, value: int) -> bytes:
    return encode_attr(attr_type, _S32.pack(value))


def encode_message(msg_type: int, flags: int, seq: int, payload: bytes, portid: int = 0) -> bytes:
    """A netlink message: header plus `payload` (which is already 4-aligned)."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, seq, portid) + payload


def encode_genl(
    family_id: int, cmd: int, version: int, seq: int, attrs: bytes, flags: int = NLM_F_REQUEST
) -> bytes:
    return encode_message(family_id, flags, seq, _GENLMSGHDR.pack(cmd, version, 0) + attrs)


def parse_messages(data: bytes) -> list[NetlinkMessage]:
    """Split one datagram into netlink messages; raises NetlinkDecodeError."""
    messages = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise NetlinkDecodeError(f"truncated netlink header at offset {offset}")
        length, msg_type, flags, seq, portid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or length > len(data) - offset:
            raise NetlinkDecodeError(f"bad netlink message length {length} at offset {offset}")
        payload = bytes(data[offset + _NLMSGHDR.size : offset + length])
        messages.append(NetlinkMessage(msg_type, flags, seq, portid, payload))
        offset += _align4(length)
    return messages


def iter_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (type & NLA_TYPE_MASK, payload) for each attribute; raises NetlinkDecodeError.

    Trailing bytes shorter than an attribute header are tolerated, as the
    kernel's nla_for_each_attr does; anything that claims more bytes than
    remain is rejected.
    """
    offset = 0
    while len(data) - offset >= _NLATTR.size:
        length, attr_type = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or length > len(data) - offset:
            raise NetlinkDecodeError(f"bad attribute length {length} at offset {offset}")
        yield attr_type & NLA_TYPE_MASK, bytes(data[offset + _NLATTR.size : offset + length])
        offset += _align4(length)


def _int_attr(payload: bytes, fmt: struct.Struct, name: str) -> int:
    if len(payload) != fmt.size:
        raise NetlinkDecodeError(f"attribute {name} has {len(payload)} bytes, not {fmt.size}")
    value: int = fmt.unpack(payload)[0]  # every format passed here is one integer
    return value


def _genl_attrs(msg: NetlinkMessage) -> tuple[int, bytes]:
    """(cmd, attribute bytes) of a generic netlink message."""
    if len(msg.payload) < _GENLMSGHDR.size:
        raise NetlinkDecodeError("truncated generic netlink header")
    cmd, _version, _reserved = _GENLMSGHDR.unpack_from(msg.payload)
    return cmd, msg.payload[_GENLMSGHDR.size :]


def _string_attr(payload: bytes) -> str:
    """A NLA_NUL_STRING: up to the first NUL.  Invalid UTF-8 is replaced, which
    can never match a certificate name, so verification fails closed."""
    return payload.split(b"\0", 1)[0].decode("utf-8", errors="replace")


@dataclass(frozen=True)
class NetlinkAck:
    """A parsed NLMSG_ERROR: `error` is a positive errno, 0 for an ACK."""

    error: int
    extack: str | None


def decode_error(msg: NetlinkMessage) -> NetlinkAck:
    """Parse NLMSG_ERROR: s32 -errno, the echoed request, then extack TLVs."""
    payload = msg.payload
    if len(payload) < 4 + _NLMSGHDR.size:
        raise NetlinkDecodeError("truncated NLMSG_ERROR")
    (error,) = _S32.unpack_from(payload)
    if error > 0 or error < -MAX_ERRNO:
        raise NetlinkDecodeError(f"NLMSG_ERROR with impossible error {error}")
    extack = None
    if msg.flags & NLM_F_ACK_TLVS:
        echoed = _NLMSGHDR.size
        if not msg.flags & NLM_F_CAPPED:
            # Uncapped errors echo the whole request; its length is in its header.
            (echoed,) = _U32.unpack_from(payload, 4)
        tlv_start = 4 + _align4(echoed)
        if echoed < _NLMSGHDR.size or tlv_start > len(payload):
            raise NetlinkDecodeError("NLMSG_ERROR echo longer than the message")
        for attr_type, value in iter_attrs(payload[tlv_start:]):
            if attr_type == NLMSGERR_ATTR_MSG:
                extack = _string_attr(value)
    return NetlinkAck(-error, extack)


# --------------------------------------------------------------------------
# The handshake family's messages


def encode_accept_request(family_id: int, seq: int) -> bytes:
    """ACCEPT carrying HANDLER_CLASS=TLSHD and nothing else: the op is strictly
    validated with maxattr HANDLER_CLASS, so any other attribute fails EINVAL."""
    attrs = encode_u32(AcceptAttr.HANDLER_CLASS, HandlerClass.TLSHD)
    return encode_genl(family_id, HandshakeCmd.ACCEPT, HANDSHAKE_FAMILY_VERSION, seq, attrs)


def _decode_certificate(nest: bytes) -> tuple[int, int]:
    cert = privkey = 0
    for attr_type, value in iter_attrs(nest):
        if attr_type == X509Attr.CERT:
            cert = _int_attr(value, _S32, "CERT")
        elif attr_type == X509Attr.PRIVKEY:
            privkey = _int_attr(value, _S32, "PRIVKEY")
    return cert, privkey


class _AcceptFields(TypedDict, total=False):
    """The HandshakeParams fields an ACCEPT reply may carry, as decoded so far."""

    message_type: int
    timeout_ms: int
    auth_mode: int
    cert_serial: int
    privkey_serial: int
    peername: str | None
    keyring: int


def decode_accept_attrs(attrs: bytes) -> HandshakeParams:
    """Decode the attribute area of an ACCEPT reply; unknown attributes are ignored."""
    fields: _AcceptFields = {}
    peer_identities: list[int] = []
    sockfd: int | None = None
    try:
        for attr_type, value in iter_attrs(attrs):
            if attr_type == AcceptAttr.SOCKFD:
                fd = _int_attr(value, _S32, "SOCKFD")
                if fd < 0:
                    raise NetlinkDecodeError(f"negative SOCKFD {fd}")
                sockfd = fd
            elif attr_type == AcceptAttr.MESSAGE_TYPE:
                fields["message_type"] = _int_attr(value, _U32, "MESSAGE_TYPE")
            elif attr_type == AcceptAttr.TIMEOUT:
                fields["timeout_ms"] = _int_attr(value, _U32, "TIMEOUT")
            elif attr_type == AcceptAttr.AUTH_MODE:
                fields["auth_mode"] = _int_attr(value, _U32, "AUTH_MODE")
            elif attr_type == AcceptAttr.PEER_IDENTITY:
                # Multi-attr: keep every serial (upstream tlshd keeps only the last).
                peer_identities.append(_int_attr(value, _U32, "PEER_IDENTITY"))
            elif attr_type == AcceptAttr.CERTIFICATE:
                fields["cert_serial"], fields["privkey_serial"] = _decode_certificate(value)
            elif attr_type == AcceptAttr.PEERNAME:
                fields["peername"] = _string_attr(value) or None
            elif attr_type == AcceptAttr.KEYRING:
                fields["keyring"] = _int_attr(value, _U32, "KEYRING")
    except NetlinkDecodeError as err:
        raise NetlinkDecodeError(str(err), sockfd) from None
    if sockfd is None:
        raise NetlinkDecodeError("ACCEPT reply without SOCKFD")
    return HandshakeParams(sockfd=sockfd, peer_identities=tuple(peer_identities), **fields)


def decode_accept_message(msg: NetlinkMessage, family_id: int | None) -> HandshakeParams:
    if family_id is not None and msg.type != family_id:
        raise NetlinkDecodeError(f"message type {msg.type} is not the handshake family")
    if msg.type < 0x10:  # NLMSG_* control messages are below NLMSG_MIN_TYPE
        raise NetlinkDecodeError(f"control message {msg.type}, not an ACCEPT reply")
    cmd, attrs = _genl_attrs(msg)
    if cmd != HandshakeCmd.ACCEPT:
        raise NetlinkDecodeError(f"genl command {cmd} is not ACCEPT")
    return decode_accept_attrs(attrs)


def decode_ready(msg: NetlinkMessage) -> int:
    """The HANDLER_CLASS of a READY notification; raises NetlinkDecodeError."""
    cmd, attrs = _genl_attrs(msg)
    if cmd != HandshakeCmd.READY:
        raise NetlinkDecodeError(f"genl command {cmd} is not READY")
    for attr_type, value in iter_attrs(attrs):
        if attr_type == AcceptAttr.HANDLER_CLASS:
            return _int_attr(value, _U32, "HANDLER_CLASS")
    raise NetlinkDecodeError("READY without HANDLER_CLASS")


def check_done_status(status: int) -> int:
    """DONE's STATUS is a positive errno or 0; the kernel bounds it by MAX_ERRNO."""
    if not 0 <= status <= MAX_ERRNO:
        raise ValueError(f"DONE status {status} outside 0..{MAX_ERRNO}")
    return status


def encode_done(
    family_id: int,
    seq: int,
    sockfd: int,
    status: int,
    remote_auth: Sequence[int] = (),
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
) -> bytes:
    """DONE: STATUS, SOCKFD, then REMOTE_AUTH per serial (only sent on success)."""
    check_done_status(status)
    attrs = encode_u32(DoneAttr.STATUS, status) + encode_s32(DoneAttr.SOCKFD, sockfd)
    if status == 0:
        for serial in remote_auth:
            if not 0 <= serial <= 0xFFFFFFFF:
                raise ValueError(f"REMOTE_AUTH serial {serial} is not a u32")
            attrs += encode_u32(DoneAttr.REMOTE_AUTH, serial)
    return encode_genl(family_id, HandshakeCmd.DONE, HANDSHAKE_FAMILY_VERSION, seq, attrs, flags)


def encode_getfamily(seq: int, name: str = HANDSHAKE_FAMILY_NAME) -> bytes:
    attrs = encode_attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
    return encode_genl(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, seq, attrs)


@dataclass(frozen=True)
class FamilyInfo:
    family_id: int
    mcast_groups: dict[str, int]


def decode_family(msg: NetlinkMessage) -> FamilyInfo:
    """A CTRL_CMD_NEWFAMILY reply: the family id and its multicast groups."""
    _cmd, attrs = _genl_attrs(msg)
    family_id = None
    groups: dict[str, int] = {}
    for attr_type, value in iter_attrs(attrs):
        if attr_type == CTRL_ATTR_FAMILY_ID:
            family_id = _int_attr(value, _U16, "CTRL_ATTR_FAMILY_ID")
        elif attr_type == CTRL_ATTR_MCAST_GROUPS:
            for _index, group in iter_attrs(value):
                name, grp_id = _decode_mcast_group(group)
                if name is not None and grp_id is not None:
                    groups[name] = grp_id
    if family_id is None:
        raise NetlinkDecodeError("GETFAMILY reply without a family id")
    return FamilyInfo(family_id, groups)


def _decode_mcast_group(group: bytes) -> tuple[str | None, int | None]:
    name = grp_id = None
    for attr_type, value in iter_attrs(group):
        if attr_type == CTRL_ATTR_MCAST_GRP_NAME:
            name = _string_attr(value)
        elif attr_type == CTRL_ATTR_MCAST_GRP_ID:
            grp_id = _int_attr(value, _U32, "CTRL_ATTR_MCAST_GRP_ID")
    return name, grp_id


def encode_getpolicy(seq: int, family_id: int, op: int) -> bytes:
    """CTRL_CMD_GETPOLICY for one op (a dump; per-op filtering needs CTRL_ATTR_OP)."""
    attrs = encode_attr(CTRL_ATTR_FAMILY_ID, _U16.pack(family_id))
    attrs += encode_u32(CTRL_ATTR_OP, op)
    return encode_genl(
        GENL_ID_CTRL, CTRL_CMD_GETPOLICY, CTRL_VERSION, seq, attrs, NLM_F_REQUEST | NLM_F_DUMP
    )


class PolicyDump:
    """Accumulates a GETPOLICY dump: which policy index an op's `do` uses, and
    which attribute types each policy index lists (net/netlink/policy.c writes
    one CTRL_ATTR_POLICY{policy_idx{attr_type{...}}} per message and skips
    NLA_UNSPEC/NLA_REJECT entries, so the highest listed type is the maxattr)."""

    def __init__(self) -> None:
        self.do_policy: dict[int, int] = {}
        self.policy_attrs: dict[int, set[int]] = {}

    def add(self, msg: NetlinkMessage) -> None:
        _cmd, attrs = _genl_attrs(msg)
        for attr_type, value in iter_attrs(attrs):
            if attr_type == CTRL_ATTR_OP_POLICY:
                for op, op_attrs in iter_attrs(value):
                    for kind, idx in iter_attrs(op_attrs):
                        if kind == CTRL_ATTR_POLICY_DO:
                            self.do_policy[op] = _int_attr(idx, _U32, "CTRL_ATTR_POLICY_DO")
            elif attr_type == CTRL_ATTR_POLICY:
                for policy_idx, policy in iter_attrs(value):
                    listed = self.policy_attrs.setdefault(policy_idx, set())
                    listed.update(attr for attr, _spec in iter_attrs(policy))

    def maxattr(self, op: int) -> int | None:
        """The highest attribute type `op`'s do-policy accepts; 0 if it has none."""
        if op not in self.do_policy:
            return None
        return max(self.policy_attrs.get(self.do_policy[op], ()), default=0)


# --------------------------------------------------------------------------
# Transports


class NetlinkTransport(Protocol):
    """What HandshakeNetlink needs from a socket; one datagram per send/recv."""

    def send(self, data: bytes) -> None: ...

    def recv(self) -> bytes: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...

    def setblocking(self, flag: bool) -> None: ...

    def settimeout(self, timeout: float | None) -> None: ...

    def add_membership(self, group_id: int) -> None: ...


class SocketTransport:
    """What every transport does by passing it on to the socket it wraps."""

    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)


class RealNetlinkTransport(SocketTransport):
    """A stdlib AF_NETLINK/NETLINK_GENERIC socket bound to a kernel-chosen portid."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self.sock.bind((0, 0))
            self._enable_ext_ack()
        except OSError:
            self.sock.close()
            raise

    def _enable_ext_ack(self) -> None:
        # Extended ACKs carry the kernel's reason for an EINVAL (e.g. which
        # attribute strict validation rejected); CAP_ACK stops errors echoing
        # the whole request.  Both exist since v4.12/v4.3; best effort.
        for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(SOL_NETLINK, option, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (0, 0))

    def recv(self) -> bytes:
        data, _anc, msg_flags, _addr = self.sock.recvmsg(RECV_BUFSIZE)
        if msg_flags & socket.MSG_TRUNC:
            raise NetlinkDecodeError("netlink datagram truncated by the receive buffer")
        return data

    def add_membership(self, group_id: int) -> None:
        # setsockopt rather than bind()'s 32-bit group mask: genl group ids can exceed 31.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group_id)


# --------------------------------------------------------------------------
# The daemon's view of the family


@dataclass(frozen=True)
class NotificationBatch:
    """What one drain of the notify socket found."""

    ready: int = 0
    overrun: bool = False
    malformed: int = 0
    ignored: int = 0

    @property
    def should_accept(self) -> bool:
        """True when ACCEPT should be called until EAGAIN."""
        return self.ready > 0 or self.overrun


def normalize_status(status: int) -> int:
    """Map whatever a caller passes to a valid DONE STATUS; out of range → EIO."""
    if status < 0:
        status = -status
    if status > MAX_ERRNO:
        log.error("DONE status %d out of range, sending EIO", status)
        return errno.EIO
    return status


class HandshakeNetlink:
    """ACCEPT/DONE over two netlink sockets; see the module docstring."""

    def __init__(
        self,
        notify_transport: NetlinkTransport | None = None,
        cmd_transport: NetlinkTransport | None = None,
    ) -> None:
        self._notify = notify_transport
        self._cmd = cmd_transport
        self._seq = 0
        self.family_id: int | None = None
        self.group_id: int | None = None
        self._done_maxattr: int | None = None
        self._stale_accepts: list[HandshakeParams] = []

    # -- lifecycle

    def open(self) -> None:
        """Resolve the family and its `tlshd` group, join it, and probe DONE's attributes.

        Raises HandshakeFamilyMissing on kernels without net/handshake, and
        OSError/NetlinkError otherwise; call close() afterwards either way."""
        if self._notify is None:
            self._notify = RealNetlinkTransport()
        if self._cmd is None:
            self._cmd = RealNetlinkTransport()
        self._cmd.settimeout(COMMAND_TIMEOUT_S)
        info = self.resolve_family(HANDSHAKE_FAMILY_NAME)
        group_id = info.mcast_groups.get(HANDSHAKE_MCGRP_TLSHD)
        if group_id is None:
            raise HandshakeFamilyMissing()
        self._notify.add_membership(group_id)
        self._notify.setblocking(False)
        self.family_id = info.family_id
        self.group_id = group_id
        self._done_maxattr = self.probe_done_attrs()

    def close(self) -> None:
        for transport in (self._notify, self._cmd):
            if transport is not None:
                transport.close()
        self._notify = self._cmd = None

    def fileno(self) -> int:
        """The notify socket (non-blocking), for select/poll."""
        return self._require(self._notify).fileno()

    # -- notifications

    def read_notifications(self) -> NotificationBatch:
        """Drain the notify socket without blocking; never raises on bad input."""
        notify = self._require(self._notify)
        ready = malformed = ignored = 0
        overrun = False
        for _ in range(MAX_NOTIFY_DATAGRAMS):
            try:
                data = notify.recv()
            except (BlockingIOError, InterruptedError):
                break
            except NetlinkDecodeError as err:
                malformed += 1
                log.warning("netlink notification: %s", err)
                continue
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                # The receive queue overflowed: READYs were dropped, so the
                # caller cannot know how many requests wait.
                overrun = True
                continue
            r, m, i = self._classify_notifications(data)
            ready, malformed, ignored = ready + r, malformed + m, ignored + i
        return NotificationBatch(ready, overrun, malformed, ignored)

    def _classify_notifications(self, data: bytes) -> tuple[int, int, int]:
        try:
            messages = parse_messages(data)
        except NetlinkDecodeError as err:
            log.warning("malformed netlink notification: %s", err)
            return 0, 1, 0
        ready = malformed = ignored = 0
        for msg in messages:
            if msg.type != self.family_id:
                ignored += 1
                continue
            try:
                handler_class = decode_ready(msg)
            except NetlinkDecodeError as err:
                log.warning("malformed READY notification: %s", err)
                malformed += 1
                continue
            if handler_class == HandlerClass.TLSHD:
                ready += 1
            else:
                ignored += 1
        return ready, malformed, ignored

    # -- commands

    def accept(self) -> HandshakeParams | None:
        """ACCEPT the next pending request; None when there is none (EAGAIN).

        Raises NetlinkError for any other kernel error (ETIMEDOUT if no reply
        came) and NetlinkDecodeError for a malformed reply, after failing the
        fd it installed with DONE(EIO)."""
        family_id = self._require(self.family_id)
        seq = self._next_seq()
        self._send(encode_accept_request(family_id, seq))
        try:
            for msg in self._replies(seq, "ACCEPT"):
                if msg.type == NLMSG_ERROR:
                    ack = self._decode_ack(msg)
                    if ack.error == errno.EAGAIN:
                        return None
                    raise NetlinkError(ack.error or errno.EPROTO, "ACCEPT", ack.extack)
                return self._accepted(msg, family_id)
            raise NetlinkError(errno.EPROTO, "ACCEPT: no reply")  # pragma: no cover
        finally:
            self._fail_stale_accepts()

    def _accepted(self, msg: NetlinkMessage, family_id: int) -> HandshakeParams:
        try:
            return decode_accept_message(msg, family_id)
        except NetlinkDecodeError as err:
            log.error("malformed ACCEPT reply: %s", err)
            if err.sockfd is not None:
                self._fail_installed_fd(err.sockfd)
            raise

    def done(self, sockfd: int, status: int, remote_auth: Sequence[int] = ()) -> None:
        """DONE for `sockfd` (still open in this process); raises NetlinkError if rejected."""
        family_id = self._require(self.family_id)
        status = normalize_status(status)
        remote_auth = self._sendable_remote_auth(status, remote_auth)
        seq = self._next_seq()
        self._send(encode_done(family_id, seq, sockfd, status, remote_auth))
        for msg in self._replies(seq, "DONE"):
            if msg.type == NLMSG_ERROR:
                ack = self._decode_ack(msg)
                if ack.error:
                    raise NetlinkError(ack.error, "DONE", ack.extack)
                return
            # DONE has no reply message, only the ACK; skip anything else.

    def _sendable_remote_auth(self, status: int, remote_auth: Sequence[int]) -> list[int]:
        if status != 0 or not remote_auth:
            return []
        if self.done_maxattr() < DoneAttr.REMOTE_AUTH:
            log.warning("kernel DONE does not take REMOTE_AUTH; peer identity not reported")
            return []
        serials = [serial for serial in remote_auth if 0 <= serial <= 0xFFFFFFFF]
        if len(serials) != len(remote_auth):
            log.error("dropping REMOTE_AUTH serials that are not u32: %s", list(remote_auth))
        return serials[:MAX_REMOTE_AUTH]

    def done_maxattr(self) -> int:
        """The DONE op's maxattr, probed once; see probe_done_attrs()."""
        if self._done_maxattr is None:
            self._done_maxattr = self.probe_done_attrs()
        return self._done_maxattr

    def probe_done_attrs(self) -> int:
        """Ask CTRL_CMD_GETPOLICY for DONE's maxattr; without sending a DONE.

        Falls back to REMOTE_AUTH (present since v6.5) if the kernel cannot
        answer (per-op policy dumps need v5.12+ for CTRL_ATTR_OP)."""
        family_id = self._require(self.family_id)
        try:
            maxattr = self.probe_op_maxattr(family_id, HandshakeCmd.DONE)
        except (OSError, NetlinkDecodeError) as err:
            log.debug("GETPOLICY for DONE failed: %s", err)
            maxattr = None
        if maxattr is None or maxattr < DoneAttr.SOCKFD:
            maxattr = DEFAULT_DONE_MAXATTR
        log.debug("kernel DONE accepts attributes up to type %d", maxattr)
        return maxattr

    def probe_op_maxattr(self, family_id: int, op: int) -> int | None:
        """The highest attribute type `op` of `family_id` accepts (None if unknown)."""
        seq = self._next_seq()
        self._send(encode_getpolicy(seq, family_id, op))
        dump = PolicyDump()
        for msg in self._replies(seq, "GETPOLICY"):
            if msg.type == NLMSG_DONE:
                break
            if msg.type == NLMSG_ERROR:
                ack = self._decode_ack(msg)
                raise NetlinkError(ack.error or errno.EPROTO, "GETPOLICY", ack.extack)
            dump.add(msg)
        return dump.maxattr(op)

    def resolve_family(self, name: str) -> FamilyInfo:
        """CTRL_CMD_GETFAMILY: raises HandshakeFamilyMissing if `name` is unknown (ENOENT)."""
        seq = self._next_seq()
        self._send(encode_getfamily(seq, name))
        for msg in self._replies(seq, "GETFAMILY"):
            if msg.type == NLMSG_ERROR:
                ack = self._decode_ack(msg)
                if ack.error == errno.ENOENT:
                    raise HandshakeFamilyMissing(ack.extack)
                raise NetlinkError(ack.error or errno.EPROTO, "GETFAMILY", ack.extack)
            if msg.type == GENL_ID_CTRL:
                return decode_family(msg)
        raise NetlinkError(errno.EPROTO, "GETFAMILY: no reply")  # pragma: no cover

    # -- plumbing

    def _replies(self, seq: int, what: str) -> Iterator[NetlinkMessage]:
        """Messages answering `seq`, until the caller stops iterating.

        Replies to other sequence numbers are late answers to a request that
        timed out; an ACCEPT among them has installed an fd we must fail."""
        cmd = self._require(self._cmd)
        while True:
            try:
                data = cmd.recv()
            except TimeoutError:
                raise NetlinkError(errno.ETIMEDOUT, f"{what}: no reply from the kernel") from None
            for msg in parse_messages(data):
                if msg.seq == seq:
                    yield msg
                else:
                    self._note_stale(msg)

    def _note_stale(self, msg: NetlinkMessage) -> None:
        if msg.type != self.family_id:
            return
        try:
            self._stale_accepts.append(decode_accept_message(msg, self.family_id))
        except NetlinkDecodeError as err:
            if err.sockfd is not None:
                self._stale_accepts.append(HandshakeParams(sockfd=err.sockfd))

    def _fail_stale_accepts(self) -> None:
        while self._stale_accepts:
            params = self._stale_accepts.pop()
            log.error("late ACCEPT reply for fd %d; failing it", params.sockfd)
            self._fail_installed_fd(params.sockfd)

    def _fail_installed_fd(self, sockfd: int) -> None:
        """DONE(EIO) and close an fd the kernel installed but we cannot serve."""
        if not _is_socket(sockfd):
            return
        try:
            self.done(sockfd, errno.EIO)
        except OSError as err:
            log.error("DONE(EIO) for fd %d: %s", sockfd, err)
        finally:
            os.close(sockfd)

    @staticmethod
    def _decode_ack(msg: NetlinkMessage) -> NetlinkAck:
        ack = decode_error(msg)
        if ack.error and ack.extack:
            log.debug("netlink error %d: %s", ack.error, ack.extack)
        return ack

    def _send(self, data: bytes) -> None:
        self._require(self._cmd).send(data)

    def _next_seq(self) -> int:
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        return self._seq

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise RuntimeError("HandshakeNetlink is not open")
        return value


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
