"""Structure-aware fuzzing of the netlink codec, the daemon's netlink class and
the supervisor, complementing the byte-level fuzzing in test_netlink_codec.py.

* codec: generated attribute trees (nests within nests, junk inside the
  CERTIFICATE nest, lying lengths, unknown ids), several messages per
  datagram, truncations and NLMSG_ERROR variants reach every decoder, which
  may only raise NetlinkDecodeError;
* HandshakeNetlink over the fake kernel: junk notifications never raise, and
  junk inside an ACCEPT reply fails that request with DONE(EIO) and leaks no fd;
* a forked supervisor fed junk notifications and junk ACCEPT replies keeps
  running, logs, answers every request exactly once and serves a valid
  request afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import nlhelpers
from tests.fakekernel import DEFAULT_FAMILY_ID, FakeKernel
from tests.helpers.daemon import running_daemon, tcp_pair
from tests.helpers.engines import Peer, gated_engine
from tlshd import netlink as nl
from tlshd.netlink import HandshakeNetlink, NetlinkDecodeError
from tlshd.params import HandshakeParams
from tlshd.uapi import AcceptAttr, AuthMode, HandshakeCmd, MsgType

FAMILY = DEFAULT_FAMILY_ID  # the family id the module_kernel fixture serves
MESSAGE_TYPES = [FAMILY, nl.NLMSG_NOOP, nl.NLMSG_ERROR, nl.NLMSG_DONE, nl.NLMSG_OVERRUN, 0x10, 0]
FLAG_BITS = [
    0,
    nl.NLM_F_MULTI,
    nl.NLM_F_CAPPED,
    nl.NLM_F_ACK_TLVS,
    nl.NLM_F_CAPPED | nl.NLM_F_ACK_TLVS,
]


# --------------------------------------------------------------------------
# Strategies


def _nlattr(attr_type: int, payload: bytes, length_delta: int = 0, pad: bool = True) -> bytes:
    length = max(0, min(0xFFFF, 4 + len(payload) + length_delta))
    data = struct.pack("=HH", length, attr_type & 0xFFFF) + payload
    return data + b"\0" * ((-len(data)) % 4 if pad else 0)


_ATTR_TYPES = st.integers(0, 12) | st.integers(0, 0xFFFF)
_SCALARS = st.sampled_from([b"", b"\x01", b"\x01\x00", b"\x07\x00\x00\x00", b"\xff" * 4]) | (
    st.integers(-(2**31), 2**32 - 1).map(lambda v: struct.pack("=q", v)[:4])
)


def attr_trees(max_leaves: int = 12) -> st.SearchStrategy[bytes]:
    """Attribute areas: leaves are scalars/strings/junk, branches are nests
    (with or without NLA_F_NESTED), and any header may lie about its length."""
    leaf = st.tuples(
        _ATTR_TYPES,
        _SCALARS | st.binary(max_size=24),
        st.sampled_from([0] * 6 + [-3, 1, 5, 400]),
        st.booleans(),
    ).map(lambda t: _nlattr(t[0], t[1], t[2], t[3]))

    def nest(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
        return st.tuples(_ATTR_TYPES, st.booleans(), st.lists(children, max_size=4)).map(
            lambda t: _nlattr(t[0] | (nl.NLA_F_NESTED if t[1] else 0), b"".join(t[2]))
        )

    return st.lists(st.recursive(leaf, nest, max_leaves=max_leaves), max_size=6).map(b"".join)


def certificate_nests() -> st.SearchStrategy[bytes]:
    """A CERTIFICATE attribute with well-formed, junk or nested-junk content."""
    inner = st.lists(
        st.sampled_from([nl.encode_s32(1, 5), nl.encode_s32(2, 6), nl.encode_attr(1, b"\x01")])
        | attr_trees(4),
        max_size=4,
    ).map(b"".join)
    return st.tuples(st.booleans(), inner).map(
        lambda t: _nlattr(AcceptAttr.CERTIFICATE | (nl.NLA_F_NESTED if t[0] else 0), t[1])
    )


def accept_attr_areas() -> st.SearchStrategy[bytes]:
    """ACCEPT attribute areas: a plausible reply with junk mixed in."""
    known = st.sampled_from(
        [
            nl.encode_s32(AcceptAttr.SOCKFD, 7),
            nl.encode_u32(AcceptAttr.MESSAGE_TYPE, MsgType.SERVERHELLO),
            nl.encode_u32(AcceptAttr.TIMEOUT, 5000),
            nl.encode_u32(AcceptAttr.AUTH_MODE, AuthMode.X509),
            nl.encode_u32(AcceptAttr.PEER_IDENTITY, 0x1234),
            nl.encode_attr(AcceptAttr.PEERNAME, b"host\0"),
            nl.encode_u32(AcceptAttr.KEYRING, 0x2000),
        ]
    )
    return st.lists(known | certificate_nests() | attr_trees(6), max_size=10).map(b"".join)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """One netlink message of a type the daemon may see, with a body that is a
    genl message, an NLMSG_ERROR (capped/uncapped, with or without extack),
    or raw junk; its length field may lie."""
    msg_type = draw(st.sampled_from(MESSAGE_TYPES) | st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from(FLAG_BITS) | st.integers(0, 0xFFFF))
    kind = draw(st.sampled_from(["genl", "genl", "error", "raw"]))
    if kind == "genl":
        cmd = draw(st.sampled_from(list(HandshakeCmd)) | st.integers(0, 255))
        body = struct.pack("=BBH", cmd, 1, 0) + draw(accept_attr_areas() | attr_trees())
    elif kind == "error":
        error = draw(st.sampled_from([0, -errno.EAGAIN, -errno.EINVAL, -4095, -4096, 1, -(2**31)]))
        echoed_len = draw(st.sampled_from([16, 20, 0, 8, 15, 400, 0xFFFFFFFF]))
        echoed = struct.pack("=IHHII", echoed_len, FAMILY, 1, 1, 0)
        echoed += draw(st.binary(max_size=24))
        extack = draw(
            st.sampled_from([b"", _nlattr(nl.NLMSGERR_ATTR_MSG, b"Unknown attribute\0")])
            | attr_trees(4)
        )
        body = struct.pack("=i", error) + echoed + extack
    else:
        body = draw(st.binary(max_size=40))
    length = 16 + len(body)
    length += draw(st.sampled_from([0] * 8 + [-1, 1, -16, 4, 1000]))
    header = struct.pack("=IHHII", max(0, length) & 0xFFFFFFFF, msg_type, flags & 0xFFFF, 1, 0)
    return header + body + b"\0" * (-len(body) % 4)


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Several messages in one buffer, possibly cut short or with trailing junk."""
    data = b"".join(draw(st.lists(messages(), min_size=1, max_size=4)))
    mangle = draw(st.sampled_from(["none", "none", "truncate", "trail"]))
    if mangle == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mangle == "trail":
        data += draw(st.binary(min_size=1, max_size=20))
    return data


# --------------------------------------------------------------------------
# Codec


def check_params(params: HandshakeParams) -> None:
    assert params.sockfd >= 0
    assert all(0 <= s <= 0xFFFFFFFF for s in params.peer_identities)
    assert -(2**31) <= params.cert_serial < 2**31
    assert -(2**31) <= params.privkey_serial < 2**31
    assert params.peername is None or isinstance(params.peername, str)
    for value in (params.message_type, params.auth_mode, params.timeout_ms, params.keyring):
        assert value is None or 0 <= value <= 0xFFFFFFFF


def decode_everything(data: bytes) -> None:
    """Every decoder on `data`; each may fail only with NetlinkDecodeError."""
    for family in (None, FAMILY):
        with contextlib.suppress(NetlinkDecodeError):
            check_params(nlhelpers.decode_accept_reply(data, family))
    try:
        parsed = nl.parse_messages(data)
    except NetlinkDecodeError:
        parsed = []
    dump = nl.PolicyDump()
    for msg in parsed:
        for decode in (nl.decode_ready, nl.decode_error, nl.decode_family, dump.add):
            with contextlib.suppress(NetlinkDecodeError):
                decode(msg)
        with contextlib.suppress(NetlinkDecodeError):
            check_params(nl.decode_accept_message(msg, FAMILY))
    with contextlib.suppress(NetlinkDecodeError):
        dump.maxattr(HandshakeCmd.DONE)
    classifier = HandshakeNetlink()
    classifier.family_id = FAMILY
    ready, malformed, ignored = classifier._classify_notifications(data)
    assert min(ready, malformed, ignored) >= 0


@settings(max_examples=200, deadline=None)
@given(datagrams())
def test_fuzz_structured_datagrams(data: bytes) -> None:
    decode_everything(data)


@settings(max_examples=200, deadline=None)
@given(accept_attr_areas())
def test_fuzz_accept_attribute_areas(attrs: bytes) -> None:
    try:
        params = nl.decode_accept_attrs(attrs)
    except NetlinkDecodeError as err:
        assert err.sockfd is None or err.sockfd >= 0
        return
    check_params(params)


@settings(max_examples=200, deadline=None)
@given(certificate_nests(), st.data())
def test_fuzz_certificate_nest(nest: bytes, data: st.DataObject) -> None:
    """Junk inside CERTIFICATE after a good SOCKFD keeps the fd for DONE(EIO)."""
    attrs = nl.encode_s32(AcceptAttr.SOCKFD, 9) + nest
    if data.draw(st.booleans()):
        attrs = nest + attrs
    try:
        params = nl.decode_accept_attrs(attrs)
    except NetlinkDecodeError as err:
        if attrs.startswith(nl.encode_s32(AcceptAttr.SOCKFD, 9)):
            assert err.sockfd == 9
        return
    assert params.sockfd == 9


@settings(max_examples=100, deadline=None)
@given(st.lists(messages(), min_size=2, max_size=5))
def test_fuzz_several_messages_per_buffer(parts: list[bytes]) -> None:
    """parse_messages either splits a buffer at the declared lengths or refuses it."""
    data = b"".join(parts)
    try:
        parsed = nl.parse_messages(data)
    except NetlinkDecodeError:
        return
    assert len(parsed) >= 1
    assert sum(16 + len(m.payload) for m in parsed) <= len(data)
    decode_everything(data)


@settings(max_examples=300, deadline=None)
@given(
    error=st.integers(-(2**31), 2**31 - 1),
    flags=st.sampled_from(FLAG_BITS),
    echoed=st.binary(max_size=64),
    tlvs=attr_trees(4),
)
def test_fuzz_nlmsg_error(error: int, flags: int, echoed: bytes, tlvs: bytes) -> None:
    body = struct.pack("=i", error) + echoed + tlvs
    data = struct.pack("=IHHII", 16 + len(body), nl.NLMSG_ERROR, flags, 1, 0) + body
    (msg,) = nl.parse_messages(data + b"\0" * (-len(data) % 4))
    try:
        ack = nl.decode_error(msg)
    except NetlinkDecodeError:
        return
    assert 0 <= ack.error <= nl.MAX_ERRNO
    assert ack.error == -error
    assert ack.extack is None or isinstance(ack.extack, str)


# --------------------------------------------------------------------------
# HandshakeNetlink over the fake kernel, in this process


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


@pytest.fixture(scope="module")
def netlink(module_kernel: FakeKernel) -> Iterator[HandshakeNetlink]:
    daemon = module_kernel.make_netlink()
    daemon.open()
    yield daemon
    daemon.close()


FIXTURE_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FIXTURE_SETTINGS
@given(
    junk=st.lists(
        datagrams().filter(bool) | st.binary(min_size=1, max_size=64), min_size=1, max_size=5
    )
)
def test_junk_notifications_never_raise(
    module_kernel: FakeKernel, netlink: HandshakeNetlink, junk: list[bytes]
) -> None:
    for data in junk:
        module_kernel.send_raw_notification(data)
    # The fake multicasts synchronously: everything is queued already.
    netlink.read_notifications()  # may count anything; must not raise
    client, server = tcp_pair()
    with client, server:
        request = module_kernel.submit(server, MsgType.CLIENTHELLO, AuthMode.UNAUTH)
        assert netlink.read_notifications().ready == 1
        params = netlink.accept()
        assert params is not None
        netlink.done(params.sockfd, 0)
        os.close(params.sockfd)
        assert request.wait_done(5) == (0, ())


@FIXTURE_SETTINGS
@given(extra=accept_attr_areas())
def test_junk_in_accept_reply(
    module_kernel: FakeKernel, netlink: HandshakeNetlink, extra: bytes
) -> None:
    """Junk after the kernel's attributes: the request is answered exactly once
    (DONE(EIO) by the codec if it cannot be decoded), and no fd leaks."""
    extra = _without_top_level_sockfd(extra)
    before = open_fds()
    client, server = tcp_pair()
    with client, server:
        request = module_kernel.submit(
            server, MsgType.CLIENTHELLO, AuthMode.UNAUTH, notify=False, extra_attrs=extra
        )
        try:
            params = netlink.accept()
        except NetlinkDecodeError:
            assert request.wait_done(5) == (errno.EIO, ())
        else:
            assert params is not None
            check_params(params)
            netlink.done(params.sockfd, errno.EACCES)
            os.close(params.sockfd)
            assert request.wait_done(5) == (errno.EACCES, ())
        assert request.done_count == 1
        assert netlink.accept() is None
    assert open_fds() == before


def _without_top_level_sockfd(attrs: bytes) -> bytes:
    """The kernel emits SOCKFD once, first: a second one would name an fd the
    kernel never installed, which is not junk a real kernel can send."""
    out = b""
    offset = 0
    while len(attrs) - offset >= 4:
        length, attr_type = struct.unpack_from("=HH", attrs, offset)
        if length < 4 or length > len(attrs) - offset:
            return out + attrs[offset:]  # malformed from here on: keep as junk
        if attr_type & nl.NLA_TYPE_MASK != AcceptAttr.SOCKFD:
            out += attrs[offset : offset + ((length + 3) & ~3)]
        offset += (length + 3) & ~3
    return out + attrs[offset:]


# --------------------------------------------------------------------------
# The supervisor


@pytest.fixture(scope="module")
def daemon_kernel() -> Iterator[FakeKernel]:
    """The daemon's own fake kernel: the in-process netlink must not take its READYs."""
    with FakeKernel() as fake:
        yield fake


@pytest.fixture(scope="module")
def daemon(daemon_kernel: FakeKernel) -> Iterator[Any]:
    with running_daemon(daemon_kernel, gated_engine) as running:
        yield running


def serve_one_good(kernel: FakeKernel) -> None:
    peer = Peer(kernel)
    try:
        assert peer.release() == b"4000\n"
        assert peer.request.wait_done(10) == (0, ())
    finally:
        peer.close()


@pytest.mark.timeout(300)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.lists(datagrams().filter(bool) | st.binary(min_size=1, max_size=64), max_size=4),
    extra=st.none() | accept_attr_areas(),
)
def test_supervisor_survives_junk(
    daemon_kernel: FakeKernel, daemon: Any, junk: list[bytes], extra: bytes | None
) -> None:
    for data in junk:
        daemon_kernel.send_raw_notification(data)
    if extra is not None:
        client, server = tcp_pair()
        with client, server:
            client.sendall(b"g")  # gated_engine answers at once if it runs at all
            request = daemon_kernel.submit(
                server,
                MsgType.CLIENTHELLO,
                AuthMode.UNAUTH,
                extra_attrs=_without_top_level_sockfd(extra),
            )
            status, _ = request.wait_done(15)
            assert 0 <= status <= nl.MAX_ERRNO
    serve_one_good(daemon_kernel)
    assert daemon.exit_code is None
    assert os.waitpid(daemon.pid, os.WNOHANG) == (0, 0), daemon.log()


def test_supervisor_logged_the_junk(daemon_kernel: FakeKernel, daemon: Any) -> None:
    daemon_kernel.send_raw_notification(b"\x01\x02\x03")  # shorter than a header
    bad_ready = nl.encode_genl(FAMILY, HandshakeCmd.READY, 1, 0, nl.encode_attr(2, b"x"), flags=0)
    daemon_kernel.send_raw_notification(bad_ready)
    client, server = tcp_pair()
    with client, server:
        broken_nest = nl.encode_attr(AcceptAttr.CERTIFICATE, struct.pack("=HH", 40, 1))
        request = daemon_kernel.submit(
            server, MsgType.CLIENTHELLO, AuthMode.UNAUTH, extra_attrs=broken_nest
        )
        assert request.wait_done(15) == (errno.EIO, ())
    daemon.wait_for_log("malformed netlink notification")
    daemon.wait_for_log("malformed READY notification")
    daemon.wait_for_log("malformed ACCEPT reply")
    serve_one_good(daemon_kernel)
    assert all(r.done_count <= 1 for r in daemon_kernel.requests)
    assert daemon_kernel.done_errors == 0
