#!/usr/bin/env python3
"""Burst benchmark: concurrent NFS-over-TLS mounts, our tlshd vs upstream tlshd 1.0.0.

Boots the lab guest (tests/lab) ONCE and runs benchmarks/guest_burst.py in it:
for every round, mode, burst size and both daemons, N simultaneous
`xprtsec=tls` mounts to distinct 127.x.y.z addresses, measured from the
kernel's handshake tracepoints and the guest's /proc/stat.  Both daemons run
upstream's default configuration (no [pool], loglevel=0).  Cold mode (the
default, first): the mounts start the moment the daemon is ready (ours: its
"serving handshakes" line, sent with READY; upstream: 1 s after start).  Warm
mode: after the daemon has settled.  Serial mode (`--modes serial`, not in
the default run): a cold start, then the mounts one after another, so the
first handshakes of a fresh daemon are timed one at a time (the issue's
"first handshake after start is no slower than the third").  Optionally one extra burst with our
daemon in which a busy worker is SIGKILLed (kill-to-DONE delay).  Prints one
table per mode (median and worst round) and the targets, and writes the raw
results.

    sudo python3 benchmarks/burst.py [--modes cold warm] [--sizes 8 32 64]
                                     [--rounds 5] [--daemons upstream ours]
                                     [--kill 0] [--memory 8192]

Run as root on the lab host.  It waits until no other qemu-system process runs
(numbers taken next to another TCG guest are worthless) and records any that
appears during the run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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
        return {"label": burst["label"], "mode": burst.get("mode"), "daemon": burst.get("daemon"),
                "size": burst.get("size"), "error": burst["error"].splitlines()[-1]}  # fmt: skip
    reqs = burst["requests"]
    done = [r for r in reqs if "status" in r]
    lat = [r["latency"] for r in done]
    out = {
        "label": burst["label"],
        "mode": burst.get("mode", "warm"),
        "daemon": burst["daemon"],
        "size": burst["size"],
        "mounts_ok": burst["mounts_ok"],
        "wall_s": burst["wall_s"],
        "ready_s": burst.get("ready_s"),
        "requests": len(reqs),
        "handshakes": len(done),
        "cancelled": sum(1 for r in reqs if "status" not in r),
        "failed": sum(1 for r in done if r["status"] != 0),
        "failed_statuses": sorted({r["status"] for r in done if r["status"] != 0}),
        "refused": burst.get("submit_refused"),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat) if lat else None,
        "cpu_busy_s": burst.get("cpu_busy_s"),
        "cpu_ms_per_handshake": (
            round(burst["cpu_busy_s"] * 1000 / len(done), 1)
            if done and burst.get("cpu_busy_s") is not None
            else None
        ),
        "daemon_cpu_ms_per_handshake": _per_handshake_ms(daemon_cpu_s(burst), len(done)),
        "peak_pss_mib": round(burst["peak_pss_bytes"] / 2**20, 1),
        "idle_pss_mib": round((burst.get("idle_pss_bytes") or 0) / 2**20, 1),
        "max_procs": burst["max_procs"],
    }
    if out["mode"] == "serial":
        out["by_mount"] = latencies_by_mount(reqs)
    if burst.get("kill"):
        out["kill"] = burst.get("kill_result")
        out["kill_to_done"] = burst.get("kill_to_done_s")
    return out


ROLES = ("client", "server")  # of a handshake request, as labguest.fold_requests names them


def latencies_by_mount(reqs: list[dict[str, Any]]) -> list[dict[str, float | None]]:
    """Serial mode: one mount at a time, so the k-th client and the k-th server
    handshake, by submit time, are the k-th mount's; submit -> complete of each."""
    by_role = {
        role: sorted((r for r in reqs if r.get("role") == role), key=lambda r: r["t_submit"])
        for role in ROLES
    }
    count = max((len(v) for v in by_role.values()), default=0)
    return [
        {role: by_role[role][k].get("latency") if k < len(by_role[role]) else None
         for role in ROLES}
        for k in range(count)
    ]  # fmt: skip


def daemon_cpu_s(burst: dict[str, Any]) -> float | None:
    """The daemon's cgroup figure (both daemons); without a cgroup, ours from
    its process tree (upstream's reaped children never reach cutime)."""
    for key in ("daemon_cgroup_cpu_s", "daemon_cpu_s"):
        if burst.get(key) is not None:
            return float(burst[key])
    return None


def _per_handshake_ms(seconds: float | None, handshakes: int) -> float | None:
    return round(seconds * 1000 / handshakes, 1) if seconds is not None and handshakes else None


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


# For each metric: is larger worse?  The worst round is the max (or min).
WORSE_IS_LARGER = {
    "wall_s": True, "p99_s": True, "failed": True, "cancelled": True, "refused": True,
    "cpu_ms_per_handshake": True, "daemon_cpu_ms_per_handshake": True,
    "peak_pss_mib": True, "idle_pss_mib": True,
    "ready_s": True, "mounts_ok": False,
}  # fmt: skip


def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """Rows by (mode, size, daemon), rounds in order; errors and kill bursts left out."""
    out: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "error" in r or "kill" in r:
            continue
        out.setdefault((r["mode"], r["size"], r["daemon"]), []).append(r)
    return out


def median_and_worst(rounds: list[dict[str, Any]], key: str) -> tuple[Any, Any]:
    values = [r[key] for r in rounds if r.get(key) is not None]
    if not values:
        return None, None
    worst = max(values) if WORSE_IS_LARGER[key] else min(values)
    return statistics.median(values), worst


def table(rows: list[dict[str, Any]], mode: str) -> str:
    head = (
        "| mounts | daemon | rounds | mounts ok (worst) "
        "| failed / cancelled / refused at submit (worst) "
        "| wall median / worst | p99 submit→complete median / worst "
        "| CPU per handshake (median) | daemon's own CPU per handshake (median) "
        "| PSS idle / peak (worst) | ready after (median) |"
    )
    lines = [head, "|" + "---|" * 11]
    errors = [r for r in rows if "error" in r and r.get("mode") == mode]
    for (m, size, daemon), rounds in sorted(groups(rows).items()):
        if m != mode:
            continue

        def mw(key: str, unit: str = "", rounds: list[dict[str, Any]] = rounds) -> str:
            med, worst = median_and_worst(rounds, key)
            return f"{fmt(med, unit)} / {fmt(worst, unit)}"

        lines.append(
            f"| {size} | {daemon} | {len(rounds)} "
            f"| {fmt(median_and_worst(rounds, 'mounts_ok')[1])}/{size} "
            f"| {fmt(median_and_worst(rounds, 'failed')[1])} / "
            f"{fmt(median_and_worst(rounds, 'cancelled')[1])} / "
            f"{fmt(median_and_worst(rounds, 'refused')[1])} "
            f"| {mw('wall_s', ' s')} | {mw('p99_s', ' s')} "
            f"| {fmt(median_and_worst(rounds, 'cpu_ms_per_handshake')[0], ' ms')} "
            f"| {fmt(median_and_worst(rounds, 'daemon_cpu_ms_per_handshake')[0], ' ms')} "
            f"| {fmt(median_and_worst(rounds, 'idle_pss_mib')[1], ' MiB')} / "
            f"{fmt(median_and_worst(rounds, 'peak_pss_mib')[1], ' MiB')} "
            f"| {fmt(median_and_worst(rounds, 'ready_s')[0], ' s')} |"
        )
    for r in errors:
        lines.append(f"| {r['size']} | {r['daemon']} | error in {r['label']}: {r['error']} |")
    return "\n".join(lines)


OUR_KINDS = ("ours", "hosts")  # "hosts": ours with [pool] handshakes_per_worker > 1


def paired_rounds(
    rows: list[dict[str, Any]], mode: str, size: int, kind: str = "ours"
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(ours, upstream) of the same round: the same boot, one after the other."""
    g = groups(rows)
    up_by_round = {r["label"].split("-")[0]: r for r in g.get((mode, size, "upstream"), [])}
    ours = g.get((mode, size, kind), [])
    pairs = [(r, up_by_round.get(r["label"].split("-")[0])) for r in ours]
    return [(o, u) for o, u in pairs if u is not None]


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """Ours / upstream, round by round: wall, p99 and guest CPU per handshake."""
    lines = [
        "| daemon | mode, mounts | wall, round by round | median | p99, round by round "
        "| CPU per handshake (median) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in OUR_KINDS:
        for mode, size in sorted({(k[0], k[1]) for k in groups(rows)}):
            line = _ratio_line(rows, kind, mode, size)
            if line:
                lines.append(line)
    return "\n".join(lines)


def _ratio_line(rows: list[dict[str, Any]], kind: str, mode: str, size: int) -> str | None:
    pairs = paired_rounds(rows, mode, size, kind)
    if not pairs:
        return None
    wall = [o["wall_s"] / u["wall_s"] for o, u in pairs]
    p99 = [o["p99_s"] / u["p99_s"] for o, u in pairs if o["p99_s"] and u["p99_s"]]
    cpu = [o["cpu_ms_per_handshake"] / u["cpu_ms_per_handshake"] for o, u in pairs
           if o["cpu_ms_per_handshake"] and u["cpu_ms_per_handshake"]]  # fmt: skip
    return (
        f"| {kind} | {mode}, {size} | {' '.join(f'{r:.2f}' for r in wall)} "
        f"| {statistics.median(wall):.2f} | {' '.join(f'{r:.2f}' for r in p99)} "
        f"| {fmt(statistics.median(cpu) if cpu else None)} |"
    )


def targets(rows: list[dict[str, Any]], mode: str = "cold") -> list[str]:
    """The issue's targets, per size: ours against upstream of the same round (same boot)."""
    g = groups(rows)
    out = []
    for kind, size in sorted({(k[2], k[1]) for k in g if k[0] == mode and k[2] in OUR_KINDS}):
        ours = g.get((mode, size, kind), [])
        if not ours:
            continue
        checks = []
        clean = all(r["failed"] == 0 and r["cancelled"] == 0 and r["mounts_ok"] == size
                    for r in ours)  # fmt: skip
        checks.append(f"0 failed/cancelled and every mount in every round: {_yes(clean)}")
        paired = paired_rounds(rows, mode, size, kind)
        if paired:
            ratios = [o["wall_s"] / u["wall_s"] for o, u in paired]
            checks.append(f"wall <= 1.0x upstream every round: {_yes(max(ratios) <= 1.0)} "
                          f"(worst {max(ratios):.2f}x)")  # fmt: skip
            med = statistics.median(o["wall_s"] for o, _ in paired) / statistics.median(
                u["wall_s"] for _, u in paired
            )
            checks.append(f"median wall <= 0.8x: {_yes(med <= 0.8)} ({med:.2f}x)")
            p99 = [(o["p99_s"], u["p99_s"]) for o, u in paired if o["p99_s"] and u["p99_s"]]
            if p99:
                checks.append(f"p99 <= upstream's every round: {_yes(all(a <= b for a, b in p99))} "
                              f"(worst {max(a / b for a, b in p99):.2f}x)")  # fmt: skip
            for key, what in (("cpu_ms_per_handshake", "guest CPU"),
                              ("daemon_cpu_ms_per_handshake", "daemon CPU")):  # fmt: skip
                cpu = [(o[key], u[key]) for o, u in paired if o[key] and u[key]]
                if cpu:
                    ratio = statistics.median(a / b for a, b in cpu)
                    checks.append(f"{what} per handshake <= 3x upstream: {_yes(ratio <= 3)} "
                                  f"({ratio:.2f}x, median)")  # fmt: skip
        idle = median_and_worst(ours, "idle_pss_mib")[1]
        peak = median_and_worst(ours, "peak_pss_mib")[1]
        if idle is not None:
            checks.append(f"PSS idle <= 40 MiB: {_yes(idle <= 40)} ({idle} MiB)")
        if size == 64 and peak is not None:
            checks.append(f"PSS peak <= 100 MiB: {_yes(peak <= 100)} ({peak} MiB)")
        ready = median_and_worst(ours, "ready_s")[1]
        if mode == "cold" and ready is not None:
            checks.append(f"ready <= 2.0 s: {_yes(ready <= 2.0)} (worst {ready} s)")
        out.append(f"{kind}, {mode}, {size} mounts: " + "; ".join(checks))
    return out


def mount_order_table(rows: list[dict[str, Any]]) -> str:
    """Serial mode: each mount's handshakes, median and worst over the rounds,
    and whether the first mount's are no slower than the third's (medians)."""
    lines = [
        "| daemon | mount | client handshake median / worst | server handshake median / worst |",
        "|---|---|---|---|",
    ]
    verdicts = []
    for (mode, _size, daemon), rounds in sorted(groups(rows).items()):
        if mode != "serial":
            continue
        medians: dict[tuple[int, str], float] = {}
        count = max(len(r["by_mount"]) for r in rounds)
        for k in range(count):
            cells = []
            for role in ROLES:
                values = [r["by_mount"][k][role] for r in rounds if k < len(r["by_mount"])]
                values = [v for v in values if v is not None]
                if values:
                    medians[k, role] = statistics.median(values)
                    cells.append(f"{medians[k, role]:.3f} s / {max(values):.3f} s")
                else:
                    cells.append("-")
            lines.append(f"| {daemon} | {k + 1} | {cells[0]} | {cells[1]} |")
        if all((k, role) in medians for k in (0, 2) for role in ROLES):
            ok = all(medians[0, role] <= medians[2, role] for role in ROLES)
            verdicts.append(
                f"{daemon}: first handshake no slower than the third: {_yes(ok)} "
                + ", ".join(f"{role} {medians[0, role]:.3f} against {medians[2, role]:.3f} s"
                            for role in ROLES)
            )  # fmt: skip
    return "\n".join([*lines, "", *verdicts])


def _yes(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_report(rows: list[dict[str, Any]], modes: list[str]) -> None:
    for mode in modes:
        print(f"\n{mode} mode\n")
        print(table(rows, mode))
        if mode == "serial":
            print()
            print(mount_order_table(rows))
    print("\nours (and hosts) / upstream, round by round\n")
    print(ratio_table(rows))
    print()
    for r in rows:
        if "kill" in r:
            print(f"kill-to-DONE(-EIO): {r['kill_to_done']} (killed {r['kill']})")
    for mode in modes:
        if mode == "serial":  # its target is the mount-order table's
            continue
        for line in targets(rows, mode):
            print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["cold", "warm"],
                    choices=["cold", "warm", "serial"])  # fmt: skip
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--daemons", nargs="+", default=["upstream", "ours"],
                    choices=["upstream", "ours", "hosts"])  # fmt: skip
    ap.add_argument("--handshakes-per-worker", type=int, default=8,
                    help="[pool] handshakes_per_worker of the 'hosts' daemon")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", default="trixie",
                    help="lab image: trixie (Debian 6.12, upstream 1.0.0) or forky "
                         "(newest 7.x, upstream 1.4.0); tests/lab/README.md")  # fmt: skip
    ap.add_argument("--kill", type=int, default=0, help="kill-test burst size (0: none)")
    ap.add_argument(
        "--sched-trace",
        choices=["off", "supervisor", "all"],
        default="off",
        help="trace scheduling: the supervisor's wake-ups and switches, or every switch",
    )
    ap.add_argument("--memory", type=int, default=8192, help="guest MiB (>= 8192)")
    ap.add_argument("--timeout", type=int, default=3600, help="whole guest run, seconds")
    ap.add_argument("--results", type=Path, default=None, help="guest results directory")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="JSON output directory")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other QEMUs")
    ap.add_argument("--echo", action="store_true", help="copy the guest console to stderr")
    ap.add_argument("--summarize", type=Path, default=None, metavar="RESULTS_JSON",
                    help="print the tables of an earlier run's results, run nothing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.summarize is not None:
        doc = json.loads(args.summarize.read_text())
        print_report([summarize(b) for b in doc["bursts"]], doc["settings"]["modes"])
        return 0

    if not args.no_wait:
        wait_for_quiet_host()
    results = args.results or Path(tempfile.mkdtemp(prefix="tlshd-burst-"))
    watch = QemuWatch(f"path={results},")
    watch.start()
    env = {
        "BURST_MODES": " ".join(args.modes),
        "BURST_SIZES": " ".join(map(str, args.sizes)),
        "BURST_DAEMONS": " ".join(args.daemons),
        "BURST_ROUNDS": str(args.rounds),
        "BURST_KILL": str(args.kill),
        "BURST_SCHED_TRACE": args.sched_trace,
        "BURST_HANDSHAKES_PER_WORKER": str(args.handshakes_per_worker),
    }
    started = time.strftime("%Y%m%d-%H%M%S")
    lab_daemon = "upstream" if args.daemons[-1] == "upstream" else "ours"
    res = run_guest(GUEST_SCRIPT.read_text(), daemon=lab_daemon, timeout=args.timeout,
                    results_dir=results, env=env, memory=args.memory,
                    echo=args.echo, image=args.image)  # fmt: skip
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
        "image": args.image,
        "results_dir": str(res.results_dir),
        "foreign_qemu_during_run": sorted(watch.seen),
        "settings": raw["settings"],
        "summary": rows,
        "bursts": raw["bursts"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"burst-{started}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print_report(rows, args.modes)
    if watch.seen:
        print(f"WARNING: other QEMU ran during the measurement: {sorted(watch.seen)}")
    print(f"raw results: {out}; guest files: {res.results_dir}")
    return 0 if res.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
