#!/opt/tlshd/bin/python3
"""Where the time to READY goes, guest side: the floor under it, then ours.

Runs inside the lab guest (tests/lab) as the scenario of one boot, with the
daemon's own Python; benchmarks/ready_floor.py boots it and prints the
results.  READY is sent when the first zygote is ready (workers/zygote.py,
init_process), and everything on that path runs in one process, one step
after the other: the interpreter, the imports, the credentials, the warm-up
handshakes, the contexts, the privilege drop.  Each is timed here apart,
RUNS (default 5) times, each time in a fresh interpreter:

  interpreter         `python -c pass`
  third-party floor   `import OpenSSL.SSL` alone (with `_hashlib` kept out, as
                      the daemon does): what no Python TLS daemon can skip
  daemon imports      everything the command line and the zygote import on the
                      way to READY (the list in tests/test_worker_imports.py)
  zygote steps        in one process, after those imports: the credentials,
                      the NumTickets probe's in-memory handshake and the
                      engine's warm-up handshake, each run twice (the first
                      run pays OpenSSL's lazy initialisation), the contexts,
                      the seccomp filter, the privileges module

Results: /lab/results/ready-floor.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RESULTS = Path("/lab/results")
PKI = Path("/etc/tlshd/pki-ready-floor")
THIRD_PARTY = "import sys; sys.modules['_hashlib'] = None; import OpenSSL.SSL"
DAEMON_IMPORTS = (
    "from tlshd.openssl_conf import ensure_openssl_conf, keep_system_libcrypto_out\n"
    "ensure_openssl_conf()\n"
    "keep_system_libcrypto_out()\n"
    "import tlshd.cli, tlshd.heap, tlshd.log, tlshd.pemfiles\n"
    "import tlshd.supervisor.firstzygote, tlshd.supervisor.tlsmodule\n"
    "from tlshd.workers import base, engine, seccomp, contexts, privileges\n"
    "import tlshd.credentials, tlshd.selfcheck\n"
)


def wall(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(args, check=True)
    return time.monotonic() - start


def zygote_steps() -> dict[str, float]:
    """The zygote's start-up after its imports, step by step, in this process."""
    exec(DAEMON_IMPORTS, {})  # the OpenSSL set-up included, as the daemon does it
    from tlshd.supervisor.pool import Generation
    from tlshd.workers import seccomp, zygote
    from tlshd.workers.contexts import prepare_contexts
    from tlshd.workers.engine import perform_handshake

    from tlshd import openssl_conf
    from tlshd.config import load_config
    from tlshd.pemfiles import read_credential_files

    config = load_config(os.environ["READY_FLOOR_CONFIG"])
    generation = Generation(1, config, None, None, files=read_credential_files(config))
    steps: dict[str, float] = {}
    last = time.monotonic()

    def done(name: str) -> None:
        nonlocal last
        now = time.monotonic()
        steps[name] = round(now - last, 4)
        last = now

    generation = zygote.parse_credentials_or_exit(generation)
    done("credentials")
    openssl_conf._probe_tickets()
    done("probe handshake, first")
    openssl_conf._probe_tickets()
    done("probe handshake, second")
    zygote.warm_up_engine(perform_handshake, generation)
    done("engine handshake, first")
    zygote.warm_up_engine(perform_handshake, generation)
    done("engine handshake, second")
    prepare_contexts(generation.credentials)
    done("contexts")
    seccomp.prepare_worker_filter()
    done("seccomp filter")
    from tlshd.workers import privileges  # noqa: F401

    done("privileges module")
    return steps


def main() -> int:
    if sys.argv[1:] == ["--steps"]:
        print(json.dumps(zygote_steps()))
        return 0
    import labguest as lg

    runs = int(os.environ.get("READY_FLOOR_RUNS", "5"))
    pkg = Path(sysconfig.get_paths()["purelib"]) / "tlshd"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    lg.make_pki(PKI)
    config = lg.write_config(PKI, loglevel=0)
    env = dict(os.environ, READY_FLOOR_CONFIG=str(config))
    py = sys.executable
    timings: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, args in (
            ("interpreter", [py, "-c", "pass"]),
            ("third-party floor", [py, "-c", THIRD_PARTY]),
            ("daemon imports", [py, "-c", DAEMON_IMPORTS]),
        ):
            timings.setdefault(name, []).append(round(wall(args), 3))
        out = subprocess.run([py, __file__, "--steps"], env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        for name, seconds in json.loads(out).items():
            timings.setdefault(name, []).append(seconds)
    doc = {
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "runs": runs,
        "timings_s": timings,
        "medians_s": {name: statistics.median(values) for name, values in timings.items()},
    }
    (RESULTS / "ready-floor.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
