"""The handshake genl codec against hand-built struct bytes (kernel-protocol.md §1)
and against pyroute2's message classes as an independent encoder/decoder."""

from __future__ import annotations

import contextlib
import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import nlhelpers
from tlshd import netlink as nl
from tlshd.netlink import NetlinkDecodeError
from tlshd.params import HandshakeParams

FAMILY = 0x1D


def nlattr(attr_type: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)


def u32(attr_type: int, value: int) -> bytes:
    return nlattr(attr_type, struct.pack("=I", value))


def s32(attr_type: int, value: int) -> bytes:
    return nlattr(attr_type, struct.pack("=i", value))


def genl(msg_type: int, cmd: int, attrs: bytes, flags: int = 0, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def full_reply_attrs(sockfd: int = 7) -> bytes:
    cert_nest = s32(1, 111) + s32(2, 222)
    return (
        s32(1, sockfd)
        + u32(3, 2)  # MESSAGE_TYPE = SERVERHELLO
        + nlattr(8, b"nfs.example.org\0")
        + u32(4, 10000)
        + u32(9, 0x2F0000AA)
        + u32(5, 3)  # AUTH_MODE = X509
        + u32(6, 41)
        + u32(6, 42)
        + u32(6, 43)
        + nlattr(7 | 0x8000, cert_nest)
    )


# -- encoders, byte-exact


def test_accept_request_is_handler_class_only() -> None:
    expected = genl(FAMILY, 2, u32(2, 1), flags=1, seq=9)
    assert nl.encode_accept_request(FAMILY, 9) == expected
    assert len(expected) == 16 + 4 + 8


def test_done_encoding_with_remote_auth() -> None:
    attrs = u32(1, 0) + s32(2, 12) + u32(3, 0xFFFFFFFF) + u32(3, 5)
    expected = genl(FAMILY, 3, attrs, flags=1 | 4, seq=3)
    assert nl.encode_done(FAMILY, 3, 12, 0, [0xFFFFFFFF, 5]) == expected


def test_done_drops_remote_auth_on_failure() -> None:
    expected = genl(FAMILY, 3, u32(1, errno.EACCES) + s32(2, 12), flags=5, seq=4)
    assert nl.encode_done(FAMILY, 4, 12, errno.EACCES, [99]) == expected


@pytest.mark.parametrize("status", [-1, 4096, 1 << 32])
def test_done_rejects_status_out_of_range(status: int) -> None:
    with pytest.raises(ValueError):
        nl.encode_done(FAMILY, 1, 3, status)


def test_done_rejects_serial_not_u32() -> None:
    with pytest.raises(ValueError):
        nl.encode_done(FAMILY, 1, 3, 0, [1 << 32])


@pytest.mark.parametrize(
    ("given", "sent"),
    [(0, 0), (errno.EACCES, errno.EACCES), (-errno.EIO, errno.EIO), (5000, errno.EIO)],
)
def test_normalize_status(given: int, sent: int) -> None:
    assert nl.normalize_status(given) == sent


def test_getfamily_encoding() -> None:
    expected = genl(0x10, 3, nlattr(2, b"handshake\0"), flags=1, seq=1)
    expected = expected[:17] + b"\x02" + expected[18:]  # nlctrl version 2
    assert nl.encode_getfamily(1) == expected


def test_getpolicy_encoding_names_family_and_op() -> None:
    data = nl.encode_getpolicy(5, FAMILY, 3)
    (msg,) = nl.parse_messages(data)
    assert msg.type == 0x10 and msg.flags == 1 | 0x300 and msg.seq == 5
    assert msg.payload[0] == 10
    attrs = nlhelpers.parse_attrs(msg.payload[4:])
    assert attrs == [(1, struct.pack("=H", FAMILY)), (10, struct.pack("=I", 3))]
    # A u16 attribute is 6 bytes long, padded to 8: strict policies reject len 8.
    assert struct.unpack_from("=H", msg.payload, 4)[0] == 6


# -- pyroute2 as an independent oracle


def _pyroute2_classes():  # type: ignore[no-untyped-def]
    from pyroute2.netlink import genlmsg, nla

    class AcceptMsg(genlmsg):
        nla_map = (
            (0, "UNSPEC", "none"),
            (1, "SOCKFD", "int32"),
            (2, "HANDLER_CLASS", "uint32"),
            (3, "MESSAGE_TYPE", "uint32"),
            (4, "TIMEOUT", "uint32"),
            (5, "AUTH_MODE", "uint32"),
            (6, "PEER_IDENTITY", "uint32"),
            (7, "CERTIFICATE", "x509"),
            (8, "PEERNAME", "asciiz"),
            (9, "KEYRING", "uint32"),
        )

        class x509(nla):  # pyroute2 resolves 'x509' by this name
            nla_flags = 0x8000
            nla_map = ((0, "UNSPEC", "none"), (1, "CERT", "int32"), (2, "PRIVKEY", "int32"))

    class DoneMsg(genlmsg):
        nla_map = (
            (0, "UNSPEC", "none"),
            (1, "STATUS", "uint32"),
            (2, "SOCKFD", "int32"),
            (3, "REMOTE_AUTH", "uint32"),
        )

    return AcceptMsg, DoneMsg


def _pyroute2_encode(cls, cmd: int, attrs: list, flags: int, seq: int) -> bytes:  # type: ignore[no-untyped-def]
    msg = cls()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = attrs
    msg["header"]["type"] = FAMILY
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def test_pyroute2_agrees_on_accept_request_and_done() -> None:
    accept_cls, done_cls = _pyroute2_classes()
    accept = _pyroute2_encode(accept_cls, 2, [("HANDLER_CLASS", 1)], 1, 7)
    assert nl.encode_accept_request(FAMILY, 7) == accept
    done = _pyroute2_encode(
        done_cls, 3, [("STATUS", 0), ("SOCKFD", 9), ("REMOTE_AUTH", 4), ("REMOTE_AUTH", 8)], 5, 2
    )
    assert nl.encode_done(FAMILY, 2, 9, 0, [4, 8]) == done


def test_pyroute2_reply_decodes_with_ours() -> None:
    accept_cls, _ = _pyroute2_classes()
    data = _pyroute2_encode(
        accept_cls,
        2,
        [
            ("SOCKFD", 5),
            ("MESSAGE_TYPE", 1),
            ("PEERNAME", "server.example"),
            ("AUTH_MODE", 2),
            ("PEER_IDENTITY", 10),
            ("PEER_IDENTITY", 20),
        ],
        0,
        1,
    )
    params = nlhelpers.decode_accept_reply(data, FAMILY)
    assert params == HandshakeParams(
        sockfd=5, message_type=1, auth_mode=2, peername="server.example", peer_identities=(10, 20)
    )


def test_our_reply_decodes_with_pyroute2() -> None:
    accept_cls, _ = _pyroute2_classes()
    msg = accept_cls(genl(FAMILY, 2, full_reply_attrs()))
    msg.decode()
    assert msg.get_attr("SOCKFD") == 7
    assert list(msg.get_attrs("PEER_IDENTITY")) == [41, 42, 43]
    assert msg.get_attr("CERTIFICATE").get_attr("PRIVKEY") == 222


# -- ACCEPT reply decoding


def test_full_accept_reply() -> None:
    params = nlhelpers.decode_accept_reply(genl(FAMILY, 2, full_reply_attrs(7)), FAMILY)
    assert params == HandshakeParams(
        sockfd=7,
        message_type=2,
        auth_mode=3,
        timeout_ms=10000,
        peername="nfs.example.org",
        keyring=0x2F0000AA,
        peer_identities=(41, 42, 43),
        cert_serial=111,
        privkey_serial=222,
    )


def test_minimal_accept_reply_defaults() -> None:
    params = nlhelpers.decode_accept_reply(genl(FAMILY, 2, s32(1, 4) + u32(5, 1)))
    assert params == HandshakeParams(sockfd=4, auth_mode=1)
    assert params.timeout_ms is None and params.peername is None and params.keyring is None


def test_unknown_attributes_are_ignored() -> None:
    attrs = u32(200, 1) + s32(1, 3) + nlattr(0x3FFF, b"whatever") + nlattr(10, b"") + u32(5, 2)
    assert nlhelpers.decode_accept_reply(genl(FAMILY, 2, attrs)) == HandshakeParams(
        sockfd=3, auth_mode=2
    )


def test_certificate_nest_without_nested_flag_and_partial() -> None:
    attrs = s32(1, 3) + nlattr(7, s32(2, 55))
    params = nlhelpers.decode_accept_reply(genl(FAMILY, 2, attrs))
    assert (params.cert_serial, params.privkey_serial) == (0, 55)


def test_peername_forms() -> None:
    def peername(raw: bytes) -> str | None:
        return nlhelpers.decode_accept_reply(genl(FAMILY, 2, s32(1, 3) + nlattr(8, raw))).peername

    assert peername(b"host\0") == "host"
    assert peername(b"host") == "host"  # missing terminator tolerated
    assert peername(b"ho\0st\0") == "ho"
    assert peername(b"\0") is None
    assert peername(b"h\xffst\0") == "h\ufffdst"  # can never match a certificate name


def test_two_messages_in_one_datagram_are_split() -> None:
    one = genl(FAMILY, 2, s32(1, 3))
    messages = nl.parse_messages(one + one)
    assert [m.type for m in messages] == [FAMILY, FAMILY]
    with pytest.raises(NetlinkDecodeError):
        nlhelpers.decode_accept_reply(one + one)


@pytest.mark.parametrize(
    "attrs",
    [
        b"",  # no SOCKFD
        u32(5, 1),  # no SOCKFD
        s32(1, -1),  # negative fd
        nlattr(1, b"\x01\x00"),  # short s32
        s32(1, 3) + nlattr(3, b"\x01\x00\x00\x00\x00"),  # long u32
        s32(1, 3) + struct.pack("=HH", 40, 6) + b"\0" * 4,  # attr longer than message
        s32(1, 3) + struct.pack("=HH", 2, 6) + b"\0" * 4,  # attr shorter than its header
        s32(1, 3) + nlattr(7, struct.pack("=HH", 12, 1) + b"\0" * 4),  # broken nest
    ],
)
def test_malformed_accept_replies(attrs: bytes) -> None:
    with pytest.raises(NetlinkDecodeError):
        nlhelpers.decode_accept_reply(genl(FAMILY, 2, attrs))


def test_decode_error_keeps_a_wellformed_sockfd() -> None:
    attrs = s32(1, 3) + nlattr(4, b"\x01")
    with pytest.raises(NetlinkDecodeError) as info:
        nlhelpers.decode_accept_reply(genl(FAMILY, 2, attrs))
    assert info.value.sockfd == 3


def test_wrong_family_command_or_type() -> None:
    with pytest.raises(NetlinkDecodeError):
        nlhelpers.decode_accept_reply(genl(FAMILY, 2, s32(1, 3)), FAMILY + 1)
    with pytest.raises(NetlinkDecodeError):
        nlhelpers.decode_accept_reply(genl(FAMILY, 3, s32(1, 3)))
    with pytest.raises(NetlinkDecodeError):
        nlhelpers.decode_accept_reply(genl(nl.NLMSG_ERROR, 2, s32(1, 3)))


def test_every_truncation_is_a_decode_error() -> None:
    data = genl(FAMILY, 2, full_reply_attrs())
    for cut in range(len(data)):
        with pytest.raises(NetlinkDecodeError):
            nlhelpers.decode_accept_reply(data[:cut])


def test_nlmsg_len_lies() -> None:
    data = bytearray(genl(FAMILY, 2, s32(1, 3)))
    for bogus in (0, 15, len(data) + 1, 0xFFFFFFFF):
        struct.pack_into("=I", data, 0, bogus)
        with pytest.raises(NetlinkDecodeError):
            nlhelpers.decode_accept_reply(bytes(data))


# -- READY, NLMSG_ERROR, nlctrl replies


def test_ready_roundtrip_and_errors() -> None:
    (msg,) = nl.parse_messages(nlhelpers.encode_ready(FAMILY))
    assert (msg.type, msg.seq, msg.portid) == (FAMILY, 0, 0)
    assert nl.decode_ready(msg) == 1
    (other,) = nl.parse_messages(genl(FAMILY, 1, u32(2, 7)))
    assert nl.decode_ready(other) == 7
    for bad in (genl(FAMILY, 1, b""), genl(FAMILY, 2, u32(2, 1)), genl(FAMILY, 1, nlattr(2, b"x"))):
        with pytest.raises(NetlinkDecodeError):
            nl.decode_ready(nl.parse_messages(bad)[0])


def _nlmsgerr(error: int, flags: int, echoed: bytes, tlvs: bytes = b"") -> nl.NetlinkMessage:
    data = struct.pack("=IHHII", 16 + 4 + len(echoed) + len(tlvs), 2, flags, 1, 0)
    data += struct.pack("=i", error) + echoed + tlvs
    (msg,) = nl.parse_messages(data)
    return msg


def test_error_capped_with_extack() -> None:
    request = nl.encode_accept_request(FAMILY, 1)
    msg = _nlmsgerr(-22, 0x100 | 0x200, request[:16], nlattr(1, b"Unknown attribute type\0"))
    assert nl.decode_error(msg) == nl.NetlinkAck(errno.EINVAL, "Unknown attribute type")


def test_error_uncapped_skips_the_echoed_request() -> None:
    request = nl.encode_done(FAMILY, 1, 3, 0, [1, 2, 3])
    msg = _nlmsgerr(-9, 0x200, request, nlattr(1, b"bad fd\0"))
    assert nl.decode_error(msg) == nl.NetlinkAck(errno.EBADF, "bad fd")


def test_plain_ack_and_bad_errors() -> None:
    assert nl.decode_error(_nlmsgerr(0, 0x100, b"\0" * 16)) == nl.NetlinkAck(0, None)
    with pytest.raises(NetlinkDecodeError):
        nl.decode_error(_nlmsgerr(-11, 0, b"\0" * 8))  # echo shorter than a header
    with pytest.raises(NetlinkDecodeError):
        nl.decode_error(_nlmsgerr(5, 0x100, b"\0" * 16))  # positive "errno"
    with pytest.raises(NetlinkDecodeError):
        # uncapped echo claiming more bytes than remain
        nl.decode_error(_nlmsgerr(-1, 0x200, struct.pack("=IHHII", 400, 0, 0, 0, 0)))


def test_family_reply() -> None:
    groups = nlattr(1 | 0x8000, u32(2, 40) + nlattr(1, b"none\0"))
    groups += nlattr(2 | 0x8000, u32(2, 41) + nlattr(1, b"tlshd\0"))
    attrs = nlattr(2, b"handshake\0") + nlattr(1, struct.pack("=H", 0x22)) + nlattr(7, groups)
    (msg,) = nl.parse_messages(genl(0x10, 1, attrs))
    assert nl.decode_family(msg) == nl.FamilyInfo(0x22, {"none": 40, "tlshd": 41})


def test_policy_dump_maxattr() -> None:
    dump = nl.PolicyDump()
    op_policy = nlattr(9, nlattr(3 | 0x8000, u32(1, 4)))
    dump.add(nl.parse_messages(genl(0x10, 10, op_policy))[0])
    for policy_idx, attr in ((4, 1), (4, 2), (4, 3), (5, 9)):
        body = nlattr(8, nlattr(policy_idx, nlattr(attr, u32(1, 3))))
        dump.add(nl.parse_messages(genl(0x10, 10, body))[0])
    assert dump.maxattr(3) == 3
    assert dump.maxattr(2) is None


# -- fuzzing: the decoders raise NetlinkDecodeError and nothing else


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(NetlinkDecodeError):
        nlhelpers.decode_accept_reply(data)
    with contextlib.suppress(NetlinkDecodeError):
        for msg in nl.parse_messages(data):
            for decode in (nl.decode_ready, nl.decode_error, nl.decode_family):
                with contextlib.suppress(NetlinkDecodeError):
                    decode(msg)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_reply(data: st.DataObject) -> None:
    reply = bytearray(genl(FAMILY, 2, full_reply_attrs()))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(reply) - 1))
        reply[index] = data.draw(st.integers(0, 255))
    try:
        params = nlhelpers.decode_accept_reply(bytes(reply))
    except NetlinkDecodeError:
        return
    assert params.sockfd >= 0
