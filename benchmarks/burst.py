#!/usr/bin/env python3
"""Burst benchmark: concurrent NFS-over-TLS mounts, our tlshd vs upstream tlshd 1.0.0.

Boots the lab guest (tests/lab) ONCE and runs benchmarks/guest_burst.py in it:
for every burst size and both daemons, N simultaneous `xprtsec=tls` mounts to
distinct 127.0.x.y addresses, measured from the kernel's handshake
tracepoints.  Then one extra burst with our daemon in which a busy worker is
SIGKILLed (kill-to-DONE delay).  Prints a table and writes the raw results.

    sudo python3 benchmarks/burst.py [--sizes 8 32 64] [--daemons upstream ours]
                                     [--rounds 1] [--kill 16] [--memory 8192]

Run as root on the lab host.  It waits until no other qemu-system process runs
(numbers taken next to another TCG guest are worthless) and records any that
appears during the run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.lab.vm import run_guest  # noqa: E402

HERE = Path(__file__).resolve().parent
GUEST_SCRIPT = HERE / "guest_burst.py"


def other_qemus(exclude: str = "") -> list[str]:
    """Command lines of running qemu-system processes (not ours: `exclude` in it)."""
    p = subprocess.run(["pgrep", "-fa", "qemu-system"], capture_output=True, text=True)
    return [ln[:160] for ln in p.stdout.splitlines()
            if ln.strip() and not (exclude and exclude in ln)]  # fmt: skip


def wait_for_quiet_host(poll_s: float = 15.0) -> None:
    while busy := other_qemus():
        print(f"waiting: another QEMU runs: {busy[0]}", file=sys.stderr, flush=True)
        time.sleep(poll_s)


class QemuWatch(threading.Thread):
    """Notes every foreign qemu-system process seen while our guest runs."""

    def __init__(self, ours: str) -> None:
        super().__init__(daemon=True)
        self.ours = ours  # a string only our guest's command line contains
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(5):
            self.seen.update(other_qemus(self.ours))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


def summarize(burst: dict[str, Any]) -> dict[str, Any]:
    if "error" in burst:
        return {"label": burst["label"], "error": burst["error"].splitlines()[-1]}
    reqs = burst["requests"]
    done = [r for r in reqs if "status" in r]
    lat = [r["latency"] for r in done]
    ok_lat = [r["latency"] for r in done if r["status"] == 0]
    out = {
        "label": burst["label"],
        "daemon": burst["daemon"],
        "size": burst["size"],
        "mounts_ok": burst["mounts_ok"],
        "wall_s": burst["wall_s"],
        "requests": len(reqs),
        "client_requests": sum(1 for r in reqs if r.get("role") == "client"),
        "server_requests": sum(1 for r in reqs if r.get("role") == "server"),
        "cancelled": sum(1 for r in reqs if "status" not in r),
        "failed": sum(1 for r in done if r["status"] != 0),
        "failed_statuses": sorted({r["status"] for r in done if r["status"] != 0}),
        "p50_s": percentile(lat, 50),
        "p90_s": percentile(lat, 90),
        "p99_s": percentile(lat, 99),
        "p99_ok_s": percentile(ok_lat, 99),
        "max_s": max(lat) if lat else None,
        "peak_pss_mib": round(burst["peak_pss_bytes"] / 2**20, 1),
        "idle_pss_mib": round(burst["idle_pss_bytes"] / 2**20, 1),
        "max_procs": burst["max_procs"],
        "listening_s": burst["listening_s"],
        "settle_s": burst["settle_s"],
    }
    accepted = [r["t_accept"] - r["t_submit"] for r in done if "t_accept" in r]
    out["p50_submit_to_accept_s"] = percentile(accepted, 50)
    out["p99_submit_to_accept_s"] = percentile(accepted, 99)
    if burst.get("kill"):
        out["kill"] = burst.get("kill_result")
        out["kill_to_done"] = burst.get("kill_to_done_s")
    return out


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| burst | daemon | mounts ok | wall | requests | cancelled | failed "
        "| p50 / p90 / p99 submit→complete | peak PSS | start (listening) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} |")
            continue
        name = f"{r['size']} mounts" + (" + kill" if "kill" in r else "")
        lines.append(
            f"| {name} | {r['daemon']} | {r['mounts_ok']}/{r['size']} | {fmt(r['wall_s'], ' s')} "
            f"| {r['requests']} | {r['cancelled']} | {r['failed']}"
            f"{' ' + str(r['failed_statuses']) if r['failed'] else ''} "
            f"| {fmt(r['p50_s'])} / {fmt(r['p90_s'])} / {fmt(r['p99_s'])} s "
            f"| {fmt(r['peak_pss_mib'], ' MiB')} | {fmt(r['listening_s'], ' s')} |"
        )
    return "\n".join(lines)


def compare(rows: list[dict[str, Any]], size: int = 64) -> list[str]:
    """Target check for one size, ours vs upstream of the same round (same boot)."""
    rounds: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "error" in r or "kill" in r or r.get("size") != size:
            continue
        rounds.setdefault(r["label"].split("-")[0], {})[r["daemon"]] = r
    out = []
    for name, pair in sorted(rounds.items()):
        ours, up = pair.get("ours"), pair.get("upstream")
        if not ours or not up:
            continue
        line = (
            f"targets, {size} mounts, {name}: cancelled {ours['cancelled']} (target 0; "
            f"upstream {up['cancelled']}); wall {ours['wall_s']:.2f}/{up['wall_s']:.2f} s = "
            f"{ours['wall_s'] / up['wall_s']:.2f}x (target <= 0.7x)"
        )
        if ours["p99_s"] and up["p99_s"]:
            line += (
                f"; p99 {ours['p99_s']:.2f}/{up['p99_s']:.2f} s = "
                f"{ours['p99_s'] / up['p99_s']:.2f}x (target <= 0.5x)"
            )
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--daemons", nargs="+", default=["upstream", "ours"],
                    choices=["upstream", "ours"])  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kill", type=int, default=16, help="kill-test burst size (0: none)")
    ap.add_argument("--memory", type=int, default=8192, help="guest MiB (>= 8192)")
    ap.add_argument("--timeout", type=int, default=3600, help="whole guest run, seconds")
    ap.add_argument("--results", type=Path, default=None, help="guest results directory")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="JSON output directory")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other QEMUs")
    ap.add_argument("--echo", action="store_true", help="copy the guest console to stderr")
    args = ap.parse_args(argv)

    if not args.no_wait:
        wait_for_quiet_host()
    results = args.results or Path(tempfile.mkdtemp(prefix="tlshd-burst-"))
    watch = QemuWatch(f"path={results},")
    watch.start()
    env = {
        "BURST_SIZES": " ".join(map(str, args.sizes)),
        "BURST_DAEMONS": " ".join(args.daemons),
        "BURST_ROUNDS": str(args.rounds),
        "BURST_KILL": str(args.kill),
    }
    started = time.strftime("%Y%m%d-%H%M%S")
    res = run_guest(GUEST_SCRIPT.read_text(), daemon=args.daemons[-1], timeout=args.timeout,
                    results_dir=results, env=env, memory=args.memory,
                    echo=args.echo)  # fmt: skip
    watch.stop.set()
    raw_path = res.results_dir / "burst.json"
    if not raw_path.is_file():
        print(f"no results (rc={res.returncode}); see {res.console_log}", file=sys.stderr)
        return 1
    raw = json.loads(raw_path.read_text())
    rows = [summarize(b) for b in raw["bursts"]]
    doc = {
        "started": started,
        "guest_seconds": round(res.seconds, 1),
        "guest_rc": res.returncode,
        "results_dir": str(res.results_dir),
        "foreign_qemu_during_run": sorted(watch.seen),
        "settings": raw["settings"],
        "summary": rows,
        "bursts": raw["bursts"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"burst-{started}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(rows))
    for r in rows:
        if "kill" in r:
            print(f"kill-to-DONE(-EIO): {r['kill_to_done']} (killed {r['kill']})")
    for line in compare(rows):
        print(line)
    if watch.seen:
        print(f"WARNING: other QEMU ran during the measurement: {sorted(watch.seen)}")
    print(f"raw results: {out}; guest files: {res.results_dir}")
    return 0 if res.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
