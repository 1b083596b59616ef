"""Everything a worker runs is imported before it drops privileges (issue 11 #10).

After the drop the Python installation may be unreadable to the worker's
account (a pyenv under /root, mode 0700), so a lazy import fails there.  In
a fresh interpreter that has imported only what the zygote imports before
its privilege drop, imports are then blocked and the paths that used to import lazily
are run: a non-ASCII PEERNAME (the `idna` codec) and a sealed alert.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from benchmarks.guest_ready_floor import DAEMON_IMPORTS

# What the zygote has loaded when it drops privileges (workers/zygote.py): the
# daemon's imports up to then, one list shared with the start-up profile, and
# the warm-up handshake.
SCRIPT = DAEMON_IMPORTS + textwrap.dedent(
    """
    import sys
    from tlshd.workers import zygote
    zygote.warm_up_tls()

    class NoImports:
        @staticmethod
        def find_spec(name, path=None, target=None):
            raise ImportError(f"late import of {name} after the privilege drop")

    sys.meta_path.insert(0, NoImports())
    from OpenSSL import SSL
    from tlshd.workers import ktls, verify

    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    verify.expect_peer(conn, verify.parse_peername("bücher.example"))
    suite = ktls.suite_info("TLS_CHACHA20_POLY1305_SHA256")
    ktls.seal_alert(suite, bytes(32), 0, 49)
    print("ok")
    """
)


def test_worker_paths_need_no_import_after_fork() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.stdout == "ok\n", proc.stderr[-2000:]


# What the daemon imports up to the zygote's "ready": the command line's path
# to the fork (tlshd/cli.py, run_main) and the zygote's own start-up
# (workers/zygote.py, init_process).
ZYGOTE_START_UP = (
    DAEMON_IMPORTS + 'import sys\nprint(" ".join(sorted(set(sys.modules) & set(sys.argv[1:]))))\n'
)
# ctypes.util.find_library runs `ldconfig -p`; ctypes.util, and with it
# subprocess, shutil and tempfile, were 0.1-0.2 s of the zygote's start-up under
# emulation (benchmarks/README.md, stops 16 and 17).
PROCESS_TOOLS = ("ctypes.util", "subprocess", "shutil", "tempfile", "glob")


def test_the_zygote_starts_without_ldconfig_or_process_tools() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ZYGOTE_START_UP, *PROCESS_TOOLS],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "\n", f"loaded: {proc.stdout.strip()}"
