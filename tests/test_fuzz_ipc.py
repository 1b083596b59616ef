"""Fuzzing the supervisor-worker channel (tlshd/ipc.py, supervisor/keyservice.py).

Direct: `decode`, the `check_*` validators, `recv_message` (fds closed on
rejection) and the key service's request checks, on generated input: only
IpcError (or a refusal reply) may come out.

End to end: a real supervisor on the fake kernel, whose workers run
`fuzz_engine`.  The engine reads an instruction from the TCP peer (the test)
and writes what it says on its channel to the supervisor: random bytes,
oversized datagrams, JSON with wrong types or missing fields, a wrong `req`,
an out-of-range status, junk REMOTE_AUTH, an fd that nobody asked for, an
empty datagram.  Each time the worker must be killed and reaped, its request
must get DONE(EIO) at once (the deadline is a minute away) and the next
request must be served.  Key requests outside the request's scope get a
refusal and the handshake goes on.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tlshd.supervisor.keyservice import RequestScope, SupervisorKeyService

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import Daemon, config_text, recv_exactly, running_daemon, short_tmpdir
from tests.helpers.engines import Peer, fake_ktls
from tests.test_supervisor_junk import wait_gone
from tlshd import ipc
from tlshd.keys import KeyServiceError
from tlshd.params import HandshakeParams, HandshakeResult
from tlshd.uapi import AuthMode, MsgType

pytestmark = pytest.mark.timeout(300)

U32 = 0xFFFFFFFF
S31 = 2**31 - 1

# --------------------------------------------------------------------------
# Generated JSON


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def not_int(optional: bool = False) -> st.SearchStrategy[Any]:
    other = st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8)
    other |= st.lists(st.integers(), max_size=2) | st.dictionaries(
        st.text(max_size=3), st.integers()
    )
    return other if optional else other | st.none()


def bad_int(low: int, high: int, optional: bool = False) -> st.SearchStrategy[Any]:
    return not_int(optional) | st.integers(max_value=low - 1) | st.integers(min_value=high + 1)


def bad_str(limit: int, optional: bool = False) -> st.SearchStrategy[Any]:
    other = st.integers() | st.booleans() | st.lists(st.text(max_size=3), max_size=2)
    other |= st.text(min_size=limit + 1, max_size=limit + 8)
    return other if optional else other | st.none()


REQ = "$REQ"  # the engine puts its request id here; "$REQ+k" means id + k
bad_req = (
    st.integers(1, 2**40).map(lambda k: f"{REQ}+{k}")
    | st.integers(max_value=0)
    | st.integers(min_value=2**63)
    | not_int()
    | st.just(REQ).map(lambda r: [r])
)
# The test's requests name no key serials, so any serial in REMOTE_AUTH is foreign.
bad_remote_auth = (
    st.lists(json_scalars, min_size=1, max_size=8)
    | st.lists(st.integers(0, U32), min_size=1, max_size=5)
    | st.integers()
    | st.text(max_size=5)
    | st.none()
)
bad_base64 = (
    st.text(alphabet="!@#$%^&*() \n", min_size=1, max_size=8)
    | st.just("A" * (ipc.MAX_CERT_DER * 2))
    | st.just("MAMCAQE")  # bad padding
    | not_int().filter(lambda v: not isinstance(v, str))
)

# op -> (a valid message, {field: strategy of values that make it invalid}).
# The valid baseline is only a skeleton: every example changes one field.
SPECS: dict[str, tuple[dict[str, Any], dict[str, st.SearchStrategy[Any]]]] = {
    "phase": (
        {"op": "phase", "req": REQ, "phase": "x", "peer": "p"},
        {"req": bad_req, "phase": bad_str(ipc.MAX_PHASE_LEN), "peer": bad_str(ipc.MAX_PEER_LEN)},
    ),
    "result": (
        {"op": "result", "req": REQ, "result": {"status": 0}},
        {
            "req": bad_req,
            "result": json_values.filter(lambda v: not isinstance(v, dict)),
            "result.status": bad_int(0, ipc.MAX_ERRNO),
            "result.remote_auth": bad_remote_auth,
            "result.cipher": bad_str(ipc.MAX_CIPHER_LEN, optional=True),
            "result.detail": bad_str(ipc.MAX_DETAIL_LEN, optional=True),
        },
    ),
    "key_read": (
        {"op": "key_read", "req": REQ, "id": 1, "serial": 5},
        {"req": bad_req, "id": bad_int(0, S31), "serial": bad_int(1, S31)},
    ),
    "psk_search": (
        {"op": "psk_search", "req": REQ, "id": 1, "identities": ["i"], "keyring": None},
        {
            "req": bad_req,
            "id": bad_int(0, S31),
            "identities": bad_str(ipc.MAX_KEY_DESCRIPTION).map(lambda v: [v])
            | st.just([])
            | st.just(["i"] * (ipc.MAX_PSK_IDENTITIES + 1))
            | not_int(),
            "keyring": bad_int(0, S31, optional=True),
        },
    ),
    "add_cert": (
        {"op": "add_cert", "req": REQ, "id": 1, "der_b64": "MAMCAQE=", "description": "d"},
        {
            "req": bad_req,
            "id": bad_int(0, S31),
            "der_b64": bad_base64,
            "description": bad_str(ipc.MAX_KEY_DESCRIPTION),
        },
    ),
}
REQUIRED = {
    "phase": ["req", "phase", "peer"],
    "result": ["req", "result", "result.status"],
    "key_read": ["req", "id", "serial"],
    "psk_search": ["req", "id", "identities"],
    "add_cert": ["req", "id", "der_b64", "description"],
}


@st.composite
def invalid_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A worker message with exactly one field wrong or missing."""
    op = draw(st.sampled_from(sorted(SPECS)))
    baseline, fields = SPECS[op]
    message = json.loads(json.dumps(baseline))
    field = draw(st.sampled_from(sorted(fields)))
    target, key = message, field
    if "." in field:
        outer, key = field.split(".", 1)
        target = message[outer]
    if field in REQUIRED[op] and draw(st.integers(0, 4)) == 0:
        del target[key]
    else:
        target[key] = draw(fields[field])
    return message


def fill(value: Any, req: int) -> Any:
    """Replace the "$REQ" placeholders by the worker's request id."""
    if isinstance(value, str) and value.startswith(REQ):
        return req + int(value[len(REQ) + 1 :] or 0)
    if isinstance(value, list):
        return [fill(v, req) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, req) for k, v in value.items()}
    return value


def accepted_by_validators(message: dict[str, Any], req: int) -> bool:
    """What tlshd/ipc.py thinks of `message` from a worker busy with `req`
    and no known key serials (a cross-check of the generated junk)."""
    try:
        message = ipc.decode(json.dumps(message).encode(), ipc.WORKER_OPS)
        if message["op"] == "ready":
            return False  # only a booting worker may say it
        ipc.check_req(message, req)
        if message["op"] == "phase":
            ipc.check_str(message, "phase", ipc.MAX_PHASE_LEN)
            ipc.check_str(message, "peer", ipc.MAX_PEER_LEN)
        elif message["op"] == "result":
            return not ipc.check_result(message).remote_auth
        else:
            ipc.KeyRequest.from_message(message)
    except ipc.IpcError:
        return False
    return True


# --------------------------------------------------------------------------
# Direct fuzzing of the codec and validators


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode(data: bytes) -> None:
    try:
        message = ipc.decode(data, ipc.WORKER_OPS)
    except ipc.IpcError:
        return
    assert isinstance(message, dict) and message["op"] in ipc.WORKER_OPS


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "req", "result", "x"]), json_values), json_values)
def test_check_result(message: dict[str, Any], result: Any) -> None:
    message["result"] = result
    try:
        checked = ipc.check_result(message)
    except ipc.IpcError:
        return
    assert 0 <= checked.status <= 4095
    assert len(checked.remote_auth) <= ipc.MAX_REMOTE_AUTH
    assert all(type(s) is int and 0 <= s <= U32 for s in checked.remote_auth)
    assert checked.cipher is None or len(checked.cipher) <= ipc.MAX_CIPHER_LEN
    assert len(checked.detail) <= ipc.MAX_DETAIL_LEN


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(ipc.KEY_OPS)),
    st.dictionaries(
        st.sampled_from(["id", "serial", "identities", "keyring", "der_b64", "description", "req"]),
        json_values
        | st.text(alphabet="ABCD+/=", max_size=12)
        | st.lists(st.text(max_size=6), max_size=3),
    ),
)
def test_key_request_validator(op: str, fields: dict[str, Any]) -> None:
    message = {**fields, "op": op}
    try:
        request = ipc.KeyRequest.from_message(message)
    except ipc.IpcError:
        return
    assert request.op == op and type(request.id) is int
    # What passes the one validator survives its own encoding unchanged.
    assert ipc.KeyRequest.from_message(request.to_message(1)) == request


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(1, 2**40) | st.none())
def test_check_req(value: Any, current: int | None) -> None:
    try:
        assert ipc.check_req({"req": value}, current) == current
    except ipc.IpcError:
        assert value != current or current is None or type(value) is not int


@settings(max_examples=200, deadline=None)
@given(invalid_messages(), st.integers(1, 2**40))
def test_generated_junk_is_junk(message: dict[str, Any], req: int) -> None:
    """Cross-check for the end-to-end test: every generated message is invalid."""
    assert not accepted_by_validators(fill(message, req), req)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["key_read", "psk_search"]),
    st.integers(1, S31),
    st.lists(st.text(min_size=1, max_size=8).filter(ipc.is_key_description), min_size=1),
    st.frozensets(st.integers(1, 100)),
)
def test_keyservice_refuses_out_of_scope(
    op: str, serial: int, identities: list[str], allowed: frozenset[int]
) -> None:
    """Never raises; anything outside the scope is EACCES; no request here may
    reach the kernel's keyrings."""
    assume(serial not in allowed)
    service = SupervisorKeyService(())
    request = ipc.KeyRequest(
        op, serial=serial, identities=tuple(identities[: ipc.MAX_PSK_IDENTITIES])
    )
    reply = service.answer(RequestScope(allowed), request)
    assert (reply.ok, reply.errno, reply.payload) == (False, errno.EACCES, b"")
    json.dumps(reply.to_message(1))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(min_size=1, max_size=512) | json_values.map(lambda v: json.dumps(v).encode()),
    nfds=st.integers(0, 3),
)
def test_recv_message_owns_nothing_on_junk(
    pair: tuple[socket.socket, socket.socket], data: bytes, nfds: int
) -> None:
    a, b = pair
    before = open_fds()
    pipes = [os.pipe() for _ in range(nfds)]
    try:
        if pipes:
            socket.send_fds(a, [data], [r for r, _ in pipes])
        else:
            a.send(data)
        try:
            message, fds = ipc.recv_message(b, ipc.WORKER_OPS)
        except ipc.IpcError:
            fds = []
        else:
            assert message is not None and message["op"] in ipc.WORKER_OPS
            assert len(fds) <= ipc.MAX_FDS
        for fd in fds:
            os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert open_fds() == before


def test_recv_message_oversized(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    for size in (ipc.MAX_MESSAGE + 1, ipc.MAX_MESSAGE + 4096):
        try:
            a.send(b"{" + b" " * (size - 1))
        except OSError as err:  # the kernel itself may refuse a datagram this big
            assert err.errno == errno.EMSGSIZE
            continue
        with pytest.raises(ipc.IpcError):
            ipc.recv_message(b, ipc.WORKER_OPS)


# --------------------------------------------------------------------------
# End to end: a worker that writes junk


def fuzz_engine(sock: socket.socket, params: HandshakeParams, ctx: Any) -> HandshakeResult:
    """Runs in a worker.  Tells the peer its pid, then reads one instruction,
    kind (1 byte) + length (u32) + payload, and acts on it:

    g: succeed; d: succeed with oversized detail and cipher strings (EACCES);
    r: write the payload raw; t: fill the JSON payload's $REQ and write it;
    f: like t, with a pipe fd attached; o: like t, padded past MAX_MESSAGE;
    e: write an empty datagram;
    k: make the key request the payload names, through ctx.keys, and tell
       the peer the outcome ("ok <serial>" or "err <errno>"), then succeed.
    After junk, it waits for the deadline: the supervisor should kill it first.
    """
    channel: socket.socket = ctx.keys._channel
    req: int = ctx.keys._req_id
    sock.sendall(struct.pack("=I", os.getpid()))
    kind = recv_exactly(sock, 1)
    (size,) = struct.unpack("=I", recv_exactly(sock, 4))
    payload = recv_exactly(sock, size) if size else b""
    if kind == b"g":
        fake_ktls(sock, ctx)
        return HandshakeResult(status=0, cipher="FUZZ")
    if kind == b"d":
        return HandshakeResult(status=errno.EACCES, cipher="C" * 300, detail="why? " * 2000)
    if kind == b"k":
        request = json.loads(payload)
        try:
            if request["op"] == "key_read":
                outcome = f"ok {ctx.keys.read_key(request['serial']).serial}"
            else:
                found = ctx.keys.search_psks([request["identity"]], request["keyring"])
                outcome = f"ok {found.serial if found else 0}"
        except KeyServiceError as err:
            outcome = f"err {err.errno}"
        sock.sendall(outcome.encode() + b"\n")
        fake_ktls(sock, ctx)
        return HandshakeResult(status=0, cipher="FUZZ")
    fds: list[int] = []
    if kind == b"r":
        data = payload
    elif kind == b"e":
        data = b""
    else:
        message = fill(json.loads(payload), req)
        if kind == b"o":
            channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            message["pad"] = "x" * ipc.MAX_MESSAGE
        if kind == b"f":
            fds = [os.pipe()[0]]
        data = json.dumps(message).encode()
    if fds:
        socket.send_fds(channel, [data], fds)
    else:
        channel.send(data)
    time.sleep(max(0.0, ctx.deadline - time.monotonic()))
    return HandshakeResult(status=errno.ETIMEDOUT, detail="the supervisor accepted junk")


@pytest.fixture(scope="module")
def daemon(module_kernel: FakeKernel) -> Iterator[Daemon]:
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=4, timeout_ms=60000)
    with running_daemon(
        module_kernel,
        fuzz_engine,
        config=text,
        directory=directory,
        keyservice=SupervisorKeyService(()),
    ) as running:
        yield running


def instruct(peer: Peer, kind: bytes, payload: bytes = b"") -> int:
    """Wait for the worker to report its pid, then send it one instruction."""
    (pid,) = struct.unpack("=I", recv_exactly(peer.client, 4))
    peer.client.sendall(kind + struct.pack("=I", len(payload)) + payload)
    return pid


def serve_good(kernel: FakeKernel) -> None:
    peer = Peer(kernel, timeout_ms=60000)
    try:
        instruct(peer, b"g")
        assert peer.request.wait_done(15) == (0, ())
    finally:
        peer.close()


def assert_junk_kills(
    kernel: FakeKernel, daemon: Daemon, kind: bytes, payload: bytes = b""
) -> None:
    peer = Peer(kernel, timeout_ms=60000)
    try:
        pid = instruct(peer, kind, payload)
        started = time.monotonic()
        assert peer.request.wait_done(15) == (errno.EIO, ()), daemon.log()[-3000:]
        assert time.monotonic() - started < 15  # not the minute-long deadline
        wait_gone(pid)  # killed and reaped by the supervisor
    finally:
        peer.close()
    serve_good(kernel)
    assert daemon.exit_code is None and os.waitpid(daemon.pid, os.WNOHANG) == (0, 0)


E2E = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@E2E
@given(st.binary(min_size=1, max_size=2048))
def test_worker_writes_random_bytes(module_kernel: FakeKernel, daemon: Daemon, data: bytes) -> None:
    try:
        ipc.decode(data, ipc.WORKER_OPS)
    except ipc.IpcError:
        pass
    else:
        assume(False)  # a well-formed message by chance: not junk
    assert_junk_kills(module_kernel, daemon, b"r", data)


@settings(E2E, max_examples=60)
@given(invalid_messages())
def test_worker_writes_invalid_messages(
    module_kernel: FakeKernel, daemon: Daemon, message: dict[str, Any]
) -> None:
    assert_junk_kills(module_kernel, daemon, b"t", json.dumps(message).encode())


@pytest.mark.parametrize(
    "message",
    [
        {"op": "phase", "req": REQ, "phase": "x", "peer": "p"},
        {"op": "result", "req": REQ, "result": {"status": 0}},
    ],
    ids=["phase", "result"],
)
def test_worker_attaches_an_fd_to_a_valid_message(
    module_kernel: FakeKernel, daemon: Daemon, message: dict[str, Any]
) -> None:
    assert_junk_kills(module_kernel, daemon, b"f", json.dumps(message).encode())


def test_worker_sends_an_oversized_datagram(module_kernel: FakeKernel, daemon: Daemon) -> None:
    message = {"op": "phase", "req": REQ, "phase": "x", "peer": "p"}
    assert_junk_kills(module_kernel, daemon, b"o", json.dumps(message).encode())


def test_worker_sends_an_empty_datagram(module_kernel: FakeKernel, daemon: Daemon) -> None:
    """On SOCK_SEQPACKET a zero-length datagram reads like EOF; the worker
    behind it is alive and must not be left running."""
    assert_junk_kills(module_kernel, daemon, b"e")


@pytest.mark.parametrize(
    "message",
    [
        {"op": "ready", "pid": 1, "generation": 1},
        {"op": "result", "req": REQ, "result": {"status": 0, "remote_auth": [4242]}},
        {"op": "result", "req": REQ, "result": {"status": 0, "remote_auth": [1, 2, 3, 4, 5, 6]}},
        {"op": "result", "req": REQ, "result": {"status": -5}},
        {"op": "result", "req": REQ, "result": {"status": 4096}},
        {"op": "result", "req": f"{REQ}+1", "result": {"status": 0}},
    ],
    ids=["ready", "foreign-serial", "six-serials", "negative", "4096", "next-req"],
)
def test_worker_writes_named_junk(
    module_kernel: FakeKernel, daemon: Daemon, message: dict[str, Any]
) -> None:
    assert_junk_kills(module_kernel, daemon, b"t", json.dumps(message).encode())


@settings(E2E, max_examples=20)
@given(
    st.fixed_dictionaries({"op": st.just("key_read"), "serial": st.integers(1, S31)})
    | st.fixed_dictionaries(
        {
            "op": st.just("psk_search"),
            "identity": st.text(max_size=40),  # one offered identity
            "keyring": st.none() | st.integers(1, S31),
        }
    ),
    st.lists(st.integers(1, 1000), max_size=3),
)
def test_key_requests_outside_the_scope_are_refused(
    module_kernel: FakeKernel, daemon: Daemon, request: dict[str, Any], named: list[int]
) -> None:
    """The request names serials 1..1000 (or none); the worker asks for
    another, or searches PSKs in a client handshake: EACCES, and it goes on."""
    if request["op"] == "key_read":
        assume(request["serial"] not in named)
    peer = Peer(
        module_kernel,
        timeout_ms=60000,
        auth_mode=AuthMode.X509 if named else AuthMode.UNAUTH,
        message_type=MsgType.CLIENTHELLO,
        peer_identities=named,
    )
    try:
        instruct(peer, b"k", json.dumps(request).encode())
        line = b""
        while not line.endswith(b"\n"):
            line += recv_exactly(peer.client, 1)
        # EACCES outside the scope; an identity that cannot name a key (empty,
        # with a NUL) is never asked for: not found.
        if request["op"] == "psk_search" and not ipc.is_key_description(request["identity"]):
            assert line == b"ok 0\n"
        else:
            assert line == f"err {errno.EACCES}\n".encode()
        assert peer.request.wait_done(15) == (0, ())
    finally:
        peer.close()


def test_long_strings_from_an_honest_engine_are_not_junk(
    module_kernel: FakeKernel, daemon: Daemon
) -> None:
    """An engine's result with a long detail/cipher is the worker's to trim:
    the status must reach the kernel, not EIO for a 'misbehaving' worker."""
    peer = Peer(module_kernel, timeout_ms=60000)
    try:
        pid = instruct(peer, b"d")
        assert peer.request.wait_done(15) == (errno.EACCES, ()), daemon.log()[-2000:]
    finally:
        peer.close()
    # Not killed (a single-use worker exits by itself after its result).
    log = daemon.log()
    assert f"worker {pid} sent an invalid message" not in log
    assert f"worker {pid} was killed" not in log


def test_every_request_got_exactly_one_done(module_kernel: FakeKernel, daemon: Daemon) -> None:
    serve_good(module_kernel)
    assert module_kernel.requests
    assert all(r.done_count == 1 for r in module_kernel.requests)
    assert module_kernel.done_errors == 0
