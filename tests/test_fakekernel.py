"""HandshakeNetlink end to end against the fake kernel, plus the real kernel's
"no handshake family" answer on this machine."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import nlhelpers
from tests.fakekernel import FakeKernel, FakeTransport, netlink_from_fds
from tlshd import netlink as nl
from tlshd.netlink import HandshakeFamilyMissing, HandshakeNetlink, NetlinkError
from tlshd.uapi import AuthMode, HandlerClass, MsgType

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def daemon(kernel: FakeKernel) -> Iterator[HandshakeNetlink]:
    netlink = kernel.make_netlink()
    netlink.open()
    yield netlink
    netlink.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _addr = listener.accept()
    yield client, server
    client.close()
    server.close()


def same_socket(fd: int, sock: socket.socket) -> bool:
    mine, theirs = os.fstat(fd), os.fstat(sock.fileno())
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def fds_open_on(sock: socket.socket) -> int:
    """How many fds of this process refer to `sock`'s open file (e.g. "socket:[123]")."""
    target = os.readlink(f"/proc/self/fd/{sock.fileno()}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            continue
    return count


def test_open_resolves_family_and_joins_group(kernel: FakeKernel) -> None:
    netlink = kernel.make_netlink()
    assert kernel.listeners == 0
    netlink.open()
    try:
        assert netlink.family_id == kernel.family_id
        assert netlink.group_id == kernel.group_ids["tlshd"] and netlink.group_id > 31
        assert kernel.listeners == 1
        assert not os.get_blocking(netlink.fileno())
    finally:
        netlink.close()


def test_ready_accept_done_with_a_real_tcp_socket(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = tcp_pair
    request = kernel.submit(
        server,
        MsgType.SERVERHELLO,
        AuthMode.PSK,
        timeout_ms=10000,
        peername="peer.example",
        peer_identities=(11, 12),
        keyring=77,
    )
    batch = daemon.read_notifications()
    assert (batch.ready, batch.overrun, batch.malformed) == (1, False, 0)
    assert daemon.read_notifications().ready == 0  # drained

    params = daemon.accept()
    assert params is not None
    assert params.sockfd not in (server.fileno(), client.fileno())
    assert same_socket(params.sockfd, server)
    assert (params.message_type, params.auth_mode) == (MsgType.SERVERHELLO, AuthMode.PSK)
    assert (params.timeout_ms, params.peername, params.keyring) == (10000, "peer.example", 77)
    assert params.peer_identities == (11, 12)
    assert request.accepted.is_set() and kernel.accepts == 1

    # The installed fd really is the consumer's connection.
    os.write(params.sockfd, b"hello")
    assert client.recv(5) == b"hello"
    assert fds_open_on(server) == 3  # consumer, fake kernel's reference, daemon

    daemon.done(params.sockfd, 0, [12])
    assert request.wait_done(5) == (0, (12,))
    assert request.done_count == 1 and kernel.dones == 1
    os.close(params.sockfd)


def test_eagain_when_nothing_pending(kernel: FakeKernel, daemon: HandshakeNetlink) -> None:
    assert daemon.accept() is None
    assert daemon.accept() is None
    assert kernel.eagain == 2 and kernel.accepts == 0


def test_overrun_reports_enobufs_and_accept_drains(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    _client, server = tcp_pair
    kernel.submit(server, MsgType.CLIENTHELLO, AuthMode.UNAUTH, overrun=True)
    batch = daemon.read_notifications()
    assert batch.overrun and batch.ready == 0 and batch.should_accept
    params = daemon.accept()
    assert params is not None and same_socket(params.sockfd, server)
    assert daemon.accept() is None
    os.close(params.sockfd)


def test_lost_notification_still_acceptable(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH, notify=False)
    assert not daemon.read_notifications().should_accept
    assert kernel.pending == 1
    params = daemon.accept()
    assert params is not None
    os.close(params.sockfd)


def test_notifications_never_raise_on_junk(kernel: FakeKernel, daemon: HandshakeNetlink) -> None:
    kernel.send_raw_notification(b"\x01" * 40)
    kernel.send_raw_notification(nlhelpers.encode_ready(kernel.family_id)[:-2])
    kernel.send_raw_notification(nlhelpers.encode_ready(kernel.family_id, HandlerClass.NONE))
    kernel.send_raw_notification(nlhelpers.encode_ready(kernel.family_id + 1))
    kernel.send_raw_notification(nlhelpers.encode_ready(kernel.family_id))
    batch = daemon.read_notifications()
    assert (batch.ready, batch.malformed, batch.ignored) == (1, 2, 2)


def test_done_with_closed_fd_fails_ebadf(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    request = kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH)
    params = daemon.accept()
    assert params is not None
    os.close(params.sockfd)
    with pytest.raises(NetlinkError) as info:
        daemon.done(params.sockfd, 0)
    assert info.value.errno == errno.EBADF
    assert kernel.done_errors == 1 and not request.completed.is_set()


def test_done_on_a_non_socket_or_unknown_socket(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(NetlinkError) as info:
            daemon.done(read_end, 0)
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(NetlinkError) as info:
        daemon.done(tcp_pair[0].fileno(), 0)  # no request for this socket
    assert info.value.errno == errno.EBUSY


def test_second_done_is_ignored(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    request = kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.X509, cert=5, privkey=6)
    params = daemon.accept()
    assert params is not None and (params.cert_serial, params.privkey_serial) == (5, 6)
    daemon.done(params.sockfd, errno.EACCES, [99])  # remote auth dropped on failure
    daemon.done(params.sockfd, 0, [1])
    assert request.wait_done(1) == (errno.EACCES, ())
    assert request.done_count == 2
    os.close(params.sockfd)


def test_done_status_is_normalized(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    request = kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH)
    params = daemon.accept()
    assert params is not None
    daemon.done(params.sockfd, -errno.ETIMEDOUT)
    assert request.wait_done(1) == (errno.ETIMEDOUT, ())
    os.close(params.sockfd)


@pytest.mark.parametrize(
    ("done_maxattr", "policy_supported", "expected"), [(3, True, 3), (2, True, 2), (2, False, 3)]
)
def test_probe_done_attrs(done_maxattr: int, policy_supported: bool, expected: int) -> None:
    with FakeKernel(done_maxattr=done_maxattr, policy_supported=policy_supported) as kernel:
        netlink = kernel.make_netlink()
        netlink.open()
        assert netlink.probe_done_attrs() == expected
        assert kernel.dones == 0 and kernel.done_errors == 0  # no fake DONE sent
        netlink.close()


def test_remote_auth_omitted_when_kernel_lacks_it(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    with FakeKernel(done_maxattr=2) as kernel:
        netlink = kernel.make_netlink()
        netlink.open()
        request = kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.PSK, peer_identities=[3])
        params = netlink.accept()
        assert params is not None
        netlink.done(params.sockfd, 0, [3])  # strict validation would reject REMOTE_AUTH
        assert request.wait_done(1) == (0, ())
        os.close(params.sockfd)
        netlink.close()


def test_strict_validation_of_done_is_reported(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH)
    params = daemon.accept()
    assert params is not None
    kernel.done_maxattr = 1  # a kernel that would reject SOCKFD
    with pytest.raises(NetlinkError) as info:
        daemon.done(params.sockfd, 0)
    assert info.value.errno == errno.EINVAL
    assert info.value.extack == "Unknown attribute type"
    os.close(params.sockfd)


def test_family_missing_in_fake() -> None:
    with FakeKernel(has_family=False) as kernel:
        netlink = kernel.make_netlink()
        with pytest.raises(HandshakeFamilyMissing, match=r"Linux >= 6\.5"):
            netlink.open()
        netlink.close()


def test_malformed_accept_reply_fails_the_installed_fd(
    kernel: FakeKernel, daemon: HandshakeNetlink, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    request = kernel.submit(
        tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH, extra_attrs=nl.encode_attr(4, b"\x01")
    )
    with pytest.raises(nl.NetlinkDecodeError):
        daemon.accept()
    assert request.wait_done(1) == (errno.EIO, ())
    assert fds_open_on(tcp_pair[1]) == 1  # the fake kernel's dup and the daemon's copy are gone


def test_forked_daemon(kernel: FakeKernel, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    netlink = kernel.make_netlink()
    request = kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH, notify=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            netlink.open()
            params = netlink.accept()
            if params is not None:
                netlink.done(params.sockfd, 0, [4242])
                code = 0
        finally:
            os._exit(code)
    _pid, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert request.wait_done(5) == (0, (4242,))
    netlink.close()


def test_subprocess_daemon_via_env(
    kernel: FakeKernel, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    fds = kernel.daemon_fds()
    request = kernel.submit(tcp_pair[1], MsgType.SERVERHELLO, AuthMode.UNAUTH, notify=False)
    script = textwrap.dedent(
        """
        from tests.fakekernel import netlink_from_env
        netlink = netlink_from_env()
        netlink.open()
        params = netlink.accept()
        netlink.done(params.sockfd, 0, [params.message_type])
        """
    )
    env = dict(os.environ, **kernel.subprocess_env(fds))
    result = subprocess.run(
        [sys.executable, "-c", script], pass_fds=fds, env=env, cwd=REPO, timeout=60, check=False
    )
    for fd in fds:
        os.close(fd)
    assert result.returncode == 0
    assert request.wait_done(5) == (0, (int(MsgType.SERVERHELLO),))


def test_netlink_from_fds_builds_fake_transports(kernel: FakeKernel) -> None:
    netlink = netlink_from_fds(*kernel.daemon_fds())
    assert isinstance(netlink._cmd, FakeTransport)
    netlink.open()
    assert kernel.listeners == 1
    netlink.close()


# -- this machine's real kernel


def _has_netlink() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16).close()
    except OSError:
        return False
    return True


real_kernel = pytest.mark.skipif(not _has_netlink(), reason="no AF_NETLINK here")


@real_kernel
def test_real_kernel_without_handshake_family() -> None:
    netlink = HandshakeNetlink()
    try:
        netlink.open()
    except HandshakeFamilyMissing as err:
        missing = err
    else:
        pytest.skip("this kernel has net/handshake")
    finally:
        netlink.close()
    assert "Linux >= 6.5" in str(missing) and "CONFIG_TLS" in str(missing)
    assert missing.errno == errno.ENOENT


@real_kernel
def test_real_kernel_codec_against_nlctrl() -> None:
    netlink = HandshakeNetlink(nl.RealNetlinkTransport(), nl.RealNetlinkTransport())
    try:
        netlink._require(netlink._cmd).settimeout(5)
        info = netlink.resolve_family("nlctrl")
        assert info.family_id == 0x10 and info.mcast_groups.get("notify") is not None
        # nlctrl's GETFAMILY op takes FAMILY_ID (1) and FAMILY_NAME (2).
        assert netlink.probe_op_maxattr(0x10, nl.CTRL_CMD_GETFAMILY) == 2
    finally:
        netlink.close()


class StallOnceTransport:
    """Wraps a transport; the next recv() times out without consuming the reply."""

    def __init__(self, inner: FakeTransport) -> None:
        self.inner = inner
        self.stall_next = False

    def recv(self) -> bytes:
        if self.stall_next:
            self.stall_next = False
            raise TimeoutError
        return self.inner.recv()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_late_accept_reply_is_failed_not_leaked(
    kernel: FakeKernel, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    notify, cmd = kernel.make_transports()
    stalling = StallOnceTransport(cmd)
    netlink = HandshakeNetlink(notify, stalling)  # type: ignore[arg-type]
    netlink.open()
    request = kernel.submit(tcp_pair[1], MsgType.CLIENTHELLO, AuthMode.UNAUTH)
    stalling.stall_next = True
    with pytest.raises(NetlinkError) as info:
        netlink.accept()
    assert info.value.errno == errno.ETIMEDOUT
    # The next ACCEPT finds the late reply (its fd already installed) first.
    assert netlink.accept() is None
    assert request.wait_done(1) == (errno.EIO, ())
    assert fds_open_on(tcp_pair[1]) == 1
    netlink.close()


def test_family_without_tlshd_group(kernel: FakeKernel) -> None:
    kernel.group_ids = {"none": 40}
    netlink = kernel.make_netlink()
    with pytest.raises(HandshakeFamilyMissing):
        netlink.open()
    assert kernel.listeners == 0
    netlink.close()
