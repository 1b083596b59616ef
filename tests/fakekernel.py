"""A fake `handshake` generic-netlink family, for tests without net/handshake.

The fake plays the kernel's part of READY/ACCEPT/DONE over two
``socketpair(AF_UNIX, SOCK_SEQPACKET)`` pairs per daemon ("client"): a *notify*
pair for READY multicasts and a *command* pair for requests and replies.  A
background thread serves every client's command socket.  The bytes on the
wire are real netlink messages (tlshd.netlink's codec); only fd installation
is simulated:

* ACCEPT: the fake sends the request's socket fd with SCM_RIGHTS alongside the
  reply, and the daemon-side `FakeTransport` rewrites the reply's SOCKFD
  attribute to the fd number it received, as the kernel's fd install would.
* DONE: `FakeTransport.send` attaches the fd named by SOCKFD with SCM_RIGHTS.
  If that fd is not open in the sending process, the DONE goes without it and
  the fake answers EBADF, like sockfd_lookup() in the kernel.  The fake finds
  the request by (st_dev, st_ino) of the socket, completes it at most once
  (a second DONE is ACKed and ignored, like the kernel's COMPLETED bit) and
  replies with an ACK, or an NLMSG_ERROR carrying an extack message.

Usage in one process::

    with FakeKernel() as kernel:
        nl = kernel.make_netlink()          # a tlshd.netlink.HandshakeNetlink
        nl.open()                           # GETFAMILY + join the tlshd group
        client, server = loopback_tcp_pair()
        req = kernel.submit(server, MsgType.SERVERHELLO, AuthMode.X509)
        assert nl.read_notifications().ready == 1
        params = nl.accept()                # params.sockfd is a real fd here
        nl.done(params.sockfd, 0, [1234])
        assert req.wait_done(5) == (0, (1234,))

Across a fork the HandshakeNetlink from `make_netlink()` simply works in the
child (its transports are plain fds).  For a subprocess, create the client
with `daemon_fds()`, pass the two fds (``pass_fds=``) and their numbers, e.g.
via `subprocess_env()` (TLSHD_FAKE_NETLINK_FDS="notify,cmd"), and build the
daemon's HandshakeNetlink there with `netlink_from_env()` or
`netlink_from_fds(notify_fd, cmd_fd)`.  The fake kernel itself always stays in
the test process.

kTLS: the development machines' kernels have no tls.ko, so the fake also keeps
what setsockopt(TCP_ULP "tls"), (SOL_TLS, TLS_TX) and (SOL_TLS, TLS_RX) would
have left on each socket.  `fake_install_ktls` is an install_ktls stand-in for
workers, `fake_ktls_state` the supervisor's supervisor.handoff.ktls_state
stand-in.  The state lives in files named by the socket's (st_dev, st_ino) in
a sticky world-writable directory: workers are other, unprivileged processes
that may open no socket (seccomp).  submit() clears a socket's state, and a
DONE or stop() drops it, as the kernel's state goes with the socket.

Knobs: `submit(..., notify=False)` loses the READY (as after a daemon restart);
`submit(..., overrun=True)` or `inject_overrun()` makes the daemon's next
notify recv raise ENOBUFS; `send_raw_notification()` multicasts arbitrary
bytes; `FakeKernel(has_family=False)` behaves like a kernel without
net/handshake; `done_maxattr`/`policy_supported` shape the GETPOLICY answer.
Counters: `accepts`, `eagain`, `dones`, `done_errors`, `listeners`.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import errno
import os
import selectors
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests import nlhelpers
from tlshd import netlink as nl
from tlshd.netlink import HandshakeNetlink, NetlinkMessage, SocketTransport
from tlshd.uapi import (
    GENL_ID_CTRL,
    HANDSHAKE_FAMILY_NAME,
    HANDSHAKE_FAMILY_VERSION,
    HANDSHAKE_MCGRP_TLSHD,
    MAX_ERRNO,
    AcceptAttr,
    DoneAttr,
    HandlerClass,
    HandshakeCmd,
    X509Attr,
)

FAKE_NETLINK_ENV = "TLSHD_FAKE_NETLINK_FDS"

# Out-of-band datagrams between FakeTransport and FakeKernel.  They are shorter
# than a netlink header, so they can never be mistaken for a netlink message.
_JOIN = b"FK:JOIN"  # + u32 group id; answered with _JOIN_OK or _JOIN_BAD
_JOIN_OK = b"FK:OK"
_JOIN_BAD = b"FK:BAD"
_ENOBUFS = b"FK:NOBUF"

_FD_CMSG_SPACE = socket.CMSG_SPACE(4 * struct.calcsize("i"))
_ACCEPT_MAXATTR = int(AcceptAttr.HANDLER_CLASS)
_HANDLER_CLASS_MAX = 2  # NLA_POLICY_MAX(NLA_U32, HANDSHAKE_HANDLER_CLASS_MAX)
_SOCKFD_PLACEHOLDER = -1  # replaced by FakeTransport; a raw reader sees an invalid fd
_JOIN_TIMEOUT_S = 5.0
NLMSG_MIN_TYPE = 0x10


# --------------------------------------------------------------------------
# Daemon side


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    # MSG_CMSG_CLOEXEC: the kernel installs ACCEPT's fd with O_CLOEXEC too.
    data, ancdata, _flags, _addr = sock.recvmsg(
        nl.RECV_BUFSIZE, _FD_CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds_array = array.array("i")
            fds_array.frombytes(payload[: len(payload) - len(payload) % fds_array.itemsize])
            fds.extend(fds_array)
    return data, fds


def _attr_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(message type, attr type, value offset) for every top-level genl attribute."""
    found = []
    offset = 0
    while len(data) - offset >= 16:
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16 or length > len(data) - offset:
            break
        pos, end = offset + 20, offset + length
        while end - pos >= 4:
            attr_len, attr_type = struct.unpack_from("=HH", data, pos)
            if attr_len < 4 or attr_len > end - pos:
                break
            found.append((msg_type, attr_type & nl.NLA_TYPE_MASK, pos + 4))
            pos += (attr_len + 3) & ~3
        offset += (length + 3) & ~3
    return found


def _genl_cmd(data: bytes) -> int | None:
    if len(data) < 20:
        return None
    return data[16]


class FakeTransport(SocketTransport):
    """The daemon's end of one fake netlink socket (a SOCK_SEQPACKET socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def from_fd(cls, fd: int) -> FakeTransport:
        return cls(socket.socket(fileno=fd))

    def send(self, data: bytes) -> None:
        sockfd = self._done_sockfd(data)
        if sockfd is None:
            self.sock.sendall(data)
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sockfd]))]
        try:
            self.sock.sendmsg([data], rights)
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
            # Not open here: let the fake kernel answer EBADF as sockfd_lookup() would.
            self.sock.sendall(data)

    @staticmethod
    def _done_sockfd(data: bytes) -> int | None:
        if _genl_cmd(data) != HandshakeCmd.DONE:
            return None
        for msg_type, attr_type, value_at in _attr_offsets(data):
            if msg_type > GENL_ID_CTRL and attr_type == DoneAttr.SOCKFD:
                if len(data) - value_at < 4:
                    return None
                return struct.unpack_from("=i", data, value_at)[0]
        return None

    def recv(self) -> bytes:
        data, fds = _recv_with_fds(self.sock)
        if data == _ENOBUFS:
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        if not data and not fds:
            raise ConnectionResetError(errno.ECONNRESET, "fake kernel went away")
        if fds:
            data = self._install_fd(data, fds)
        return data

    @staticmethod
    def _install_fd(data: bytes, fds: list[int]) -> bytes:
        for extra in fds[1:]:
            os.close(extra)
        patched = bytearray(data)
        for msg_type, attr_type, value_at in _attr_offsets(data):
            if msg_type > GENL_ID_CTRL and attr_type == AcceptAttr.SOCKFD:
                struct.pack_into("=i", patched, value_at, fds[0])
                return bytes(patched)
        os.close(fds[0])
        return data

    def add_membership(self, group_id: int) -> None:
        """Join synchronously: the fake kernel confirms before READYs can flow."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(_JOIN_TIMEOUT_S)
        try:
            self.sock.sendall(_JOIN + struct.pack("=I", group_id))
            answer = self.sock.recv(64)
        finally:
            self.sock.settimeout(previous)
        if answer != _JOIN_OK:
            raise OSError(errno.EINVAL, f"fake kernel refused group {group_id}")


def netlink_from_fds(notify_fd: int, cmd_fd: int) -> HandshakeNetlink:
    """A (not yet opened) HandshakeNetlink over fds from `FakeKernel.daemon_fds()`."""
    return HandshakeNetlink(FakeTransport.from_fd(notify_fd), FakeTransport.from_fd(cmd_fd))


def netlink_from_env(environ: dict[str, str] | None = None) -> HandshakeNetlink | None:
    """Like netlink_from_fds, reading "notify,cmd" from TLSHD_FAKE_NETLINK_FDS."""
    value = (os.environ if environ is None else environ).get(FAKE_NETLINK_ENV)
    if not value:
        return None
    notify_fd, cmd_fd = (int(part) for part in value.split(","))
    return netlink_from_fds(notify_fd, cmd_fd)


# --------------------------------------------------------------------------
# Kernel side


@dataclass
class FakeRequest:
    """One handshake request of a fake kernel consumer."""

    message_type: int
    auth_mode: int
    timeout_ms: int | None
    peername: str | None
    peer_identities: tuple[int, ...]
    cert: int
    privkey: int
    keyring: int | None
    extra_attrs: bytes
    handler_class: int
    sock_key: tuple[int, int]
    kernel_fd: int
    accepted: threading.Event = field(default_factory=threading.Event)
    completed: threading.Event = field(default_factory=threading.Event)
    status: int | None = None
    remote_auth: tuple[int, ...] = ()
    done_count: int = 0

    def wait_accepted(self, timeout: float) -> None:
        if not self.accepted.wait(timeout):
            raise TimeoutError("request was not accepted in time")

    def wait_done(self, timeout: float) -> tuple[int, tuple[int, ...]]:
        """(status, remote_auth) of the first DONE; TimeoutError if none came."""
        if not self.completed.wait(timeout):
            raise TimeoutError("no DONE for this request in time")
        assert self.status is not None
        return self.status, self.remote_auth

    def accept_attrs(self, family_id: int) -> bytes:
        """Attributes in the order tls_handshake_accept() emits them (v6.17)."""
        attrs = nl.encode_s32(AcceptAttr.SOCKFD, _SOCKFD_PLACEHOLDER)
        attrs += nl.encode_u32(AcceptAttr.MESSAGE_TYPE, self.message_type)
        if self.peername is not None:
            attrs += nl.encode_attr(AcceptAttr.PEERNAME, self.peername.encode() + b"\0")
        if self.timeout_ms:
            attrs += nl.encode_u32(AcceptAttr.TIMEOUT, self.timeout_ms)
        if self.keyring:
            attrs += nl.encode_u32(AcceptAttr.KEYRING, self.keyring)
        attrs += nl.encode_u32(AcceptAttr.AUTH_MODE, self.auth_mode)
        for serial in self.peer_identities:
            attrs += nl.encode_u32(AcceptAttr.PEER_IDENTITY, serial)
        if self.cert or self.privkey:
            nest = nl.encode_s32(X509Attr.CERT, self.cert)
            nest += nl.encode_s32(X509Attr.PRIVKEY, self.privkey)
            attrs += nl.encode_attr(AcceptAttr.CERTIFICATE | nl.NLA_F_NESTED, nest)
        return attrs + self.extra_attrs


@dataclass
class _Client:
    notify: socket.socket
    cmd: socket.socket
    joined: bool = False
    overrun_pending: bool = False


class _Refused(Exception):
    def __init__(self, err: int, extack: str | None = None) -> None:
        super().__init__(err, extack)
        self.err = err
        self.extack = extack


def _socket_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# Any id works: the daemon learns it from GETFAMILY, as from the real kernel.
DEFAULT_FAMILY_ID = 0x22

# --------------------------------------------------------------------------
# kTLS state (see the module doc)

_KTLS_DIR = tempfile.mkdtemp(prefix="tlshd-fake-ktls-")
os.chmod(_KTLS_DIR, 0o1777)
_KTLS_OWNER = os.getpid()


@atexit.register
def _remove_ktls_dir() -> None:
    if os.getpid() == _KTLS_OWNER:  # not in forked daemons and workers
        shutil.rmtree(_KTLS_DIR, ignore_errors=True)


_TLS_1_3_VERSION = 0x0304


def _ktls_path(fd: int) -> str:
    dev, ino = _socket_key(fd)
    return os.path.join(_KTLS_DIR, f"{dev}-{ino}")


def fake_install_ktls(sock: socket.socket, tx_info: bytes, rx_info: bytes) -> None:
    """What ktls.install_ktls does to a socket, on a kernel without tls.ko:
    attach the ULP, then TX, then RX; a struct that is not TLS 1.3 is EINVAL."""
    steps = [("ulp", b""), ("tx", tx_info), ("rx", rx_info)]
    with open(_ktls_path(sock.fileno()), "a") as state:
        for step, info in steps:
            if info and struct.unpack_from("=H", info)[0] != _TLS_1_3_VERSION:
                raise OSError(errno.EINVAL, "not a TLS 1.3 crypto_info")
            state.write(f"{step}\n")
            state.flush()


def fake_ktls_state(sock: socket.socket) -> tuple[str, bool, bool]:
    """(TCP_ULP name, TLS_TX set, TLS_RX set) of a socket, as the kernel reports them."""
    try:
        with open(_ktls_path(sock.fileno())) as state:
            steps = set(state.read().split())
    except FileNotFoundError:
        steps = set()
    return ("tls" if "ulp" in steps else ""), "tx" in steps, "rx" in steps


def _forget_ktls(key: tuple[int, int]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_KTLS_DIR, f"{key[0]}-{key[1]}"))


class FakeKernel:
    """Serves GETFAMILY, GETPOLICY, ACCEPT and DONE like net/handshake; see module doc."""

    def __init__(
        self,
        family_id: int = DEFAULT_FAMILY_ID,
        group_base: int = 40,
        has_family: bool = True,
        done_maxattr: int = int(DoneAttr.REMOTE_AUTH),
        policy_supported: bool = True,
    ) -> None:
        self.family_id = family_id
        # Groups "none" and "tlshd" get consecutive ids; >31 exercises setsockopt joining.
        self.group_ids = {"none": group_base, HANDSHAKE_MCGRP_TLSHD: group_base + 1}
        self.has_family = has_family
        self.done_maxattr = done_maxattr
        self.policy_supported = policy_supported
        self.accepts = 0
        self.eagain = 0
        self.dones = 0
        self.completion_order: list[FakeRequest] = []  # first DONE of each request, in order
        self.done_errors = 0
        self.requests: list[FakeRequest] = []
        self._pending: deque[FakeRequest] = deque()
        self._clients: list[_Client] = []
        self._daemon_socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._joined = threading.Condition(self._lock)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="fakekernel", daemon=True)
        self._thread.start()

    # -- lifecycle

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the kernel's ends and its request fds."""
        if self._stopping:
            return
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for client in self._clients:
                client.notify.close()
                client.cmd.close()
            for request in self.requests:
                self._release(request)
                _forget_ktls(request.sock_key)
        for sock in self._daemon_socks:
            sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- daemon endpoints

    def _new_client(self) -> tuple[socket.socket, socket.socket]:
        notify_k, notify_d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd_k, cmd_d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        notify_k.setblocking(False)
        client = _Client(notify_k, cmd_k)
        with self._lock:
            self._clients.append(client)
        self._selector.register(notify_k, selectors.EVENT_READ, client)
        self._selector.register(cmd_k, selectors.EVENT_READ, client)
        self._wake_w.send(b"r")
        return notify_d, cmd_d

    def make_transports(self) -> tuple[FakeTransport, FakeTransport]:
        """(notify, command) transports of a new client."""
        notify_d, cmd_d = self._new_client()
        self._daemon_socks += [notify_d, cmd_d]
        return FakeTransport(notify_d), FakeTransport(cmd_d)

    def make_netlink(self) -> HandshakeNetlink:
        """A new, not yet opened, HandshakeNetlink talking to this fake kernel."""
        return HandshakeNetlink(*self.make_transports())

    def daemon_fds(self) -> tuple[int, int]:
        """(notify_fd, cmd_fd) of a new client; the caller owns and closes them."""
        notify_d, cmd_d = self._new_client()
        return notify_d.detach(), cmd_d.detach()

    def subprocess_env(self, fds: tuple[int, int]) -> dict[str, str]:
        """Environment entry naming `fds` for netlink_from_env() in a subprocess."""
        return {FAKE_NETLINK_ENV: f"{fds[0]},{fds[1]}"}

    @property
    def listeners(self) -> int:
        with self._lock:
            return self._joined_count()

    def wait_for_listener(self, timeout: float, count: int = 1) -> None:
        with self._joined:
            if not self._joined.wait_for(lambda: self._joined_count() >= count, timeout):
                raise TimeoutError("no daemon joined the tlshd group in time")

    def _joined_count(self) -> int:
        return sum(client.joined for client in self._clients)

    # -- consumer side

    def submit(
        self,
        sock: socket.socket | int,
        message_type: int,
        auth_mode: int,
        timeout_ms: int | None = None,
        peername: str | None = None,
        peer_identities: Sequence[int] = (),
        cert: int = 0,
        privkey: int = 0,
        keyring: int | None = None,
        *,
        notify: bool = True,
        overrun: bool = False,
        extra_attrs: bytes = b"",
        handler_class: int = HandlerClass.TLSHD,
    ) -> FakeRequest:
        """Queue a handshake request for `sock` and multicast READY.

        The fake keeps its own dup of the socket until DONE or stop().
        `notify=False` queues silently; `overrun=True` replaces the READY by an
        ENOBUFS on each listener's notify socket."""
        fd = sock if isinstance(sock, int) else sock.fileno()
        request = FakeRequest(
            message_type=int(message_type),
            auth_mode=int(auth_mode),
            timeout_ms=timeout_ms,
            peername=peername,
            peer_identities=tuple(peer_identities),
            cert=cert,
            privkey=privkey,
            keyring=keyring,
            extra_attrs=extra_attrs,
            handler_class=int(handler_class),
            sock_key=_socket_key(fd),
            kernel_fd=os.dup(fd),
        )
        _forget_ktls(request.sock_key)  # a new socket has no kTLS yet
        with self._lock:
            self.requests.append(request)
            self._pending.append(request)
        if overrun:
            self.inject_overrun()
        elif notify:
            self.send_raw_notification(nlhelpers.encode_ready(self.family_id, handler_class))
        return request

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def inject_overrun(self) -> None:
        """Make every listener's next notify recv fail with ENOBUFS."""
        self.send_raw_notification(_ENOBUFS)

    def send_raw_notification(self, data: bytes) -> None:
        """Multicast `data` to every client that joined the tlshd group."""
        with self._lock:
            clients = [client for client in self._clients if client.joined]
        for client in clients:
            self._notify_one(client, data)

    def _notify_one(self, client: _Client, data: bytes) -> None:
        # Like netlink multicast: never block; a full queue becomes ENOBUFS.
        try:
            client.notify.send(data)
        except BlockingIOError:
            client.overrun_pending = True
        except OSError:
            pass

    # -- the kernel thread

    def _serve(self) -> None:
        while not self._stopping:
            for key, _events in self._selector.select(timeout=0.05):
                if key.data is None:
                    self._wake_r.recv(64)
                elif key.fileobj is key.data.cmd:
                    self._serve_command(key.data)
                else:
                    self._serve_join(key.data)
            self._flush_overruns()

    def _flush_overruns(self) -> None:
        with self._lock:
            clients = [client for client in self._clients if client.overrun_pending]
        for client in clients:
            with contextlib.suppress(BlockingIOError, OSError):
                client.notify.send(_ENOBUFS)
                client.overrun_pending = False

    def _serve_join(self, client: _Client) -> None:
        try:
            data = client.notify.recv(64)
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        group = None
        if data.startswith(_JOIN) and len(data) == len(_JOIN) + 4:
            group = struct.unpack_from("=I", data, len(_JOIN))[0]
        ok = group in self.group_ids.values()
        with self._joined:
            if group == self.group_ids[HANDSHAKE_MCGRP_TLSHD]:
                client.joined = True
                self._joined.notify_all()
        with contextlib.suppress(OSError):
            client.notify.send(_JOIN_OK if ok else _JOIN_BAD)

    def _drop(self, client: _Client) -> None:
        for sock in (client.notify, client.cmd):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        with self._lock:
            client.joined = False

    def _serve_command(self, client: _Client) -> None:
        try:
            data, fds = _recv_with_fds(client.cmd)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop(client)
            return
        try:
            messages = nl.parse_messages(data)
        except nl.NetlinkDecodeError:
            messages = []
        try:
            for msg in messages:
                self._dispatch(client, msg, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _dispatch(self, client: _Client, msg: NetlinkMessage, fds: list[int]) -> None:
        try:
            replies = self._handle(msg, fds)
        except _Refused as refusal:
            self._reply(client, self._error(msg, refusal.err, refusal.extack))
            return
        except nl.NetlinkDecodeError as err:
            self._reply(client, self._error(msg, errno.EINVAL, str(err)))
            return
        for data, fd in replies:
            self._reply(client, data, fd)
        if msg.flags & nl.NLM_F_ACK and msg.type != GENL_ID_CTRL:
            self._reply(client, self._error(msg, 0))

    def _reply(self, client: _Client, data: bytes, fd: int | None = None) -> None:
        rights = []
        if fd is not None:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        with contextlib.suppress(OSError):
            client.cmd.sendmsg([data], rights)

    @staticmethod
    def _error(msg: NetlinkMessage, err: int, extack: str | None = None) -> bytes:
        """NLMSG_ERROR as netlink_ack() builds it for a CAP_ACK socket."""
        flags = nl.NLM_F_CAPPED
        echoed = struct.pack("=IHHII", 16 + len(msg.payload), msg.type, msg.flags, msg.seq, 0)
        payload = struct.pack("=i", -err) + echoed
        if extack:
            flags |= nl.NLM_F_ACK_TLVS
            payload += nl.encode_attr(nl.NLMSGERR_ATTR_MSG, extack.encode() + b"\0")
        return nl.encode_message(nl.NLMSG_ERROR, flags, msg.seq, payload)

    def _handle(self, msg: NetlinkMessage, fds: list[int]) -> list[tuple[bytes, int | None]]:
        if msg.type == GENL_ID_CTRL:
            return self._handle_ctrl(msg)
        if msg.type != self.family_id or not self.has_family:
            raise _Refused(errno.ENOENT)
        cmd, attrs = nl._genl_attrs(msg)
        if cmd == HandshakeCmd.ACCEPT:
            return self._handle_accept(msg, attrs)
        if cmd == HandshakeCmd.DONE:
            self._handle_done(attrs, fds)
            return []
        raise _Refused(errno.EOPNOTSUPP)

    # ---- nlctrl

    def _handle_ctrl(self, msg: NetlinkMessage) -> list[tuple[bytes, int | None]]:
        cmd, attrs = nl._genl_attrs(msg)
        parsed = dict(nl.iter_attrs(attrs))
        if cmd == nl.CTRL_CMD_GETFAMILY:
            name = nl._string_attr(parsed.get(nl.CTRL_ATTR_FAMILY_NAME, b""))
            if name != HANDSHAKE_FAMILY_NAME or not self.has_family:
                raise _Refused(errno.ENOENT)
            return [(self._family_reply(msg.seq), None)]
        if cmd == nl.CTRL_CMD_GETPOLICY:
            return self._policy_dump(msg.seq, parsed)
        raise _Refused(errno.EOPNOTSUPP)

    def _family_reply(self, seq: int) -> bytes:
        groups = b""
        for index, (name, grp_id) in enumerate(self.group_ids.items(), start=1):
            group = nl.encode_u32(nl.CTRL_ATTR_MCAST_GRP_ID, grp_id)
            group += nl.encode_attr(nl.CTRL_ATTR_MCAST_GRP_NAME, name.encode() + b"\0")
            groups += nl.encode_attr(index | nl.NLA_F_NESTED, group)
        attrs = nl.encode_attr(nl.CTRL_ATTR_FAMILY_NAME, HANDSHAKE_FAMILY_NAME.encode() + b"\0")
        attrs += nl.encode_attr(nl.CTRL_ATTR_FAMILY_ID, struct.pack("=H", self.family_id))
        attrs += nl.encode_attr(nl.CTRL_ATTR_MCAST_GROUPS | nl.NLA_F_NESTED, groups)
        return nl.encode_genl(GENL_ID_CTRL, 1, nl.CTRL_VERSION, seq, attrs, flags=0)

    def _policy_dump(self, seq: int, parsed: dict[int, bytes]) -> list[tuple[bytes, int | None]]:
        family = parsed.get(nl.CTRL_ATTR_FAMILY_ID)
        op = parsed.get(nl.CTRL_ATTR_OP)
        if not self.policy_supported:
            raise _Refused(errno.EOPNOTSUPP)
        if family is None or struct.unpack("=H", family)[0] != self.family_id:
            raise _Refused(errno.ENOENT)
        if op is None or struct.unpack("=I", op)[0] != HandshakeCmd.DONE:
            raise _Refused(errno.EOPNOTSUPP, "fake kernel only dumps the DONE policy")
        family_attr = nl.encode_attr(nl.CTRL_ATTR_FAMILY_ID, struct.pack("=H", self.family_id))
        op_nest = nl.encode_attr(
            HandshakeCmd.DONE | nl.NLA_F_NESTED, nl.encode_u32(nl.CTRL_ATTR_POLICY_DO, 0)
        )
        body = nl.encode_attr(nl.CTRL_ATTR_OP_POLICY | nl.NLA_F_NESTED, op_nest)
        datagram = self._ctrl_multi(seq, family_attr + body)
        for attr_type in range(1, self.done_maxattr + 1):
            spec = nl.encode_u32(1, 3)  # NL_POLICY_TYPE_ATTR_TYPE = NL_ATTR_TYPE_U32
            per_attr = nl.encode_attr(attr_type | nl.NLA_F_NESTED, spec)
            per_policy = nl.encode_attr(0 | nl.NLA_F_NESTED, per_attr)
            body = nl.encode_attr(nl.CTRL_ATTR_POLICY | nl.NLA_F_NESTED, per_policy)
            datagram += self._ctrl_multi(seq, family_attr + body)
        done = nl.encode_message(nl.NLMSG_DONE, nl.NLM_F_MULTI, seq, struct.pack("=i", 0))
        return [(datagram, None), (done, None)]

    @staticmethod
    def _ctrl_multi(seq: int, attrs: bytes) -> bytes:
        return nl.encode_genl(
            GENL_ID_CTRL, nl.CTRL_CMD_GETPOLICY, nl.CTRL_VERSION, seq, attrs, nl.NLM_F_MULTI
        )

    # ---- handshake family

    def _strict_attrs(self, attrs: bytes, maxattr: int) -> list[tuple[int, bytes]]:
        parsed = nlhelpers.parse_attrs(attrs)
        for attr_type, _value in parsed:
            if attr_type > maxattr or attr_type == 0:
                raise _Refused(errno.EINVAL, "Unknown attribute type")
        return parsed

    def _handle_accept(self, msg: NetlinkMessage, attrs: bytes) -> list[tuple[bytes, int | None]]:
        parsed = dict(self._strict_attrs(attrs, _ACCEPT_MAXATTR))
        raw_class = parsed.get(AcceptAttr.HANDLER_CLASS)
        if raw_class is None or len(raw_class) != 4:
            raise _Refused(errno.EINVAL, "Missing attribute: handler-class")
        handler_class = struct.unpack("=I", raw_class)[0]
        if handler_class > _HANDLER_CLASS_MAX:
            raise _Refused(errno.ERANGE, "integer out of range")
        request = self._next_pending(handler_class)
        if request is None:
            self.eagain += 1
            raise _Refused(errno.EAGAIN)
        body = request.accept_attrs(self.family_id)
        reply = nl.encode_genl(
            self.family_id, HandshakeCmd.ACCEPT, HANDSHAKE_FAMILY_VERSION, msg.seq, body, flags=0
        )
        self.accepts += 1
        request.accepted.set()
        return [(reply, request.kernel_fd)]

    def _next_pending(self, handler_class: int) -> FakeRequest | None:
        with self._lock:
            for request in self._pending:
                if request.handler_class == handler_class:
                    self._pending.remove(request)
                    return request
        return None

    def _handle_done(self, attrs: bytes, fds: list[int]) -> None:
        try:
            status, remote_auth = self._validate_done(attrs)
            request = self._request_for_fd(fds)
        except _Refused:
            self.done_errors += 1
            raise
        self.dones += 1
        with self._lock:
            request.done_count += 1
            if request.completed.is_set():
                return  # COMPLETED already set: the kernel ignores it and returns 0
            if request in self._pending:
                self._pending.remove(request)
            request.status = status
            request.remote_auth = tuple(remote_auth)
            self.completion_order.append(request)
            self._release(request)
        request.completed.set()

    def _validate_done(self, attrs: bytes) -> tuple[int, list[int]]:
        status = errno.EIO  # the kernel's default when STATUS is absent
        sockfd_seen = False
        remote_auth: list[int] = []
        for attr_type, value in self._strict_attrs(attrs, self.done_maxattr):
            if len(value) != 4:
                raise _Refused(errno.EINVAL, "invalid attribute length")
            (number,) = struct.unpack("=I", value)
            if attr_type == DoneAttr.STATUS:
                if number > MAX_ERRNO:
                    raise _Refused(errno.ERANGE, "integer out of range")
                status = number
            elif attr_type == DoneAttr.SOCKFD:
                sockfd_seen = True
            elif attr_type == DoneAttr.REMOTE_AUTH:
                remote_auth.append(number)
        if not sockfd_seen:
            raise _Refused(errno.EINVAL, "Missing attribute: sockfd")
        return status, remote_auth

    def _request_for_fd(self, fds: list[int]) -> FakeRequest:
        if not fds:
            raise _Refused(errno.EBADF)
        if not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            raise _Refused(errno.ENOTSOCK)
        key = _socket_key(fds[0])
        with self._lock:
            for request in self.requests:
                if request.sock_key == key:
                    return request
        raise _Refused(errno.EBUSY)

    @staticmethod
    def _release(request: FakeRequest) -> None:
        if request.kernel_fd >= 0:
            os.close(request.kernel_fd)
            request.kernel_fd = -1
