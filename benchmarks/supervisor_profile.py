"""Profile the supervisor's own CPU per request in a burst (fake kernel).

    .venv/bin/python benchmarks/supervisor_profile.py [--pairs 64] [--top 30]

Runs the daemon against the fake kernel of the tests (tests/fakekernel.py),
with workers whose "handshake" is one byte each way between the two halves
of a loopback connection, and cProfiles the supervisor only: what the
supervisor spends per request (ACCEPT, hand-off, result, DONE, and the loop
passes around them) with the handshakes themselves taken out.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from tests.fakekernel import FakeKernel
from tests.helpers.daemon import (
    config_text,
    running_daemon,
    short_tmpdir,
    tcp_pair,
)
from tests.helpers.engines import pair_engine
from tlshd.uapi import AuthMode, MsgType


def profile_supervisor(out: Path) -> None:
    """In the daemon process, before the Arbiter is built: profile its run()."""
    from tlshd.supervisor import arbiter

    original = arbiter.Arbiter.run

    def run(self: arbiter.Arbiter) -> int:
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        try:
            return original(self)
        finally:
            prof.disable()
            prof.dump_stats(str(out))

    arbiter.Arbiter.run = run  # type: ignore[method-assign]


def burst(pairs: int, profile: Path | None) -> float:
    """One burst of `pairs` loopback pairs; the supervisor's CPU seconds per
    request (utime + stime from first submit to last DONE)."""
    directory = short_tmpdir()
    text = config_text(directory / "status.sock", min_workers=2, max_workers=192, timeout_ms=30000)
    text = text.replace("loglevel=1", "loglevel=0")  # upstream's shipped default
    with (
        FakeKernel() as kernel,
        running_daemon(
            kernel,
            pair_engine,
            config=text,
            directory=directory,
            in_child=(lambda: profile_supervisor(profile)) if profile else None,
        ) as daemon,
    ):
        supervisor = psutil.Process(daemon.pid)
        sockets = [tcp_pair() for _ in range(pairs)]
        cpu0 = sum(supervisor.cpu_times()[:2])
        requests = []
        for client, server in sockets:
            requests.append(kernel.submit(client, MsgType.CLIENTHELLO, AuthMode.UNAUTH))
            requests.append(kernel.submit(server, MsgType.SERVERHELLO, AuthMode.X509))
        statuses = [r.wait_done(120)[0] for r in requests]
        cpu = sum(supervisor.cpu_times()[:2]) - cpu0
        if statuses != [0] * len(requests):
            raise SystemExit(f"failed handshakes: {statuses}")
        os.kill(daemon.pid, signal.SIGTERM)  # a graceful stop writes the profile
        daemon.wait(30)
        for client, server in sockets:
            client.close()
            server.close()
    return cpu / len(requests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5, help="unprofiled bursts to time")
    ap.add_argument("--no-profile", action="store_true", help="only the unprofiled bursts")
    args = ap.parse_args(argv)
    per_request = [burst(args.pairs, None) for _ in range(args.rounds)]
    per_request.sort()
    print(
        f"supervisor CPU per request, {args.rounds} bursts of {2 * args.pairs} requests "
        f"(loglevel=0): median {per_request[len(per_request) // 2] * 1000:.2f} ms, "
        f"range {per_request[0] * 1000:.2f}-{per_request[-1] * 1000:.2f} ms"
    )
    if args.no_profile:
        return 0
    out = Path(tempfile.mkdtemp(prefix="tlshd-prof-")) / "supervisor.prof"
    burst(args.pairs, out)
    for _ in range(100):  # the daemon writes it as it stops
        if out.exists():
            break
        time.sleep(0.1)
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
