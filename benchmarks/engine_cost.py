#!/usr/bin/env python3
"""CPU cost of one x509 handshake in our TLS engine, client and server, on the host.

Runs N engine-to-engine handshakes (client role in this process, server role in
a forked child) over loopback TCP with the test PKI of tests/peers.py and a
stub install_ktls (the host kernel has no kTLS), and prints the per-handshake
CPU time of each side; `--profile` prints cProfile's top functions for the
client and server sides.  No kernel, no QEMU: it shows where the engine's own
time goes (context building, PEM parsing, crypto, Python glue).

    python3 benchmarks/engine_cost.py [-n 200] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tlshd.openssl_conf import ensure_openssl_conf  # noqa: E402

ensure_openssl_conf()  # NumTickets = 0, as the daemon: before OpenSSL loads

from tlshd.workers.engine import perform_handshake  # noqa: E402

from tests.peers import engine_context, make_pki  # noqa: E402
from tlshd.params import HandshakeParams  # noqa: E402
from tlshd.uapi import AuthMode, MsgType  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def serve(listener: socket.socket, pki, n: int, profile: bool) -> None:  # type: ignore[no-untyped-def]
    prof = cProfile.Profile() if profile else None
    c0 = cpu()
    for _ in range(n):
        sock, _ = listener.accept()
        ctx, _cap, _ph = engine_context(pki)
        params = HandshakeParams(
            sockfd=sock.fileno(), message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509
        )
        if prof:
            prof.enable()
        res = perform_handshake(sock, params, ctx)
        if prof:
            prof.disable()
        assert res.status == 0, res
        sock.close()
    print(f"server: {(cpu() - c0) / n * 1000:.2f} ms CPU per handshake", flush=True)
    if prof:
        report(prof, "server")


def report(prof: cProfile.Profile, name: str) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(f"--- {name}: top functions by own time\n{out.getvalue()}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    pki = make_pki(Path(tempfile.mkdtemp(prefix="engine-cost-")))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    pid = os.fork()
    if pid == 0:
        try:
            serve(listener, pki, args.n, args.profile)
        finally:
            os._exit(0)
    prof = cProfile.Profile() if args.profile else None
    c0, t0 = cpu(), time.monotonic()
    for _ in range(args.n):
        sock = socket.create_connection(listener.getsockname())
        ctx, _cap, _ph = engine_context(pki)
        params = HandshakeParams(
            sockfd=sock.fileno(),
            message_type=MsgType.CLIENTHELLO,
            auth_mode=AuthMode.UNAUTH,  # NFS xprtsec=tls
            peername="localhost",
        )
        if prof:
            prof.enable()
        res = perform_handshake(sock, params, ctx)
        if prof:
            prof.disable()
        assert res.status == 0, res
        sock.close()
    wall = time.monotonic() - t0
    print(f"client: {(cpu() - c0) / args.n * 1000:.2f} ms CPU per handshake; "
          f"{args.n / wall:.1f} handshakes/s end to end", flush=True)  # fmt: skip
    os.waitpid(pid, 0)
    if prof:
        report(prof, "client")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
