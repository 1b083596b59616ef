#!/usr/bin/python3
"""Upstream tlshd 1.4.0 against a kernel without TLS_TX_MAX_PAYLOAD_LEN, then ours.

Meant for the ``forky-6.12`` image: a forky root (ktls-utils 1.4.0) on Debian
13's 6.12 kernel.  Upstream 1.4.0 programs the RFC 8449 record size limit with
``setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN)`` after every handshake and fails
the handshake with EIO when the kernel (< 6.19) answers ENOPROTOOPT.  Our
daemon must not share that failure.  One boot, both daemons in turn:

1. ``upstream_rsl``: upstream 1.4.0 serves an ``xprtsec=tls`` mount of
   127.0.0.1 (``retry=0``: one attempt); records the mount, the handshakes'
   DONE statuses and the daemon's log lines about the sockopt.
2. ``ours_rsl``: our daemon serves ``xprtsec=tls`` (127.0.0.2) and ``mtls``
   (127.0.0.3) mounts with I/O, as nfs_scenarios.mounted_scenario does.

Writes /lab/results/scenarios/{rsl_setup,upstream_rsl,ours_rsl}.json.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import labguest as lg
import nfs_scenarios as nfs

SOCKOPT = "TLS_TX_MAX_PAYLOAD_LEN"


def log_lines_about(text: str, what: str) -> list[str]:
    return [ln for ln in text.splitlines() if what in ln][-10:]


def sc_upstream() -> dict:
    mark = "LAB upstream_rsl begin"
    lg.trace_mark(mark)
    out: dict = {"daemon_pid": lg.start_daemon("upstream")}
    out["mount"] = lg.mount_nfs("127.0.0.1", "/", "/mnt/upstream", "tls", timeout=120,
                                extra="retry=0")  # fmt: skip
    if out["mount"]["rc"] == 0:
        out["io"] = nfs.io_check("/mnt/upstream", "upstream.bin")
        lg.umount("/mnt/upstream")
    out["handshakes"] = lg.handshakes(since=mark)
    out["hs"] = nfs.hs_summary(out["handshakes"])
    out["statuses"] = sorted({h["status"] for h in out["handshakes"] if "status" in h})
    lg.stop_daemon()
    logs = lg.RESULTS / "daemon-upstream.log", lg.RESULTS / "syslog.log"
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
    out["sockopt_log"] = log_lines_about(text, SOCKOPT)
    out["ok"] = True  # the test judges; this only reports
    return out


def sc_ours() -> dict:
    out: dict = {"daemon_pid": lg.start_daemon("ours")}
    out["tls"] = nfs.mounted_scenario("ours_rsl_tls", "127.0.0.2", "tls")
    out["mtls"] = nfs.mounted_scenario("ours_rsl_mtls", "127.0.0.3", "mtls")
    lg.stop_daemon()
    text = (lg.RESULTS / "daemon-ours.log").read_text(errors="replace")
    out["sockopt_log"] = log_lines_about(text, SOCKOPT)
    out["ok"] = out["tls"]["ok"] and out["mtls"]["ok"]
    return out


def main() -> int:
    setup: dict = {"ok": False, "kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    try:
        lg.make_pki()
        lg.write_config()
        lg.trace_on()
        lg.nfs_server()
        setup["ok"] = True
    except Exception as e:
        setup["error"] = f"{type(e).__name__}: {e}"
        setup["traceback"] = traceback.format_exc()
    lg.write_result("rsl_setup", setup)
    if not setup["ok"]:
        return 1
    failed = 0
    for name, fn in (("upstream_rsl", sc_upstream), ("ours_rsl", sc_ours)):
        lg.log(f"=== {name}")
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as e:
            res = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}  # fmt: skip
        res["seconds"] = round(time.monotonic() - t0, 2)
        lg.write_result(name, res)
        failed += not res["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
