"""RFC 8449 record_size_limit against the real kernel's kTLS, server role.

Issue 12, item 3.  No kernel consumer offers a record_size_limit (our own
client never does, see docs/operations.md), so this drives the daemon's
engine directly, in the guest, on a loopback TCP connection with real kTLS:

1. ``tlsmodule.ensure_tls_module()`` as the supervisor runs it at start
   (loads tls.ko, probes TLS_TX_MAX_PAYLOAD_LEN, tells the engine);
2. ``perform_handshake`` (server role, x509) against a pyOpenSSL client that
   offers record_size_limit = 513 (512 data bytes) in its ClientHello, with the
   engine's default kTLS installer and record capper;
3. the kTLS socket sends 4000 bytes; the client reads the raw records off its
   socket, notes each record's length and decrypts them.

The same with a client that offers no limit is the control.  Run with the
daemon's Python: ``/opt/tlshd/bin/python record_size_scenario.py``.
Writes /lab/results/scenarios/record_size.json.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

import labguest as lg

from tlshd.openssl_conf import ensure_openssl_conf

# our OPENSSL_CONF (NumTickets = 0) must be in place before OpenSSL loads, as
# the daemon's CLI does it: no session tickets among the records we count
ensure_openssl_conf()

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from OpenSSL import SSL  # noqa: E402
from OpenSSL._util import ffi, lib  # noqa: E402
from tlshd.supervisor import tlsmodule  # noqa: E402
from tlshd.workers import kernelcaps  # noqa: E402
from tlshd.workers.engine import HandshakeContext, perform_handshake  # noqa: E402

from tlshd.config import Config  # noqa: E402
from tlshd.credentials import Credentials, RoleCredentials  # noqa: E402
from tlshd.log import handshake_logger  # noqa: E402
from tlshd.params import HandshakeParams  # noqa: E402
from tlshd.uapi import SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, AuthMode, MsgType  # noqa: E402

LIMIT = 513  # RFC 8449, TLS 1.3: 512 data bytes + the ContentType byte
PAYLOAD = 4000
TAG = 16


def self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlshd-lab")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )  # fmt: skip


def client_context(limit: int | None) -> tuple[SSL.Context, list[object]]:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *_a: True)
    keep: list[object] = []
    if limit is not None:
        body = ffi.new("unsigned char[]", struct.pack("!H", limit))

        @ffi.callback("int(SSL *, unsigned int, unsigned char **, size_t *, int *, void *)")
        def add(_ssl, _type, out, outlen, _alert, _arg):  # type: ignore[no-untyped-def]
            out[0] = body
            outlen[0] = 2
            return 1

        lib.SSL_CTX_add_client_custom_ext(ctx._context, 28, add, ffi.NULL, ffi.NULL, ffi.NULL,
                                          ffi.NULL)  # fmt: skip
        keep += [body, add]
    return ctx, keep


def client_handshake(conn: SSL.Connection, sock: socket.socket) -> None:
    while True:
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        else:
            break
        with contextlib.suppress(SSL.WantReadError):
            sock.sendall(conn.bio_read(65536))
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("server closed during the handshake")
        conn.bio_write(data)
    with contextlib.suppress(SSL.WantReadError):
        sock.sendall(conn.bio_read(65536))  # our Finished


def read_records(conn: SSL.Connection, sock: socket.socket, want: int) -> tuple[list[int], bytes]:
    """Raw record lengths off the wire, and the decrypted data, until `want` bytes."""
    lengths: list[int] = []
    plain = b""
    buf = b""
    sock.settimeout(20)
    while len(plain) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
            size = int.from_bytes(buf[3:5], "big")
            record, buf = buf[: 5 + size], buf[5 + size :]
            if record[0] == 23:  # application_data: every protected record
                lengths.append(size)
            conn.bio_write(record)
            try:
                while True:
                    plain += conn.recv(65536)
            except SSL.WantReadError:
                pass
    return lengths, plain


def one_run(name: str, limit: int | None, cert: bytes, key: bytes) -> dict:
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    ctx = HandshakeContext(
        config=Config(),
        credentials=Credentials(client=RoleCredentials(), server=RoleCredentials(cert, key)),
        keys=None,  # type: ignore[arg-type]  # x509 server: no kernel keys
        deadline=time.monotonic() + 30,
        log=handshake_logger(name, "127.0.0.1"),
    )
    out: dict = {"limit": limit, "capper": ctx.cap_tx_records is not None}
    params = HandshakeParams(sockfd=server_sock.fileno(), message_type=MsgType.SERVERHELLO,
                             auth_mode=AuthMode.X509)  # fmt: skip
    result: dict = {}
    server = threading.Thread(
        target=lambda: result.update(r=perform_handshake(server_sock, params, ctx))
    )
    server.start()
    cctx, keep = client_context(limit)
    conn = SSL.Connection(cctx, None)
    conn.set_connect_state()
    client_handshake(conn, client_sock)
    server.join(30)
    r = result["r"]
    out.update(status=r.status, detail=r.detail, cipher=r.cipher)
    if r.status == 0:
        try:
            value = server_sock.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)
            out["tx_max_payload_len"] = struct.unpack("=H", value)[0]
        except OSError as e:
            out["tx_max_payload_len"] = errno.errorcode.get(e.errno or 0, str(e))
        sent = bytes(range(256)) * (PAYLOAD // 256) + b"x" * (PAYLOAD % 256)
        server_sock.sendall(sent)  # through kTLS
        lengths, plain = read_records(conn, client_sock, PAYLOAD)
        out.update(record_lengths=lengths, data_ok=plain == sent)
    del keep
    for s in (client_sock, server_sock):
        s.close()
    return out


def main() -> int:
    out: dict = {"ok": False, "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    try:
        out["tls_module"] = tlsmodule.ensure_tls_module()
        out["probe"] = tlsmodule.tx_max_payload_len_supported()
        out["engine_caps"] = kernelcaps.caps_tx_records()
        cert, key = self_signed()
        out["with_limit"] = one_run("rsl-512", LIMIT, cert, key)
        out["without_limit"] = one_run("rsl-none", None, cert, key)
        out["tag"] = TAG
        out["ok"] = True  # the test judges
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    lg.write_result("record_size", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
