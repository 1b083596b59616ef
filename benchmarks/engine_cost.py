#!/usr/bin/env python3
"""CPU cost of one x509 handshake in our TLS engine, client and server, on the host.

Runs N engine-to-engine handshakes (client role on one side, server role on the
other, a forked process) over loopback TCP with the test PKI of
tests/peers.py and a stub install_ktls (the host kernel has no kTLS), and
prints the per-handshake CPU time of each side.  No kernel, no QEMU: it shows
where the engine's own time goes (context building, PEM parsing, crypto,
Python glue).

Default: both sides run every handshake in one long-lived process each;
`--profile` prints cProfile's top functions for each side.

`--workers`: as the daemon does it.  Each side is a zygote-like process that
warms the engine with one handshake (workers/zygote.warm_up_engine), then
forks one single-use child per handshake; the child runs the engine once and
exits.  Printed per side: the engine's CPU in the child (perform_handshake
only) and the children's whole CPU (fork, handshake, exit; RUSAGE_CHILDREN).
`--prepared` makes the zygotes prepare the generation's contexts after the
warm-up (workers/contexts.prepare_contexts), as workers/zygote.py does;
without it every child builds its contexts.  `--system-trust` configures no
server-role trust store, so the server role loads the system bundle (what a
server without `x509.truststore` does); the client role trusts the test CA.

    python3 benchmarks/engine_cost.py [-n 200] [--profile]
    python3 benchmarks/engine_cost.py --workers [--prepared] [--system-trust] [-n 200]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import os
import pstats
import resource
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tlshd.openssl_conf import ensure_openssl_conf  # noqa: E402

ensure_openssl_conf()  # NumTickets = 0, as the daemon: before OpenSSL loads

from tlshd.supervisor.pool import Generation  # noqa: E402
from tlshd.workers.contexts import prepare_contexts, prepared_shapes  # noqa: E402
from tlshd.workers.engine import HandshakeContext, perform_handshake  # noqa: E402
from tlshd.workers.zygote import warm_up_engine  # noqa: E402

from tests.helpers.forked import run_in_child  # noqa: E402
from tests.peers import Pki, engine_context, make_pki  # noqa: E402
from tlshd.config import Config  # noqa: E402
from tlshd.credentials import Credentials, RoleCredentials  # noqa: E402
from tlshd.params import HandshakeParams  # noqa: E402
from tlshd.uapi import AuthMode, MsgType  # noqa: E402

Handshake = Callable[[socket.socket], None]


def cpu(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def generation_credentials(pki: Pki, system_trust: bool) -> Credentials:
    server_trust = None if system_trust else pki.ca.cert_pem
    return Credentials(
        client=RoleCredentials(truststore_pem=pki.ca.cert_pem),
        server=RoleCredentials(pki.server.cert_pem, pki.server.key_pem, server_trust),
    )


def daemon_context(creds: Credentials) -> HandshakeContext:
    ctx, _cap, _ph = engine_context(client=creds.client, server=creds.server)
    # engine_context turns DEBUG on for the tests; the daemon's default is INFO
    # ([debug] loglevel=0), and debug lines cost CPU when they are on.
    logging.getLogger("tlshd").setLevel(logging.INFO)
    return ctx


def server_handshake(creds: Credentials) -> Handshake:
    def run(sock: socket.socket) -> None:
        ctx = daemon_context(creds)
        params = HandshakeParams(
            sockfd=sock.fileno(), message_type=MsgType.SERVERHELLO, auth_mode=AuthMode.X509
        )
        res = perform_handshake(sock, params, ctx)
        assert res.status == 0, res

    return run


def client_handshake(creds: Credentials) -> Handshake:
    def run(sock: socket.socket) -> None:
        ctx = daemon_context(creds)
        params = HandshakeParams(
            sockfd=sock.fileno(),
            message_type=MsgType.CLIENTHELLO,
            auth_mode=AuthMode.UNAUTH,  # NFS xprtsec=tls
            peername="localhost",
        )
        res = perform_handshake(sock, params, ctx)
        assert res.status == 0, res

    return run


class InProcess:
    """Every handshake in this process (optionally under cProfile)."""

    def __init__(self, profile: bool) -> None:
        self.prof = cProfile.Profile() if profile else None
        self.cpu = 0.0

    def run(self, handshake: Handshake, sock: socket.socket) -> None:
        c0 = cpu()
        if self.prof:
            self.prof.enable()
        handshake(sock)
        if self.prof:
            self.prof.disable()
        self.cpu += cpu() - c0

    def summary(self, name: str, n: int) -> str:
        text = f"{name}: {self.cpu / n * 1000:.2f} ms CPU per handshake"
        if self.prof:
            out = io.StringIO()
            pstats.Stats(self.prof, stream=out).sort_stats("tottime").print_stats(18)
            text += f"\n--- {name}: top functions by own time\n{out.getvalue()}"
        return text


class SingleUseWorkers:
    """Every handshake in a child forked for it, as the zygote's workers."""

    def __init__(self) -> None:
        self.engine_cpu = 0.0
        self.children_cpu = 0.0
        self.took_prepared = 0
        self.faults = 0  # minor page faults: mostly copy-on-write of the zygote's pages

    def run(self, handshake: Handshake, sock: socket.socket) -> None:
        def in_worker() -> bytes:
            shapes = len(prepared_shapes())
            c0, faults0 = cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            handshake(sock)
            used = cpu() - c0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
            took = shapes - len(prepared_shapes())
            return struct.pack("=dii", used, took, faults)

        children0 = cpu(resource.RUSAGE_CHILDREN)
        report = run_in_child(in_worker)
        self.children_cpu += cpu(resource.RUSAGE_CHILDREN) - children0
        used, took, faults = struct.unpack("=dii", report)
        self.engine_cpu += used
        self.took_prepared += took
        self.faults += faults

    def summary(self, name: str, n: int) -> str:
        return (
            f"{name}: {self.engine_cpu / n * 1000:.2f} ms engine CPU per handshake, "
            f"{self.children_cpu / n * 1000:.2f} ms per worker (fork, handshake, exit), "
            f"{self.faults / n:.0f} minor faults in the engine; "
            f"{self.took_prepared}/{n} took a prepared context"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="cProfile (in-process mode only)")
    ap.add_argument("--workers", action="store_true", help="fork a single-use worker per handshake")
    ap.add_argument("--prepared", action="store_true", help="with --workers: prepare contexts")
    ap.add_argument("--system-trust", action="store_true", help="server role: system trust store")
    args = ap.parse_args()
    if args.prepared and not args.workers:
        ap.error("--prepared needs --workers: a prepared context serves one handshake per process")
    if args.profile and args.workers:
        ap.error("--profile measures the in-process mode")
    pki = make_pki(Path(tempfile.mkdtemp(prefix="engine-cost-")))
    creds = generation_credentials(pki, args.system_trust)
    if args.workers:
        # The zygote's start-up, once, inherited by both sides' zygote-like processes.
        assert warm_up_engine(perform_handshake, Generation(1, Config(), creds, None))
        if args.prepared:
            print(f"prepared: {', '.join(s.value for s in prepare_contexts(creds))}")
        gc.freeze()  # as the zygote, so no collection in a worker walks its heap

    def runner() -> InProcess | SingleUseWorkers:
        return SingleUseWorkers() if args.workers else InProcess(args.profile)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    pid = os.fork()
    if pid == 0:
        try:
            server, serve = runner(), server_handshake(creds)
            for _ in range(args.n):
                sock, _ = listener.accept()
                server.run(serve, sock)
                sock.close()
            print(server.summary("server", args.n), flush=True)
        finally:
            os._exit(0)
    client, connect = runner(), client_handshake(creds)
    t0 = time.monotonic()
    for _ in range(args.n):
        sock = socket.create_connection(listener.getsockname())
        client.run(connect, sock)
        sock.close()
    wall = time.monotonic() - t0
    os.waitpid(pid, 0)
    print(client.summary("client", args.n), flush=True)
    print(f"{args.n / wall:.1f} handshakes/s end to end", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
