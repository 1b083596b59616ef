"""tlshd.ipc: the supervisor-worker message codec and its validation."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading

import pytest
from tlshd.workers.handshake import IpcKeyService

from tlshd import ipc
from tlshd.keys import KeyServiceError


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def test_roundtrip_with_fd(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    r, w = os.pipe()
    try:
        ipc.send_message(a, {"op": "handshake", "req": 1}, (r,))
        message, fds = ipc.recv_message(b, ipc.SUPERVISOR_OPS)
        assert message == {"op": "handshake", "req": 1}
        assert len(fds) == 1 and fds[0] != r
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_eof_is_none(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    a.close()
    assert ipc.recv_message(b, ipc.WORKER_OPS) == (None, [])


@pytest.mark.parametrize(
    "data", [b"\xff\xfe", b"[1, 2]", b'"op"', b'{"op": "exec"}', b'{"req": 1}', b"{"]
)
def test_junk_is_rejected_and_fds_closed(pair, data: bytes) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    r, w = os.pipe()
    socket.send_fds(a, [data], [r])
    os.close(r)
    with pytest.raises(ipc.IpcError):
        ipc.recv_message(b, ipc.WORKER_OPS)
    # The received copy was closed: the pipe's read end is gone everywhere.
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


def test_encode_refuses_oversized() -> None:
    with pytest.raises(ipc.IpcError):
        ipc.encode({"op": "phase", "phase": "x" * ipc.MAX_MESSAGE})


@pytest.mark.parametrize(
    ("result", "ok"),
    [
        ({"status": 0}, True),
        ({"status": 0, "remote_auth": [1, 2, 3, 4, 5], "cipher": "TLS_AES_128_GCM_SHA256"}, True),
        ({"status": 4095}, True),
        ({"status": 4096}, False),
        ({"status": -1}, False),
        ({"status": True}, False),
        ({"status": "0"}, False),
        ({}, False),
        ({"status": 0, "remote_auth": [1, 2, 3, 4, 5, 6]}, False),
        ({"status": 0, "remote_auth": [2**32]}, False),
        ({"status": 0, "remote_auth": "1"}, False),
        ({"status": 0, "cipher": 5}, False),
        ({"status": 0, "detail": "x" * 5000}, False),
        ({"status": 0, "extra": {}}, False),  # no field beyond the five
        ({"status": 0, "group": "X25519MLKEM768"}, True),
        ({"status": 0, "group": 7}, False),
    ],
)
def test_check_result(result: dict, ok: bool) -> None:  # type: ignore[type-arg]
    message = {"op": "result", "req": 1, "result": result}
    if ok:
        assert ipc.check_result(message).status == result["status"]
    else:
        with pytest.raises(ipc.IpcError):
            ipc.check_result(message)


def test_check_req_must_match_current_request() -> None:
    assert ipc.check_req({"req": 7}, 7) == 7
    for message, current in (({"req": 8}, 7), ({"req": 7}, None), ({"req": "7"}, 7), ({}, 7)):
        with pytest.raises(ipc.IpcError):
            ipc.check_req(message, current)


def b64(data: bytes) -> str:
    return ipc.b64encode(data)


def test_key_request_roundtrip() -> None:
    for request in (
        ipc.KeyRequest("key_read", 1, serial=5),
        ipc.KeyRequest("psk_search", 2, identities=("id", "NVMe0R01 h s"), keyring=77),
        ipc.KeyRequest("psk_search", 2, identities=("é" * 2047,)),  # 4094 bytes of UTF-8
        ipc.KeyRequest("add_cert", 3, der=b"\x30\x03\x02\x01\x01", description="d"),
    ):
        message = ipc.decode(ipc.encode(request.to_message(9)), ipc.WORKER_OPS)
        assert ipc.KeyRequest.from_message(message) == request


MALFORMED = [
    {"op": "key_read", "id": 1},
    {"op": "key_read", "id": 1, "serial": "123"},
    {"op": "key_read", "id": 1, "serial": True},
    {"op": "key_read", "id": 1, "serial": 1.0},
    {"op": "key_read", "id": 1, "serial": 0},
    {"op": "key_read", "id": 1, "serial": -3},
    {"op": "key_read", "id": 1, "serial": 2**31},
    {"op": "key_read", "id": -1, "serial": 5},
    {"op": "psk_search", "id": 1, "identity": "old-style"},
    {"op": "psk_search", "id": 1, "identities": []},
    {"op": "psk_search", "id": 1, "identities": [""]},
    {"op": "psk_search", "id": 1, "identities": [5]},
    {"op": "psk_search", "id": 1, "identities": ["a\0b"]},
    {"op": "psk_search", "id": 1, "identities": ["x" * 4096]},
    {"op": "psk_search", "id": 1, "identities": ["é" * 2048]},  # 4096 bytes
    {"op": "psk_search", "id": 1, "identities": ["x"] * (ipc.MAX_PSK_IDENTITIES + 1)},
    {"op": "psk_search", "id": 1, "identities": "abc"},
    {"op": "psk_search", "id": 1, "identities": ["ok"], "keyring": "1"},
    {"op": "psk_search", "id": 1, "identities": ["ok"], "keyring": -2},
    {"op": "add_cert", "id": 1, "der_b64": "!!!", "description": "d"},
    {"op": "add_cert", "id": 1, "der_b64": "", "description": "d"},
    {"op": "add_cert", "id": 1, "der_b64": b64(b"x"), "description": ""},
    {"op": "add_cert", "id": 1, "der_b64": b64(b"x")},
    {"op": "add_cert", "id": 1, "der_b64": "A" * (ipc.MAX_CERT_DER * 2), "description": "d"},
    {"op": "key_write", "id": 1, "serial": 1},
    {"op": "phase", "id": 1},
]


@pytest.mark.parametrize("message", MALFORMED)
def test_malformed_key_requests(message: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ipc.IpcError):
        ipc.KeyRequest.from_message(message)


def test_key_limits_are_the_kernels() -> None:
    """One definition each: what a key description may be, and what the worker trims."""
    assert ipc.is_key_description("x" * 4095) and not ipc.is_key_description("x" * 4096)
    assert ipc.fit_key_description("a\0b" + "x" * 5000) == "ab" + "x" * 4093
    assert len(ipc.fit_key_description("é" * 3000).encode()) == 4094


def _answer(sock: socket.socket, replies: dict[str, dict]) -> threading.Thread:  # type: ignore[type-arg]
    def serve() -> None:
        while True:
            message, _ = ipc.recv_message(sock, ipc.WORKER_OPS)
            if message is None:
                return
            # A stale reply for another id first: the client must skip it.
            ipc.send_message(sock, {"op": "key_reply", "id": 999, "ok": False})
            ipc.send_message(
                sock, {"op": "key_reply", "id": message["id"], **replies[message["op"]]}
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_ipc_key_service_roundtrip(pair) -> None:  # type: ignore[no-untyped-def]
    import time

    worker, supervisor = pair
    _answer(
        supervisor,
        {
            "key_read": {
                "ok": True,
                "errno": 0,
                "serial": 5,
                "description": "psk",
                "payload_b64": ipc.b64encode(b"key"),
            },
            "psk_search": {"ok": False, "errno": errno.ENOKEY, "serial": 0},
            "add_cert": {"ok": True, "errno": 0, "serial": 77},
        },
    )
    keys = IpcKeyService(worker, req_id=3, deadline=time.monotonic() + 10)
    material = keys.read_key(5)
    assert (material.serial, material.description, material.payload) == (5, "psk", b"key")
    assert keys.search_psks(["identity"], None) is None
    assert keys.add_peer_certificate(b"der", "cert") == 77


def test_ipc_key_service_errors_and_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    import time

    worker, supervisor = pair
    keys = IpcKeyService(worker, req_id=3, deadline=time.monotonic() + 0.2)
    with pytest.raises(KeyServiceError) as info:
        keys.read_key(5)  # nobody answers
    assert info.value.errno == errno.ETIMEDOUT
    sent = json.loads(supervisor.recv(4096))
    assert sent == {"op": "key_read", "req": 3, "id": 1, "serial": 5}
    keys = IpcKeyService(worker, req_id=3, deadline=time.monotonic() + 5)
    ipc.send_message(supervisor, {"op": "key_reply", "id": 2, "ok": False, "errno": errno.EACCES})
    with pytest.raises(KeyServiceError) as info:
        keys._next_id = 2
        keys.read_key(6)
    assert info.value.errno == errno.EACCES


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 200_000,  # RecursionError inside json.loads
        b'{"op":"phase","x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"op":"phase","x":[[[[[1]]]]]}',  # parses, but deeper than any real message
        b'{"op":"phase","phase":"\\ud800"}',  # lone surrogate
        b'{"op":"phase","\\udfff":1}',  # ... as a key
        b'{"op":"phase","phase":"\xed\xa0\x80"}',  # ... as UTF-8 bytes (surrogatepass)
        '{"op":"phase","phase":"\\ud800"}'.encode("utf-16-le"),  # ... escaped, in UTF-16
        b'{"op":"phase","phase":"\\uDbFf"}',  # ... in upper case
        b'{"op":"phase","n":NaN}',
        b'{"op":"phase","n":-Infinity}',
        b'{"op":"phase","n":' + b"9" * 5000 + b"}",  # over int's str-digits limit
        b'{"op":[]}',  # unhashable op (found by test_fuzz_ipc)
        b'{"op":{}}',
    ],
)
def test_decode_turns_every_hostile_input_into_ipc_error(data: bytes) -> None:
    with pytest.raises(ipc.IpcError):
        ipc.decode(data, ipc.WORKER_OPS)


def test_the_fast_path_skips_the_walk_only_for_plain_messages() -> None:
    """`_check_tree` is skipped only where it could not find anything."""
    plain = ipc.encode({"op": "result", "req": 1, "result": {"status": 0, "remote_auth": [1]}})
    assert not ipc._may_break_limits(plain)
    for odd in (
        b'{"op":"phase","x":[[[[1]]]]}',  # five containers: could be too deep
        '{"op":"phase","phase":"\u00e9"}'.encode(),  # not ASCII
        b'{"op":"phase","phase":"\\\\ud800"}',  # a backslash, then "ud800": checked anyway
    ):
        assert ipc._may_break_limits(odd), odd


def test_decode_accepts_the_deepest_real_message() -> None:
    message = {"op": "result", "req": 1, "result": {"status": 0, "remote_auth": [1, 2]}}
    assert ipc.decode(ipc.encode(message), ipc.WORKER_OPS) == message
