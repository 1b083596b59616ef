#!/usr/bin/python3
"""tlshd under a real systemd (PID 1): the repository's systemd/tlshd.service.

Runs in ONE guest boot with ``lab.init=systemd`` (systemd-stage2.sh), the
checkout shared at /lab/src.  Each step writes
/lab/results/scenarios/systemd_<step>.json (``error`` holds a traceback when the
step itself broke); tests/lab/test_systemd.py asserts on them.

Steps, in order: setup (the unit from the checkout + an ExecStart= drop-in,
PKI, nfsd, tracing, PID 1 debug log), security, start, nfs, reload,
crash_restart, watchdog, stop.

Evidence comes from three independent places: ``systemctl show`` polled while
a job runs (ActiveState/SubState/MainPID/StatusText), PID 1's own debug log in
the journal ("Got notification message from PID N (READY=1, ...)", "Changed
start -> running"), and the daemon's syslog lines in the journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import labguest as lg
import nfs_scenarios as ns

UNIT = "tlshd.service"
UNIT_SRC = Path("/lab/src/systemd/tlshd.service")
UNIT_DST = Path("/etc/systemd/system/tlshd.service")
DROPIN_DIR = Path("/etc/systemd/system/tlshd.service.d")
EXEC_START = "/opt/tlshd/bin/tlshd -c /etc/tlshd/config"
WATCHDOG_S = 3
STATE = ["ActiveState", "SubState", "MainPID", "StatusText", "NRestarts"]
# systemd 257: "Got notification message from PID 328: READY=1" (older: "... 328 (READY=1)")
NOTIFY_RE = re.compile(r"notification message from PID (\d+)(?::\s*|\s+\()(.*?)\)?$", re.S)
CHANGE_RE = re.compile(r"Changed (\S+) -> (\S+)")
SECURITY_RE = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\S+)")


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def show(props: list[str] | None = None) -> dict[str, str]:
    cmd = ["systemctl", "show", UNIT, "--timestamp=us+utc", "-p", ",".join(props or STATE)]
    out = lg.sh(cmd).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def parse_ts(text: str) -> float | None:
    """A `systemctl show --timestamp=us+utc` value as UNIX seconds."""
    try:
        t = datetime.strptime(text, "%a %Y-%m-%d %H:%M:%S.%f UTC")
        return t.replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def poll(stop: Callable[[dict[str, Any]], bool], timeout: float, interval: float = 0.05,
         listener: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Sample the unit's state until ``stop(state)``; return the distinct states seen."""
    seen: list[dict[str, Any]] = []
    t0 = mono()
    last: tuple | None = None
    while True:
        s: dict[str, Any] = dict(show())
        s["t"] = round(mono() - t0, 3)
        pid = int(s.get("MainPID") or 0)
        if listener:
            s["netlink_listener"] = bool(pid) and lg._listening(pid)
        key = tuple(s.get(k) for k in (*STATE, "netlink_listener"))
        if key != last:
            seen.append(s)
            last = key
        if stop(s) or mono() - t0 > timeout:
            s["timed_out"] = not stop(s)
            return seen, s
        time.sleep(interval)


@contextlib.contextmanager
def pid1_debug() -> Iterator[None]:
    """PID 1 logs every sd_notify message and state change of the unit at debug level.

    Only around the unit's jobs: a daemon-reload at debug level floods the journal.
    """
    lg.sh(["systemd-analyze", "log-level", "debug"])
    try:
        yield
    finally:
        lg.sh(["systemd-analyze", "log-level", "info"], check=False)


def journal(since: float) -> list[dict[str, Any]]:
    """Journal entries about the unit (PID 1's and the daemon's) received after ``since``."""
    lg.sh(["journalctl", "--sync"], check=False)
    out = lg.sh(["journalctl", "-b", "-u", UNIT, "-o", "json", "--no-pager"]).stdout
    entries = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if int(e.get("__MONOTONIC_TIMESTAMP", 0)) >= since * 1e6:
                msg = e.get("MESSAGE")
                if not isinstance(msg, str):
                    msg = bytes(msg).decode(errors="replace") if isinstance(msg, list) else ""
                entries.append({
                    "mono": int(e["__MONOTONIC_TIMESTAMP"]) / 1e6,
                    "real": int(e.get("_SOURCE_REALTIME_TIMESTAMP")
                                or e["__REALTIME_TIMESTAMP"]) / 1e6,
                    "pid": int(e.get("_PID", 0)),
                    "source_ts": "_SOURCE_REALTIME_TIMESTAMP" in e,
                    "msg": msg,
                })  # fmt: skip
    return entries


def notifications(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PID 1's debug lines about sd_notify messages: pid, fields, when."""
    out = []
    for i, e in enumerate(entries):
        m = NOTIFY_RE.search(e["msg"]) if e["pid"] == 1 else None
        if m:
            out.append({"i": i, "mono": e["mono"], "from_pid": int(m.group(1)),
                        "fields": m.group(2)})  # fmt: skip
    return out


def transitions(entries: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in entries:
        m = CHANGE_RE.search(e["msg"]) if e["pid"] == 1 else None
        if m:
            out.append(f"{m.group(1)} -> {m.group(2)}")
    return out


def daemon_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(e, i=i) for i, e in enumerate(entries) if e["pid"] != 1]


def first(entries: list[dict[str, Any]], text: str) -> dict[str, Any] | None:
    return next((e for e in entries if text in e["msg"]), None)


def cgroup_pids() -> list[int]:
    cg = show(["ControlGroup"]).get("ControlGroup", "")
    f = Path("/sys/fs/cgroup") / cg.lstrip("/") / "cgroup.procs"
    try:
        return [int(x) for x in f.read_text().split()] if cg else []
    except OSError:
        return []


def tlshd_processes() -> list[dict[str, Any]]:
    """Every process that is our daemon (supervisor or worker), by command line."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "tlshd" in cmd and lg.alive(int(d.name)):
            out.append({"pid": int(d.name), "cmdline": cmd.strip()})
    return out


def run_systemctl(*args: str, timeout: float = 120) -> dict[str, Any]:
    t0 = mono()
    p = lg.sh(["systemctl", *args], check=False, timeout=timeout)
    return {"argv": ["systemctl", *args], "rc": p.returncode,
            "output": (p.stdout + p.stderr).strip(), "seconds": round(mono() - t0, 3)}  # fmt: skip


def hs_ok(res: dict[str, Any]) -> bool:
    hs = res.get("hs", {})
    return bool(
        res.get("ok")
        and hs.get("client_ok", 0) >= 1
        and hs.get("server_ok", 0) >= 1
        and set(hs.get("failed_status", [])) <= {-110}
    )


def verify() -> str:
    t0 = mono()
    try:
        p = lg.sh(["systemd-analyze", "verify", "--man=no", UNIT], check=False, timeout=90)
    except subprocess.TimeoutExpired:
        return "systemd-analyze verify timed out"
    return f"rc={p.returncode} ({mono() - t0:.1f}s)\n{(p.stdout + p.stderr)[-3000:]}"


# ----------------------------------------------------------------------- steps


def step_setup() -> dict[str, Any]:
    shutil.copyfile(UNIT_SRC, UNIT_DST)
    DROPIN_DIR.mkdir(parents=True, exist_ok=True)
    (DROPIN_DIR / "lab.conf").write_text(
        "# the lab's venv and config; the unit itself is the repository's\n"
        f"[Service]\nExecStart=\nExecStart={EXEC_START}\n"
    )
    lg.make_pki()
    lg.write_config()
    t0 = mono()
    reload = run_systemctl("daemon-reload")
    boot = ""
    for _ in range(20):
        p = lg.sh(["systemd-analyze", "time"], check=False)
        boot = (p.stdout + p.stderr).strip()
        if p.returncode == 0:
            break
        time.sleep(1)
    lg.nfs_server()
    lg.trace_on()
    props = show(["FragmentPath", "DropInPaths", "ExecStart", "Type", "NotifyAccess",
                  "WatchdogUSec", "Restart", "ExecReload", "LoadState"])  # fmt: skip
    return {
        "pid1_comm": Path("/proc/1/comm").read_text().strip(),
        "systemd_version": lg.sh(["systemctl", "--version"]).stdout.splitlines()[0],
        "boot_time": boot,
        "system_state": lg.sh(["systemctl", "is-system-running"], check=False).stdout.strip(),
        "failed_units": lg.sh(["systemctl", "--failed", "--plain", "--no-legend"]).stdout,
        "daemon_reload": reload,
        "unit_sha256": hashlib.sha256(UNIT_DST.read_bytes()).hexdigest(),
        "repo_unit_sha256": hashlib.sha256(UNIT_SRC.read_bytes()).hexdigest(),
        "props": props,
        "verify": verify(),
        "seconds": round(mono() - t0, 2),
    }


def step_security() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cmd in (
        ("online", ["systemd-analyze", "security", UNIT, "--no-pager"]),
        ("offline", ["systemd-analyze", "security", "--offline=true", str(UNIT_DST)]),
    ):
        p = lg.sh(cmd, check=False)
        text = p.stdout + p.stderr
        (lg.RESULTS / f"security-{name}.txt").write_text(text)
        m = SECURITY_RE.search(text)
        out[name] = {"rc": p.returncode, "score": float(m.group(1)) if m else None,
                     "verdict": m.group(2) if m else None, "tail": text[-600:]}  # fmt: skip
    out["score"] = out["online"]["score"]
    return out


def step_start() -> dict[str, Any]:
    t0 = mono()
    started = run_systemctl("start", "--no-block", UNIT)
    states, final = poll(lambda s: s["ActiveState"] in ("active", "failed"), timeout=120,
                         interval=0.25, listener=True)  # fmt: skip
    wall = mono() - t0
    props = show(["InactiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic",
                  "ActiveEnterTimestampMonotonic", "ActiveEnterTimestamp", "MainPID",
                  "StatusText", "Result"])  # fmt: skip
    # STATUS= is sent right after READY=1 and rate-limited to 1/s: give it a moment
    deadline = mono() + 5
    while not props.get("StatusText") and mono() < deadline:
        time.sleep(0.2)
        props.update(show(["StatusText"]))
    entries = journal(t0)
    notes = notifications(entries)
    main_pid = int(props.get("MainPID") or 0)
    ready = next((n for n in notes if "READY=1" in n["fields"]), None)
    running = next((i for i, e in enumerate(entries)
                    if e["pid"] == 1 and "-> running" in e["msg"]), None)  # fmt: skip
    serving = first(daemon_lines(entries), "serving handshakes")
    active_real = parse_ts(props.get("ActiveEnterTimestamp", ""))
    exit_us = int(props.get("InactiveExitTimestampMonotonic") or 0)
    active_us = int(props.get("ActiveEnterTimestampMonotonic") or 0)
    exec_us = int(props.get("ExecMainStartTimestampMonotonic") or 0)
    return {
        "systemctl_start": started,
        "states": states,
        "state_sequence": [s["ActiveState"] for s in states],
        "final": final,
        "props": props,
        "main_pid": main_pid,
        "listening_when_active": bool(main_pid) and lg._listening(main_pid),
        "startup_s": round((active_us - exit_us) / 1e6, 3) if active_us and exit_us else None,
        "exec_to_active_s": round((active_us - exec_us) / 1e6, 3) if active_us and exec_us
        else None,
        "wall_s": round(wall, 3),
        "notifications": notes,
        "ready_notification": ready,
        "ready_from_main_pid": bool(ready) and ready["from_pid"] == main_pid,
        "ready_before_running": ready is not None and running is not None
        and ready["i"] < running,
        "serving_line": serving,
        "serving_before_active": serving is not None and active_real is not None
        and serving["real"] <= active_real,
        "transitions": transitions(entries),
        "daemon_log": [e["msg"] for e in daemon_lines(entries)][:40],
        "policies": scheduling_policies(),
    }  # fmt: skip


def scheduling_policies() -> list[dict[str, Any]]:
    """Each process of the unit: its title and scheduling policy (0 SCHED_OTHER, 1 FIFO)."""
    out = []
    for pid in cgroup_pids():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            policy = os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK
        except OSError:
            continue
        out.append({"pid": pid, "title": title, "policy": policy, "nice_limit": lg.nice_limit(pid)})
    return out


def step_nfs() -> dict[str, Any]:
    res = ns.mounted_scenario("systemd_tls_mount", "127.0.0.1", "tls")
    res["hs_ok"] = hs_ok(res)
    res["main_pid"] = int(show().get("MainPID") or 0)
    return res


RELOAD_READY_WAIT_S = 30.0


def ready_after_reloading(notes: list[dict[str, Any]]) -> bool:
    """A READY=1 notification after a RELOADING=1 one."""
    return any("READY=1" in n["fields"] for n in notes
               if any("RELOADING=1" in m["fields"] and m["i"] < n["i"] for m in notes))  # fmt: skip


def step_reload() -> dict[str, Any]:
    before = show()
    t0 = mono()
    proc = subprocess.Popen(["systemctl", "reload", UNIT], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    states, _ = poll(lambda s: proc.poll() is not None and s["ActiveState"] == "active",
                         timeout=120, interval=0.02)  # fmt: skip
    out, _ = proc.communicate(timeout=30)
    wall = mono() - t0
    # With Type=notify and ExecReload=kill, systemd is back to "running" when
    # kill exits, not when the daemon has reloaded: READY=1 follows once the
    # new generation is loaded (the first reload also imports cryptography in
    # the supervisor, seconds under TCG).  Read the journal until it is there.
    deadline = mono() + RELOAD_READY_WAIT_S
    while True:
        time.sleep(0.5)
        entries = journal(t0)
        notes = notifications(entries)
        if ready_after_reloading(notes) or mono() > deadline:
            break
    reloading_at = next((n["i"] for n in notes if "RELOADING=1" in n["fields"]), None)
    ready_s = next((round(n["mono"] - t0, 3) for n in notes if reloading_at is not None
                    and n["i"] > reloading_at and "READY=1" in n["fields"]), None)  # fmt: skip
    trans = transitions(entries)
    after = show()
    return {
        "before": before,
        "after": after,
        "systemctl_reload": {"rc": proc.returncode, "output": out.strip(),
                             "seconds": round(wall, 3)},
        "states": states,
        "seen_reloading": any(s["ActiveState"] == "reloading" for s in states),
        "transitions": trans,
        "reload_transition": any("-> reload" in t for t in trans),
        "notifications": notes,
        "reloading_notified": any("RELOADING=1" in n["fields"] for n in notes),
        "ready_after_reloading": ready_after_reloading(notes),
        "ready_after_reload_s": ready_s,
        "daemon_reload_line": first(daemon_lines(entries), "configuration reloaded"),
        "main_pid_unchanged": before["MainPID"] == after["MainPID"] != "0",
    }  # fmt: skip


def watchdog_dropin() -> dict[str, Any]:
    """WatchdogSec=3s for the next start (the watchdog step checks it); daemon-reload."""
    (DROPIN_DIR / "lab-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}s\n")
    return run_systemctl("daemon-reload")


def step_crash_restart() -> dict[str, Any]:
    # the restart below also arms the short watchdog of the next step (saves a restart)
    reload = watchdog_dropin()
    with pid1_debug():
        res = crash_restart()
    res["watchdog_daemon_reload"] = reload
    return res


def crash_restart() -> dict[str, Any]:
    before = show()
    old_pid = int(before["MainPID"])
    old_procs = cgroup_pids()
    t0 = mono()
    kill = run_systemctl("kill", "-s", "KILL", "--kill-whom=main", UNIT)
    states, final = poll(lambda s: s["ActiveState"] == "active"
                         and int(s["MainPID"] or 0) not in (0, old_pid), timeout=120)  # fmt: skip
    back_s = mono() - t0
    entries = journal(t0)
    new_pid = int(final.get("MainPID") or 0)
    new_procs = cgroup_pids()
    res: dict[str, Any] = {
        "before": before,
        "after": final,
        "systemctl_kill": kill,
        "states": states,
        "old_main_pid": old_pid,
        "new_main_pid": new_pid,
        "back_active_s": round(back_s, 3),
        "old_cgroup_pids": old_procs,
        "new_cgroup_pids": new_procs,
        "old_pids_left": sorted(set(old_procs) & set(new_procs)),
        "restarts": [int(before.get("NRestarts") or 0), int(final.get("NRestarts") or 0)],
        "main_killed_line": first(entries, "status=9/KILL"),
        "scheduled_restart_line": first(entries, "Scheduled restart job"),
        "transitions": transitions(entries),
    }
    res["mount"] = ns.mounted_scenario("systemd_after_restart", "127.0.0.2", "tls")
    res["mount_hs_ok"] = hs_ok(res["mount"])
    return res


def step_watchdog() -> dict[str, Any]:
    reload = restart = None
    if show(["WatchdogUSec"]).get("WatchdogUSec") != f"{WATCHDOG_S}s":  # run on its own
        reload = watchdog_dropin()
        restart = run_systemctl("restart", UNIT)
    with pid1_debug():
        return watchdog_checks(reload, restart)


def watchdog_checks(
    reload: dict[str, Any] | None, restart: dict[str, Any] | None
) -> dict[str, Any]:
    before = show([*STATE, "WatchdogUSec", "WatchdogTimestampMonotonic"])
    t0 = mono()
    time.sleep(4 * WATCHDOG_S)
    after = show([*STATE, "WatchdogUSec", "WatchdogTimestampMonotonic"])
    entries = journal(t0)
    pings = [n for n in notifications(entries) if "WATCHDOG=1" in n["fields"]]
    res: dict[str, Any] = {
        "daemon_reload": reload,
        "restart": restart,
        "before": before,
        "after": after,
        "watched_s": round(mono() - t0, 2),
        "pings": len(pings),
        "ping_from_main": all(p["from_pid"] == int(after["MainPID"]) for p in pings),
        "timeout_line_while_alive": first(entries, "Watchdog timeout"),
    }
    # control: a supervisor that stops pinging (SIGSTOP) is killed and restarted
    stopped_pid = int(after["MainPID"])
    t1 = mono()
    os.kill(stopped_pid, 19)  # SIGSTOP
    states, final = poll(lambda s: s["ActiveState"] == "active"
                         and int(s["MainPID"] or 0) not in (0, stopped_pid), timeout=120,
                         interval=0.2)  # fmt: skip
    entries = journal(t1)
    res.update({
        "stopped_pid": stopped_pid,
        "control_states": states,
        "control_final": final,
        "control_new_pid": int(final.get("MainPID") or 0),
        "control_s": round(mono() - t1, 2),
        "control_timeout_line": first(entries, "Watchdog timeout"),
        "control_transitions": transitions(entries),
    })  # fmt: skip
    if lg.alive(stopped_pid):
        os.kill(stopped_pid, 9)
    return res


def step_stop() -> dict[str, Any]:
    before = show()
    procs_before = cgroup_pids()
    t0 = mono()
    stop = run_systemctl("stop", UNIT)
    after = show([*STATE, "Result", "ExecMainCode", "ExecMainStatus"])
    entries = journal(t0)
    notes = notifications(entries)
    return {
        "before": before,
        "after": after,
        "systemctl_stop": stop,
        "stop_s": stop["seconds"],
        "pids_before": procs_before,
        "pids_left": [p for p in procs_before if lg.alive(p)],
        "cgroup_pids_after": cgroup_pids(),
        "tlshd_processes_after": tlshd_processes(),
        "stopping_notified": any("STOPPING=1" in n["fields"] for n in notes),
        "notifications": notes,
        "daemon_stopping_line": first(daemon_lines(entries), "stopping"),
        "sigkill_line": first(entries, "with signal SIGKILL") or first(entries, "timed out"),
        "transitions": transitions(entries),
    }


STEPS: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("setup", step_setup),
    ("security", step_security),
    ("start", step_start),
    ("nfs", step_nfs),
    ("reload", step_reload),
    ("crash_restart", step_crash_restart),
    ("watchdog", step_watchdog),
    ("stop", step_stop),
]


# PID 1 at debug level; crash_restart and watchdog do it after their daemon-reload
DEBUG_STEPS = {"start", "reload", "stop"}


def main(argv: list[str]) -> int:
    wanted = argv or [n for n, _ in STEPS]
    rc = 0
    for name, fn in STEPS:
        if name not in wanted:
            continue
        lg.log(f"=== systemd step {name}")
        t0 = mono()
        debug = pid1_debug() if name in DEBUG_STEPS else contextlib.nullcontext()
        try:
            with debug:
                data = fn()
        except Exception:  # the step's failure is its result
            data = {"error": traceback.format_exc()}
            rc = 1
        data["step_seconds"] = round(mono() - t0, 2)
        lg.write_result(f"systemd_{name}", data)
        lg.log(f"=== systemd step {name}: {data['step_seconds']}s"
               + (" ERROR" if "error" in data else ""))  # fmt: skip
    # nfsd still exporting /srv/nfs would fail its unmount at poweroff
    lg.sh("exportfs -ua; rpc.nfsd 0", check=False)
    with contextlib.suppress(Exception):
        (lg.RESULTS / "tlshd-journal.txt").write_text(
            lg.sh(["journalctl", "-b", "-u", UNIT, "--no-pager", "-o", "short-monotonic"]).stdout
        )
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
